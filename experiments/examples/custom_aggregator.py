"""Write your own server aggregator and check it with the public conformance battery.

Shows: a norm-clipped FedAvg of LoRA factors in about 20 lines on the ``Aggregator`` contract
(pure ``init`` / ``aggregate`` / ``distribute``, vmappable and jittable), passed through
``fedlora_jax.testing.check_aggregator``: shapes and dtypes, masked slots never leak,
permutation / weight-scale invariance, zero-weight clients, jit == eager, vmap, distribute,
gradients vs finite differences. Run: ``python experiments/examples/custom_aggregator.py``
"""

import jax.numpy as jnp

from fedlora_jax.aggregation import Aggregator, EmptyState
from fedlora_jax.lora import LoraFactors, apply_masks
from fedlora_jax.testing import check_aggregator


def clipped_fedavg(max_norm: float = 10.0) -> Aggregator:
    """Per-slot FedAvg of ``a [C, ..., N, R]`` and ``b [C, ..., R, M]`` over the clients that trained
    the slot, each client's column of ``a`` / row of ``b`` clipped to norm ``<= max_norm`` first;
    slots nobody trained keep the global. For factors without ``e`` (a global ``e`` is kept)."""

    def clip(x, axis):  # scale each slot down to norm max_norm (in >= float32); safe gradient at a zero slot
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        sq = jnp.sum(x * x, axis=axis, keepdims=True)
        return x * jnp.minimum(1.0, max_norm / jnp.sqrt(jnp.maximum(sq, 1e-30)))

    def aggregate(glob, clients, weights, masks, state, *, extras=None):
        out = {}
        for k, g in glob.items():
            col = lambda v, m=masks[k]: v.reshape((-1,) + (1,) * (m.ndim - 1))  # noqa: E731  [C] -> [C, 1.., 1]
            m = masks[k] * col(weights > 0)                                   # [C, ..., R]: dropped clients out
            den = jnp.sum(col(weights) * m, axis=0)                           # [..., R]
            p = col(weights) * m / jnp.where(den > 0, den, 1.0)               # [C, ..., R]
            a = clip(jnp.where(m[..., None, :] > 0, clients[k].a, 0), -2)
            b = clip(jnp.where(m[..., :, None] > 0, clients[k].b, 0), -1)
            new_a = jnp.where(den[..., None, :] > 0, jnp.sum(p[..., None, :] * a, 0), g.a)
            new_b = jnp.where(den[..., :, None] > 0, jnp.sum(p[..., :, None] * b, 0), g.b)
            out[k] = LoraFactors(new_a.astype(g.a.dtype), new_b.astype(g.b.dtype), g.e)
        return out, state

    return Aggregator(init=lambda glob: EmptyState(), aggregate=aggregate,
                      distribute=lambda glob, masks, state=None, *, client_lora=None: apply_masks(glob, masks),
                      uplink_parts=("a", "b"), downlink_parts=("a", "b"), name="clipped_fedavg")


def main():
    check_aggregator(clipped_fedavg())  # raises AssertionError "[property] where: what" on a failure
    print("clipped_fedavg passes the fedlora_jax conformance battery")


if __name__ == "__main__":
    main()
