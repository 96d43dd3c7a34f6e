"""Does the Mosaic (TPU Pallas) kernel for the fused multi-client LoRA linear save HBM traffic?

Compiles the pure-jnp reference (``fedlora_jax.kernels.lora_matmul.fused_lora_linear_reference``,
what the library's models run) and the Mosaic kernel
(``fedlora_jax.kernels.lora_matmul_tpu.fused_lora_linear_tpu``) for one TPU chip with XLA:TPU
on this CPU host, forward and
forward + backward (gradients of ``a`` and ``b``, frozen ``w``), and compares the bytes the
compiled program accesses (``cost_analysis()["bytes accessed"]``: no loops here, so it is exact
for this program) with the minimum any kernel must move: read ``x``, ``w``, ``a``, ``b`` once and
write ``y`` once (forward); plus read ``dy`` and write ``dx``, ``da``, ``db`` (backward, with
``x`` read again). A kernel can only save the difference. For the kernel, XLA cannot see inside
the Mosaic call: the call declares the bytes its grid schedule moves
(``lora_matmul_tpu.hbm_bytes``, exact for Pallas TPU's block pipelining) and XLA adds its own
ops around it (casts, the backward's ``da`` / ``db`` einsums); the row says both.

    python benchmarks/lora_tpu_fusion.py [--topology v5e:1x1] [--out benchmarks/results/lora_tpu_fusion.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedlora_jax.kernels.lora_matmul import fused_lora_linear_reference  # noqa: E402
from fedlora_jax.kernels.lora_matmul_tpu import fused_lora_linear_tpu, hbm_bytes, pick_blocks  # noqa: E402
from fedlora_jax.plan import topology_devices  # noqa: E402
from fedlora_jax.plan.core import _versions  # noqa: E402

SHAPES = [  # (C clients in a chunk, T tokens per client, N, M, R): Llama-3-8B q_proj / down_proj-like
    (4, 2048, 4096, 4096, 16),
    (4, 2048, 14336, 4096, 16),
    (16, 512, 2048, 2048, 16),
]


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * jnp.dtype(dtype).itemsize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--out", default="benchmarks/results/lora_tpu_fusion.jsonl")
    a = p.parse_args()
    dev = topology_devices(a.topology)[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    dt = jnp.bfloat16
    for c, t, n, m, r in SHAPES:
        x = jax.ShapeDtypeStruct((c, t, n), dt, sharding=sh)
        w = jax.ShapeDtypeStruct((n, m), dt, sharding=sh)
        fa = jax.ShapeDtypeStruct((c, n, r), jnp.float32, sharding=sh)
        fb = jax.ShapeDtypeStruct((c, r, m), jnp.float32, sharding=sh)
        mask = jax.ShapeDtypeStruct((c, r), jnp.float32, sharding=sh)
        dy = jax.ShapeDtypeStruct((c, t, m), dt, sharding=sh)

        impls = {"reference": lambda x, w, fa, fb, mask: fused_lora_linear_reference(x, w, fa, fb, mask, scale=2.0),
                 "mosaic": lambda x, w, fa, fb, mask: fused_lora_linear_tpu(x, w, fa, fb, mask, scale=2.0)}
        fwd_blocks = pick_blocks(t, n, m, r, dt)
        bwd_blocks = pick_blocks(t, m, n, r, dt, block_t=fwd_blocks.block_t)
        kernel_bytes = {"forward": hbm_bytes(c, t, n, m, r, dt, fwd_blocks)}
        kernel_bytes["forward+backward"] = kernel_bytes["forward"] + hbm_bytes(c, t, m, n, r, dt, bwd_blocks,
                                                                               w_transposed=True)

        io = nbytes((c, t, n), dt) + nbytes((n, m), dt) + nbytes((c, n, r), jnp.float32) \
            + nbytes((c, r, m), jnp.float32) + nbytes((c, r), jnp.float32)
        min_fwd = io + nbytes((c, t, m), dt)
        # backward: read dy, x again (for da) and w (for dx); write dx, da, db
        min_bwd = min_fwd + nbytes((c, t, m), dt) + nbytes((c, t, n), dt) + nbytes((n, m), dt) \
            + nbytes((c, t, n), dt) + nbytes((c, n, r), jnp.float32) + nbytes((c, r, m), jnp.float32)
        for impl, fwd in impls.items():
            def fwd_bwd(x, w, fa, fb, mask, dy, fwd=fwd):
                y, vjp = jax.vjp(lambda x_, a_, b_: fwd(x_, w, a_, b_, mask), x, fa, fb)
                return (y,) + vjp(dy)

            for name, f, args, minimum in (("forward", fwd, (x, w, fa, fb, mask), min_fwd),
                                           ("forward+backward", fwd_bwd, (x, w, fa, fb, mask, dy), min_bwd)):
                t0 = time.time()
                with jax.default_device(dev):  # Mosaic's lowering reads the chip from the default device
                    compiled = jax.jit(f).lower(*args).compile()
                ca = compiled.cost_analysis()
                ca = ca[0] if isinstance(ca, list) else ca
                row = dict(topology=a.topology, impl=impl, pass_=name, C=c, T=t, N=n, M=m, R=r,
                           dtype="bfloat16 x, w; float32 a, b", xla_bytes_accessed=ca["bytes accessed"],
                           minimum_bytes=minimum, ratio=round(ca["bytes accessed"] / minimum, 4), xla_flops=ca["flops"],
                           temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
                           compile_s=round(time.time() - t0, 2), date=time.strftime("%Y-%m-%d"), **_versions())
                if impl == "mosaic":
                    row.update(kernel_schedule_bytes=kernel_bytes[name], blocks_forward=list(fwd_blocks),
                               blocks_dx=list(bwd_blocks))
                print(json.dumps(row), flush=True)
                with open(a.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
