"""Megatron tensor parallelism for the frozen base and its LoRA paths, on a ``"model"`` mesh axis.

A base too large for one chip is split over a ``"model"`` axis (:func:`megatron_dim`):
column-parallel modules (q/k/v/gate/up) split their output features, row-parallel ones (o/down)
their input features. Left to XLA's SPMD partitioner, an adapted projection computes
``x @ w`` split over ``model`` and the low-rank path ``(x @ a) @ b`` whole, and the partitioner
all-gathers the ``[tokens, hidden]`` activations to add them (measured on the compiled TPU
round: 128 of a Llama-3.2-1B round's 208 all-gathers). Inside :func:`megatron` every such
linear runs as an explicit ``shard_map`` over ``"model"`` instead, with the LoRA factors split
the same way as the kernel:

  column-parallel  ``y[:, j] = x @ w[:, j] + s ((x @ a) g) @ b[:, j]``   (``a`` whole, no collective)
  row-parallel     ``y = psum_j (x[:, j] @ w[j] + s ((x[:, j] @ a[j]) g) @ b)``   (one all-reduce)

so an adapted layer costs what an unadapted Megatron layer costs: one all-reduce of the
activations per row-parallel module forward (and per column-parallel module backward), plus
rank-sized reductions of the factors' gradients. Values and gradients equal the unsplit linear
(up to summation order); ``tests/plan/test_megatron.py`` checks both and counts the all-gathers
in the compiled TPU round.

    with parallel.megatron(mesh):      # a Mesh with a "model" axis
        logits = model(ids, mask, lora=lora)   # inside jit / vmap(spmd_axis_name="clients")
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

#: Modules split over their output features (the next op is per-feature).
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query", "key", "value", "intermediate", "c_attn",
          "c_fc")
#: Modules split over their input features (their input arrives split).
ROW = ("o_proj", "down_proj", "output", "c_proj")

_MESH: contextvars.ContextVar = contextvars.ContextVar("fedlora_megatron_mesh", default=None)


def megatron_dim(module: str | None, shape: tuple[int, ...], n_model: int) -> int | None:
    """Which dimension of a ``[N, M]`` kernel of ``module`` is split over ``n_model`` devices:
    ``1`` (column-parallel), ``0`` (row-parallel), or ``None`` (kept whole: another module, not
    2-D, one device, or the dimension does not divide)."""
    if n_model <= 1 or len(shape) != 2 or module is None:
        return None
    dim = 1 if module in COLUMN else 0 if module in ROW else None
    if dim is None or shape[dim] % n_model:
        return None
    return dim


@contextlib.contextmanager
def megatron(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Trace the models' linears as explicit Megatron ``shard_map``\\ s over ``mesh``'s
    ``"model"`` axis (see the module docstring). Active only while tracing inside it."""
    if "model" not in mesh.axis_names:
        raise ValueError(f"megatron tensor parallelism needs a mesh with a 'model' axis, got {mesh.axis_names}")
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def active_mesh() -> jax.sharding.Mesh | None:
    """The mesh of the enclosing :func:`megatron` block, or ``None``."""
    return _MESH.get()


def split_linear(apply: Callable, x, w, bias, factors, mask, *, dim: int, mesh: jax.sharding.Mesh):
    """``apply(x, w, bias, factors, mask) -> y`` (any linear with an optional LoRA path; shapes
    ``x [..., N]``, ``w [N, M]``, ``bias [M] | None``, ``factors`` with ``a [N, R]``, ``b [R, M]``,
    optional ``e [R]``, or ``None``, ``mask [R] | None``) run with ``w`` split over ``"model"``
    along ``dim`` (1: column-parallel, output ``[..., M]`` split; 0: row-parallel, partial products
    summed with one ``psum``). Called under ``vmap(spmd_axis_name="clients")`` the client axis is
    added to every batched operand's spec by ``shard_map``'s batching rule."""
    P = jax.sharding.PartitionSpec
    lead = (None,) * (x.ndim - 1)
    split = "b" if dim == 1 else "a"            # the factor that shares the kernel's split dimension
    args = {"x": x, "w": w, "bias": bias, "mask": mask}
    specs = {"x": P(*lead, None if dim == 1 else "model"), "w": P(None, "model") if dim == 1 else P("model", None),
             "bias": P("model") if dim == 1 else P(), "mask": P()}
    if factors is not None:
        for name in factors._fields:
            if getattr(factors, name) is not None:
                args[name] = getattr(factors, name)
                specs[name] = (P(None, "model") if dim == 1 else P("model", None)) if name == split else P()
    names = tuple(k for k, v in args.items() if v is not None)

    def local(*vals):
        v = dict(zip(names, vals))
        f = None if factors is None else type(factors)(**{n: v.get(n) for n in factors._fields})
        if dim == 1:
            return apply(v["x"], v["w"], v.get("bias"), f, v.get("mask"))
        y = jax.lax.psum(apply(v["x"], v["w"], None, f, v.get("mask")), "model")
        return y if v.get("bias") is None else y + v["bias"].astype(y.dtype)

    out_spec = P(*lead, "model") if dim == 1 else P(*lead, None)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[n] for n in names), out_specs=out_spec,
                         )(*(args[n] for n in names))
