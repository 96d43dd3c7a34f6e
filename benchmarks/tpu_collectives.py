"""Which ops of a compiled TPU round move bytes between chips: collectives grouped by source op.

Compiles the ``sharding`` comparison of ``tpu_plan.py`` (Llama-3.2-1B shape, ``v5e:2x2``, mesh
``clients=2,model=2``, 4 clients x 1 step x 2 x 512 tokens, chunk 2) with one placement of the
frozen base and prints the plan's per-chip totals (loop trip counts included) and then every
collective of the program grouped by ``(kind, op_name, result shape)``, sized per static
occurrence (NOT multiplied by loop trips: it says where, the totals say how much).

    python benchmarks/tpu_collectives.py megatron      > benchmarks/results/tpu_collectives_megatron.txt
    python benchmarks/tpu_collectives.py megatron-spmd > benchmarks/results/tpu_collectives_megatron-spmd.txt
    python benchmarks/tpu_collectives.py fsdp          > benchmarks/results/tpu_collectives_fsdp.txt

``megatron`` runs the split linears as explicit ``shard_map``s (``fedlora_jax.models.parallel``);
``megatron-spmd`` places the base the same way and leaves the partitioning to XLA.
"""

from __future__ import annotations

import sys

from tpu_plan import config

from fedlora_jax.plan import hlo, plan_round


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "megatron"
    row = plan_round(config("llama-3.2-1b", 4, steps=1, batch=2, seq=512, chunk=2), "v5e:2x2",
                     mesh="clients=2,model=2", base_sharding=mode, progress=None, keep_hlo=True)
    print(mode, row["fits"], row["total_bytes"] / 1e9, row["collective_bytes_per_chip"] / 1e9,
          {k: (v["count"], round(v["bytes"] / 1e9, 3)) for k, v in row["collectives"].items()},
          row["estimate"]["round_s"], row["estimate"]["collective_share"], row["flops_ratio"], row["compile_s"])
    groups = hlo.collectives_by_op(row["hlo_text"])
    for key, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{b / 1e6:10.1f}MB x{n:4d} {key}")


if __name__ == "__main__":
    main()
