"""Differentiate a validation loss through one federated aggregation step.

Shows: on a toy linear model ``y = x @ (w0 + delta_w)``, the server's replication-padding
aggregate of 3 clients (ranks 1, 2, 4 of r_max 4) is a pure function of the client weights,
so ``jax.grad`` of the validation loss of the aggregated model w.r.t. those weights works;
the gradient is checked against a central finite difference in float64 (FedIT too).
Run: ``python experiments/examples/grad_through_aggregation.py``
"""

import jax

jax.config.update("jax_enable_x64", True)     # float64 for the finite-difference check

import jax.numpy as jnp  # noqa: E402

from fedlora_jax import aggregation, lora  # noqa: E402

N, M, R, SCALE = 6, 3, 4, 0.5


def main():
    ks = jax.random.split(jax.random.key(0), 6)
    w0 = jax.random.normal(ks[0], (N, M))
    x_val = jax.random.normal(ks[1], (32, N))
    y_val = x_val @ (w0 + 0.3 * jax.random.normal(ks[2], (N, M)))      # the target the clients chase
    masks = {"w": jnp.stack([lora.rank_mask(r, R, jnp.float64) for r in (1, 2, 4)])}
    clients = lora.apply_masks({"w": lora.LoraFactors(jax.random.normal(ks[3], (3, N, R)),
                                                      jax.random.normal(ks[4], (3, R, M)))}, masks)
    glob = lora.init(ks[5], {"w": (N, M)}, r_max=R, dtype=jnp.float64)
    weights = jnp.array([30.0, 50.0, 20.0])                             # e.g. client sample counts

    for name in ("replication_padding", "fedit"):
        agg = aggregation.get_aggregator(name)

        def val_loss(p, agg=agg):
            new_global, _ = agg.aggregate(glob, clients, p, masks, agg.init(glob))
            pred = lora.apply(x_val, w0, new_global["w"], scale=SCALE)   # float64 (lora.merge is float32)
            return jnp.mean((pred - y_val) ** 2)

        grad = jax.jit(jax.grad(val_loss))(weights)
        h, eye = 1e-5, jnp.eye(3)
        fd = jnp.array([(val_loss(weights + h * eye[i]) - val_loss(weights - h * eye[i])) / (2 * h)
                        for i in range(3)])
        print(f"{name}: val loss {val_loss(weights):.6f}")
        print(f"  jax.grad  {grad}")
        print(f"  central FD {fd}")
        print(f"  max |diff| {jnp.abs(grad - fd).max():.2e}, grad . weights {grad @ weights:.1e} (scale invariance)")
        assert jnp.allclose(grad, fd, rtol=1e-6, atol=1e-8)


if __name__ == "__main__":
    main()
