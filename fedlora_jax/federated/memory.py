"""Peak-memory estimate of one compiled round, the device's memory, and a chunk size that fits.

The round (``make_round``) runs ``lax.map`` over chunks of ``chunk_size`` clients and ``vmap``
inside a chunk, so its peak memory is::

    total = base                                    # frozen model, resident once
          + chunk_size * (activations + trainable)  # one chunk of clients in flight
          + C * per_client_io                       # [C, S, B, T] batches, stacked results
          + server                                  # global adapter, head, aggregator state

Every term is an ESTIMATE (XLA's buffer assignment reuses, fuses and sometimes copies
buffers); :func:`estimate_round_memory` documents each one. The test suite compares it with
``jax.jit(round).lower(...).compile().memory_analysis()`` on CPU (see
``tests/reliability/test_memory.py`` for the measured ratio).

Activations (per client, one local step; the ``lax.scan`` over ``S`` steps keeps one step's
residuals at a time): the per-layer stash of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1), written for 2-byte activations::

    per_layer = T * B * (34 H + 5 heads T)  bytes in bf16   (F = 4 H MLP)

generalised here to the FFN width ``F`` and ``f`` FFN matrices (SwiGLU: ``f = 3``) and
scaled by ``dtype_bytes / 2``::

    per_layer = T * B * (18 H + 4 F_eff + 5 heads T) * dtype_bytes / 2
    F_eff = F (GELU MLP, f = 2), 1.5 F (SwiGLU, f = 3)       # F = 4 H: 18 H + 16 H = 34 H

for every layer at or above the gradient cut (``L - grad_cut`` layers; no residuals are
kept below it), plus one layer's worth of forward working set, plus ``x @ a`` (``B T R``) per
adapted module of a trained layer, plus the logits (``B T V`` float32 twice for a causal LM).
With ``remat=True`` only each trained layer's input (``B T H``) is kept, plus one layer's
full stash for the recomputation.

Trainable state per client: LoRA factors (``R (N + M)`` per module, ``e`` ignored) and the
classifier head, times 5 copies of ``param_bytes``: the parameters, their gradients, AdamW's
two moments and the start point kept for the update norm (``make_round`` keeps it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

GiB = 1024**3
TRAINABLE_COPIES = 5  # params, grads, AdamW mu and nu, the start point of the update


class MemoryEstimate(NamedTuple):
    """Estimated peak bytes of one compiled round.

    Attributes:
      base_bytes: frozen model parameters (resident once).
      activation_bytes_per_client: residuals of one local step saved for the backward pass.
      optimizer_bytes_per_client: LoRA factors + head, gradients, AdamW moments, start point.
      input_bytes_per_client: one client's ``[S, B, T]`` batch and its stacked results.
      server_bytes: global adapter and head, aggregator state (two adapter copies).
      chunk_size: clients in flight at once.
      num_clients: ``C`` clients of the round (inputs and results are held for all of them).
      total_bytes: ``base + chunk * (activations + optimizer) + C * inputs + server``.
    """

    base_bytes: int
    activation_bytes_per_client: int
    optimizer_bytes_per_client: int
    input_bytes_per_client: int
    server_bytes: int
    chunk_size: int
    num_clients: int
    total_bytes: int

    def describe(self) -> str:
        """One line with every term in MiB."""
        mib = lambda x: f"{x / 2**20:.1f} MiB"
        return (f"total {mib(self.total_bytes)} = base {mib(self.base_bytes)} + chunk "
                f"{self.chunk_size} x (activations {mib(self.activation_bytes_per_client)} + "
                f"trainable {mib(self.optimizer_bytes_per_client)}) + C {self.num_clients} x "
                f"inputs {mib(self.input_bytes_per_client)} + server {mib(self.server_bytes)}")


def _pos_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _model_dims(model_config: Any) -> dict[str, int]:
    """``L, H, F, heads, V``, the FFN matrix count and causal-LM-or-not from one of our model
    configs (the last two from its family's record, :mod:`fedlora_jax.models.family`)."""
    from fedlora_jax.models.family import family_of_config

    try:
        fam = family_of_config(model_config)
    except TypeError as err:
        raise TypeError(f"model_config: {err}") from None
    need = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size")
    dims = {f: int(getattr(model_config, f)) for f in need}
    dims["ffn_matrices"] = fam.ffn_matrices
    dims["causal_lm"] = int(fam.causal_lm)
    dims["num_labels"] = 0 if fam.causal_lm else int(model_config.num_labels)
    return dims


def _base_params(model_config: Any, dims: dict[str, int]) -> int:
    """Exact frozen parameter count from the model's abstract shapes when the config is one of
    ours (``nnx.eval_shape``, no arrays allocated), else ``V H + L (4 H^2 + f H F)``."""
    try:
        from fedlora_jax.models.loading import expected_shapes

        shapes = expected_shapes(model_config)
    except TypeError:
        h, f = dims["hidden_size"], dims["intermediate_size"]
        return dims["vocab_size"] * h + dims["num_layers"] * (4 * h * h + dims["ffn_matrices"] * h * f)
    return int(sum(math.prod(s) for path, s in shapes.items() if path[0] != "head"))


def activation_bytes_per_layer(*, batch: int, seq_len: int, hidden: int, intermediate: int,
                               heads: int, dtype_bytes: int, ffn_matrices: int = 2) -> int:
    """Korthikanti et al. (2022) per-layer stash ``T B (18 H + 4 F_eff + 5 heads T)`` in bf16,
    scaled by ``dtype_bytes / 2`` (``F_eff = F`` for a GELU MLP, ``1.5 F`` for SwiGLU; with
    ``F = 4 H`` this is the paper's ``T B (34 H + 5 heads T)``)."""
    f_eff = intermediate * (1.5 if ffn_matrices == 3 else 1.0)
    per = seq_len * batch * (18 * hidden + 4 * f_eff + 5 * heads * seq_len)
    return int(per * dtype_bytes / 2)


def estimate_round_memory(model_config: Any, *, chunk_size: int, batch: int, seq_len: int,
                          r_max: int, n_adapters: int, dtype_bytes: int, param_bytes: int = 4,
                          base_param_bytes: int | None = None, steps: int = 1,
                          num_clients: int | None = None, grad_cut: int = 0, remat: bool = False,
                          adapter_dims_sum: int | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one compiled round (formulas in the module docstring).

    Args:
      model_config: ``EncoderConfig`` / ``GPT2Config`` / ``LlamaConfig`` (or any object with
        ``num_layers, hidden_size, num_heads, intermediate_size, vocab_size``).
      chunk_size: clients processed at once (``vmap`` width).
      batch: ``B`` examples per local step.
      seq_len: ``T`` tokens.
      r_max: ``R``.
      n_adapters: adapted matrices in the whole model (``len(model.adapter_targets(...))``).
      dtype_bytes: bytes of the compute (activation) dtype: 4 float32, 2 bfloat16.
      param_bytes: bytes of LoRA factors, head and optimizer state (float32: 4).
      base_param_bytes: bytes of the frozen base parameters (default ``param_bytes``).
      steps: ``S`` local steps (only the inputs scale with it).
      num_clients: ``C`` clients in the round (default ``chunk_size``).
      grad_cut: lowest layer with a backward pass (``0`` = all layers trained).
      remat: estimate for rematerialised layers (only layer inputs kept).
      adapter_dims_sum: ``sum_k (N_k + M_k)`` over the adapted matrices, e.g.
        ``sum(t.in_features + t.out_features for t in targets.values())``; default
        ``n_adapters * 2 H`` (ASSUMPTION: square projections such as query/value).

    Returns:
      :class:`MemoryEstimate` (bytes, Python ints).
    """
    chunk_size = _pos_int("chunk_size", chunk_size)
    batch = _pos_int("batch", batch)
    seq_len = _pos_int("seq_len", seq_len)
    r_max = _pos_int("r_max", r_max)
    n_adapters = _pos_int("n_adapters", n_adapters, 0)
    dtype_bytes = _pos_int("dtype_bytes", dtype_bytes)
    param_bytes = _pos_int("param_bytes", param_bytes)
    steps = _pos_int("steps", steps)
    c = chunk_size if num_clients is None else _pos_int("num_clients", num_clients)
    dims = _model_dims(model_config)
    n_layers, h = dims["num_layers"], dims["hidden_size"]
    grad_cut = _pos_int("grad_cut", grad_cut, 0)
    if grad_cut > n_layers:
        raise ValueError(f"grad_cut must be in [0, L={n_layers}], got {grad_cut}")
    base_pb = param_bytes if base_param_bytes is None else _pos_int("base_param_bytes", base_param_bytes)

    base = _base_params(model_config, dims) * base_pb

    trained = n_layers - grad_cut
    per_layer = activation_bytes_per_layer(
        batch=batch, seq_len=seq_len, hidden=h, intermediate=dims["intermediate_size"],
        heads=dims["num_heads"], dtype_bytes=dtype_bytes, ffn_matrices=dims["ffn_matrices"])
    adapters_trained = n_adapters * trained / n_layers
    lora_acts = int(adapters_trained * batch * seq_len * r_max * dtype_bytes)
    if remat:
        acts = trained * batch * seq_len * h * dtype_bytes + per_layer
    else:
        acts = (trained + 1) * per_layer
    logits = (2 * batch * seq_len * dims["vocab_size"] * 4 if dims["causal_lm"]
              else 2 * batch * max(dims["num_labels"], 1) * 4)
    activations = int(acts + lora_acts + logits)

    dims_sum = (n_adapters * 2 * h if adapter_dims_sum is None
                else _pos_int("adapter_dims_sum", adapter_dims_sum, 0))
    lora_params = r_max * dims_sum
    head_params = 0 if dims["causal_lm"] else h * dims["num_labels"] + dims["num_labels"]
    trainable = (lora_params + head_params) * param_bytes * TRAINABLE_COPIES

    tokens = steps * batch * seq_len * 2 * 4               # input_ids + attention_mask, int32
    tokens += steps * batch * (2 * 4 if not dims["causal_lm"] else 0)  # labels + example mask
    if dims["causal_lm"]:
        tokens += steps * batch * seq_len * 4              # token targets
    results = 3 * lora_params * param_bytes                # outputs, starts, deltas [C, ...]
    per_client_io = tokens + results
    server = 2 * (lora_params + head_params) * param_bytes

    total = base + chunk_size * (activations + trainable) + c * per_client_io + server
    return MemoryEstimate(int(base), activations, int(trainable), int(per_client_io), int(server),
                          chunk_size, c, int(total))


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory the round may use on ``device`` (default ``jax.devices()[0]``).

    An accelerator's ``memory_stats()["bytes_limit"]`` when the backend reports it; otherwise
    (CPU) the host's available RAM (``MemAvailable`` of ``/proc/meminfo``, else
    ``os.sysconf``).

    Raises:
      RuntimeError: neither source is available.
    """
    device = jax.devices()[0] if device is None else device
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    avail = _host_available_bytes()
    if avail is None:
        raise RuntimeError(f"cannot tell the memory of {device}: no memory_stats() and no "
                           "/proc/meminfo or os.sysconf; pass limit_bytes explicitly")
    return avail


class MemoryBudgetError(ValueError):
    """Even one client per chunk does not fit the memory budget (a ``ValueError``)."""


def _total(x: MemoryEstimate | int) -> int:
    return int(x.total_bytes if isinstance(x, MemoryEstimate) else x)


def choose_chunk_size(requested: int, estimate_fn: Callable[[int], MemoryEstimate | int],
                      limit_bytes: int, *, safety: float = 0.8) -> int:
    """The largest chunk size ``<= requested`` whose estimate fits ``safety * limit_bytes``.

    Args:
      requested: the chunk size asked for (an upper bound).
      estimate_fn: ``chunk -> MemoryEstimate`` (or bytes), non-decreasing in ``chunk``, e.g.
        ``lambda k: estimate_round_memory(cfg, chunk_size=k, ...)``.
      limit_bytes: device memory (see :func:`device_memory_bytes`).
      safety: the fraction of ``limit_bytes`` the estimate may use (the estimate is rough and
        XLA needs workspace).

    Returns:
      An int in ``[1, requested]``.

    Raises:
      MemoryBudgetError (a ``ValueError``): chunk 1 does not fit; the message gives the
        estimate and what to change.
    """
    requested = _pos_int("requested", requested)
    if not isinstance(limit_bytes, (int, float, np.integer, np.floating)) or not limit_bytes > 0:
        raise ValueError(f"limit_bytes must be a number > 0, got {limit_bytes!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    budget = safety * float(limit_bytes)
    one = estimate_fn(1)
    if _total(one) > budget:
        detail = one.describe() if isinstance(one, MemoryEstimate) else f"{_total(one)} bytes"
        raise MemoryBudgetError(
            f"the round does not fit even with chunk_size=1: estimated {_total(one) / GiB:.2f} GiB "
            f"> budget {budget / GiB:.2f} GiB ({safety:.0%} of {float(limit_bytes) / GiB:.2f} GiB). "
            f"[{detail}] Reduce batch_size or max_length (seq_len), use dtype='bfloat16', "
            "enable remat (rematerialised layers), fewer target_modules / a smaller r_max, "
            "fewer clients_per_round, or a device with more memory.")
    lo, hi = 1, requested                     # invariant: lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _total(estimate_fn(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


CPU_CHUNK_CACHE_BYTES = 8 * 2**20


def cpu_cache_chunk_cap(batch: int, seq_len: int, width: int, *, itemsize: int = 4,
                        cache_bytes: int = CPU_CHUNK_CACHE_BYTES) -> int:
    """On CPU, the largest chunk whose widest activation ``[chunk * B * T, width]`` stays within
    ``cache_bytes`` (default 8 MiB), at least 1.

    ``width``: the widest hidden size (the FFN width ``F``). ASSUMPTION (a measured heuristic,
    not a model): on a 2-core AMD EPYC (1 MiB L2 per core, 32 MiB shared L3), MiniLM shape
    B=8 T=64 F=1536 f32, a round ran at 5.94 / 6.49 / 5.94 / 5.04 client-steps/s with chunks
    of 1 / 2 / 4 / 8 clients (``benchmarks/results/round_cpu_chunks.jsonl``): bigger ``vmap``
    chunks make every activation bigger without
    making the matmuls faster, and once they outgrow the caches the elementwise passes slow
    down. This rule picks 2 there. GPUs want the opposite (wide chunks); it is not used there.
    """
    for name, v in (("batch", batch), ("seq_len", seq_len), ("width", width), ("itemsize", itemsize),
                    ("cache_bytes", cache_bytes)):
        _pos_int(name, v)
    return max(1, int(cache_bytes) // (int(batch) * int(seq_len) * int(width) * int(itemsize)))


def check_population_memory(population_bytes: int, *, num_clients: int, on_host: bool,
                            device_limit_bytes: int | None = None, host_limit_bytes: int | None = None,
                            safety: float = 0.8) -> None:
    """Refuse a per-client population state that cannot fit, before anything is allocated.

    On the device the round reads the ``[K, ...]`` state and writes an updated copy, so it needs
    ``2 x population_bytes`` there; on the host (``client_state_on_host``) it needs the state
    once in host RAM. ``device_limit_bytes`` / ``host_limit_bytes`` default to
    :func:`device_memory_bytes` / the host's available RAM.

    Raises:
      MemoryBudgetError: naming the number of clients, the bytes, the budget and what to change.
    """
    if population_bytes <= 0:
        return
    if on_host:
        limit = _host_available_bytes() if host_limit_bytes is None else host_limit_bytes
        need, where = population_bytes, "host RAM"
        fix = "use fewer clients (num_clients), a lower r_max, or fewer target modules"
    else:
        limit = device_memory_bytes() if device_limit_bytes is None else device_limit_bytes
        need, where = 2 * population_bytes, "device memory (the state and its updated copy)"
        fix = ("keep it on the host (config client_state='host', make_round(client_state_on_host=True)), "
               "or use fewer clients (num_clients)")
    if limit is None or need <= safety * limit:
        return
    raise MemoryBudgetError(
        f"the per-client state of {num_clients} clients ({population_bytes / GiB:.2f} GiB) needs "
        f"{need / GiB:.2f} GiB of {where}, more than {safety:.0%} of the {limit / GiB:.2f} GiB available; {fix}")
