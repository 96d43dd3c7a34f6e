"""Model FLOPs of one local LoRA training step with a frozen base: the one formula that
``fedlora plan`` checks compiled programs against and ``benchmarks/round_bench.py`` reports
utilisation with (pure arithmetic, no JAX).

Per token and per layer: forward ``2 W`` (``W``: the layer's frozen matmul weights) + attention
``4 T Hq`` (scores and weighted values, the full ``T x T`` even when causal) + LoRA ``2 r (N + M)``
per adapted module; backward ``2 W + 8 T Hq`` + ``4 r (N + M)`` (activation gradients through
every layer, LoRA weight gradients, no weight gradients for the frozen base); a decoder's tied LM
head ``2 D V`` forward + ``2 D V`` for the hidden-state gradient. ``remat``: one more forward.
"""

from __future__ import annotations

from collections.abc import Mapping


def lora_step_flops_per_token(*, hidden: int, intermediate: int, q_width: int, kv_width: int,
                              ffn_matrices: int, num_layers: int, seq_len: int,
                              lora_by_layer: Mapping[int, float], vocab: int = 0, remat: bool = False) -> float:
    """Model FLOPs per token (see the module docstring).

    Args:
      hidden: ``D``. intermediate: the FFN width ``F``. q_width: ``Hq = heads x head_dim``;
        kv_width: ``Hk`` (grouped-query attention; ``Hq`` without it).
      ffn_matrices: the FFN's ``D x F`` matrices (2 for BERT / GPT-2, 3 for SwiGLU).
      num_layers, seq_len: ``L``, ``T``.
      lora_by_layer: ``{layer: sum over its adapted modules of r (N + M)}`` (missing layers: 0).
      vocab: ``V`` of a decoder's tied LM head (0: no LM head, e.g. an encoder classifier).
      remat: each block's forward runs twice.
    """
    d = hidden
    w = d * q_width + 2 * d * kv_width + q_width * d + ffn_matrices * d * intermediate
    total = 0.0
    for layer in range(num_layers):
        lo = lora_by_layer.get(layer, 0.0)
        fwd = 2 * w + 4 * seq_len * q_width + 2 * lo
        total += fwd * (2 if remat else 1) + 2 * w + 8 * seq_len * q_width + 4 * lo
    return total + 4 * d * vocab
