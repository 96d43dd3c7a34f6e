"""LoRA and batched low-rank SVD from fedlora_jax inside someone else's Flax NNX model.

Shows: a tiny ``nnx.Module`` MLP (not ours) whose second linear is adapted with the functional
``lora.apply``; a gradient w.r.t. the LoRA factors only (the model is frozen); a stack of
client adapters truncated with ``linalg.lowrank_svd``, checked against ``jnp.linalg.svd`` of
the dense products. Run: ``python experiments/examples/lora_in_your_nnx_model.py``
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fedlora_jax import linalg, lora


class MLP(nnx.Module):                      # "your" model: nothing fedlora_jax-specific in it
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x, adapter=None, mask=None, scale=2.0):
        h = jax.nn.relu(self.fc1(x))
        if adapter is None:
            return self.fc2(h)
        return lora.apply(h, self.fc2.kernel[...], adapter, mask, scale=scale, bias=self.fc2.bias[...])


def main():
    model = MLP(nnx.Rngs(0))
    x, labels = jax.random.normal(jax.random.key(1), (64, 16)), jnp.arange(64) % 4
    tree = lora.init(jax.random.key(2), {"fc2": (32, 4)}, r_max=4, std=0.1, scheme="b_random_a_zero")
    mask = lora.rank_mask(2, 4)                                   # this client trains rank 2 of 4
    assert jnp.allclose(model(x, tree["fc2"], mask), model(x))   # a = 0: starts at the base model

    def loss(adapter):                                             # differentiate the factors only
        logits = model(x, adapter, mask)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    value, grad = jax.value_and_grad(loss)(tree["fc2"])
    print(f"loss {value:.4f}  |grad a| {jnp.linalg.norm(grad.a):.4f}  |grad b| {jnp.linalg.norm(grad.b):.4f}"
          " (b gets none while a = 0)")
    print(f"grad of masked-out rank slots (a[:, 2:]): {jnp.abs(grad.a[:, 2:]).max():.1f}")
    tuned = jax.tree.map(lambda p, g: p - 0.5 * g, tree["fc2"], grad)
    print(f"loss after one SGD step on the factors: {loss(tuned):.4f}")

    # 5 clients' rank-8 adapters of a 32 x 24 layer, truncated to rank 3 without forming a @ b
    ka, kb = jax.random.split(jax.random.key(3))
    a, b = jax.random.normal(ka, (5, 32, 8)), jax.random.normal(kb, (5, 8, 24))
    res = linalg.lowrank_svd(a, b, rank=3)
    u, s, vt = jnp.linalg.svd(a @ b, full_matrices=False)
    dense3 = (u[..., :3] * s[..., None, :3]) @ vt[..., :3, :]
    ours3 = (res.u * res.s[..., None, :]) @ res.vt
    fmt = lambda v: ", ".join(f"{float(t):.3f}" for t in v)
    print(f"singular values, client 0: [{fmt(res.s[0])}] vs dense [{fmt(s[0, :3])}]")
    print(f"max |s - s_dense| {jnp.abs(res.s - s[..., :3]).max():.2e}, "
          f"max |rank-3 product - dense rank-3| {jnp.abs(ours3 - dense3).max():.2e}")
    assert jnp.allclose(res.s, s[..., :3], rtol=1e-4) and jnp.allclose(ours3, dense3, atol=1e-3)


if __name__ == "__main__":
    main()
