"""Megatron tensor parallelism for the frozen base and its LoRA paths, on a ``"model"`` mesh axis.

A base too large for one chip is split over a ``"model"`` axis (:func:`megatron_dim`):
column-parallel modules (q/k/v/gate/up) split their output features, row-parallel ones (o/down)
their input features. Left to XLA's SPMD partitioner, an adapted projection's split base product
meets its whole low-rank path ``(x @ a) @ b`` and the partitioner all-gathers ``[tokens, hidden]``
activations around the matmuls. Inside :func:`megatron` the model runs Megatron explicitly, with
each client's LoRA factors split like the kernel:

  column-parallel  ``y[:, j] = x @ w[:, j] + s ((x @ a) g) @ b[:, j]``   (``a`` whole, no collective)
  row-parallel     ``y = psum_j (x[:, j] @ w[j] + s ((x[:, j] @ a[j]) g) @ b)``   (one all-reduce)

- :func:`split_block`: a whole block (one that declares ``megatron_groups``, e.g. Llama's) as ONE
  ``shard_map``: attention on the local heads, one ``psum`` per row-parallel linear, and
  backward one reduction each for the attention's and the MLP's input gradients. Two
  all-reduces of the activations forward and two backward per layer, as in Megatron-LM.
- :func:`split_linear`: each linear as its own ``shard_map`` (blocks whose heads do not split
  evenly, or that declare no groups).

Values and LoRA gradients equal the unsplit model (``tests/models/test_parallel.py``); the
collectives of the compiled TPU round are in ``benchmarks/README.md`` ("Bases larger than one
chip"). Inside the ``shard_map``s the linears run without the merged-kernel fold and without the
all-zero-mask ``cond`` (one straight-line program per shard; same values).

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


def megatron_spec(path, shape: tuple[int, ...], n_model: int) -> jax.sharding.PartitionSpec:
    """Megatron placement of one frozen-base leaf (``path``: its pytree key path) over a
    ``"model"`` axis of ``n_model`` devices: column-parallel kernels split by columns, row-parallel
    ones by rows (:func:`megatron_dim`), embeddings over the vocabulary; everything else (and any
    dimension that does not divide) whole."""
    P = jax.sharding.PartitionSpec
    if n_model <= 1 or len(shape) != 2:
        return P()
    names = leaf_names(path)
    module = module_of_leaf(names)
    if module in COLUMN + ROW:
        dim = megatron_dim(module, shape, n_model)
    elif any("embed" in n or n in ("wte", "lm_head") for n in names):
        dim = None if shape[0] % n_model else 0
    else:
        dim = None
    return P() if dim is None else P(*("model" if i == dim else None for i in range(2)))


@contextlib.contextmanager
def megatron(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """Trace the models' linears as explicit Megatron ``shard_map``s over ``mesh``'s
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


def _kernel_spec(dim: int) -> jax.sharding.PartitionSpec:
    """A ``[N, M]`` kernel split by columns (``dim == 1``) or rows (``dim == 0``) over ``"model"``."""
    P = jax.sharding.PartitionSpec
    return P(None, "model") if dim == 1 else P("model", None)


def _factor_spec(name: str, dim: int | None) -> jax.sharding.PartitionSpec:
    """A LoRA factor of a kernel split along ``dim``: the factor sharing that dimension (``b`` of
    a column-parallel kernel, ``a`` of a row-parallel one) is split like it; the rest are whole."""
    shares = (dim == 1 and name == "b") or (dim == 0 and name == "a")
    return _kernel_spec(dim) if shares else jax.sharding.PartitionSpec()


def split_linear(apply: Callable, x, w, bias, factors, mask, *, dim: int, mesh: jax.sharding.Mesh):
    """``apply(x, w, bias, factors, mask) -> y`` (any linear with an optional LoRA path; shapes
    ``x [..., N]``, ``w [N, M]``, ``bias [M] | None``, ``factors`` with ``a [N, R]``, ``b [R, M]``,
    optional ``e [R]``, or ``None``, ``mask [R] | None``) run with ``w`` split over ``"model"``
    along ``dim`` (1: column-parallel, output ``[..., M]`` split; 0: row-parallel, partial products
    summed with one ``psum``). Called under ``vmap(spmd_axis_name="clients")`` the client axis is
    added to every batched operand's spec by ``shard_map``'s batching rule."""
    P = jax.sharding.PartitionSpec
    lead = (None,) * (x.ndim - 1)
    args = {"x": x, "w": w, "bias": bias, "mask": mask}
    specs = {"x": P(*lead, None if dim == 1 else "model"), "w": _kernel_spec(dim),
             "bias": P("model") if dim == 1 else P(), "mask": P()}
    if factors is not None:
        for name in factors._fields:
            if getattr(factors, name) is not None:
                args[name], specs[name] = getattr(factors, name), _factor_spec(name, dim)
    names = tuple(k for k, v in args.items() if v is not None)

    def local(*vals):
        v = dict(zip(names, vals, strict=True))
        f = None if factors is None else type(factors)(**{n: v.get(n) for n in factors._fields})
        return local_linear(apply, v["x"], v["w"], v.get("bias"), f, v.get("mask"), dim=dim)

    out_spec = P(*lead, "model") if dim == 1 else P(*lead, None)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[n] for n in names), out_specs=out_spec,
                         )(*(args[n] for n in names))


# ------------------------------------------------------------------ one shard_map per block

_LOCAL: contextvars.ContextVar = contextvars.ContextVar("fedlora_megatron_local", default=None)


def local_dims() -> dict[str, int] | None:
    """Inside :func:`split_block`'s ``shard_map``: ``{module: split dim}`` of the block's split
    linears (their kernels are local shards there); ``None`` elsewhere."""
    return _LOCAL.get()


def local_linear(apply: Callable, x, w, bias, factors, mask, *, dim: int | None):
    """One linear inside :func:`split_block` on local shards: column-parallel (``dim == 1``) or
    whole (``None``) as it is; row-parallel (``dim == 0``) summed over ``"model"``, bias after."""
    if dim != 0:
        return apply(x, w, bias, factors, mask)
    y = jax.lax.psum(apply(x, w, None, factors, mask), "model")
    return y if bias is None else y + bias.astype(y.dtype)


def leaf_names(path) -> list[str]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices)."""
    return [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", "")))) for p in path]


def module_of_leaf(names: list[str]) -> str | None:
    """The module that owns a parameter leaf, from its path names: the name before ``"kernel"`` /
    ``"bias"`` (``["layers", "0", "o_proj", "kernel", "value"]`` -> ``"o_proj"``; an NNX leaf ends
    in ``"value"``, which is also BERT's module name, so the name is found by position)."""
    for i in range(len(names) - 1, 0, -1):
        if names[i] in ("kernel", "bias"):
            return names[i - 1]
    return None


def block_dims(layer, n_model: int) -> dict[str, int] | None:
    """``{module: dim}`` for the Megatron linears of ``layer`` split over ``n_model`` devices, or
    ``None`` when the block cannot run as one ``shard_map``: it does not declare
    ``megatron_groups`` (modules that must be split together, e.g. q/k/v/o: local heads) or a
    group is split only in part, or ``layer.megatron_heads_ok(n_model)`` is false."""
    groups = getattr(layer, "megatron_groups", None)
    if groups is None or not layer.megatron_heads_ok(n_model):
        return None
    dims = {}
    for group in groups:
        got = {m: megatron_dim(m, getattr(layer, m).kernel.shape, n_model) for m in group}
        if len({d is None for d in got.values()}) > 1:
            return None
        dims.update({m: d for m, d in got.items() if d is not None})
    return dims


def split_block(call: Callable, layer, h, attention_mask, lora, masks, scale, *, dims: dict[str, int],
                mesh: jax.sharding.Mesh):
    """``call(layer, h, attention_mask, lora, masks, scale) -> h'`` (one transformer block, ``h``
    ``[B, T, D]`` whole) run as ONE ``shard_map`` over ``"model"``: the split linears' kernels,
    biases and LoRA factors enter as local shards (:func:`block_dims`), attention runs on the local
    heads, each row-parallel linear ends in one ``psum``. Unlike :func:`split_linear` per linear,
    the attention's input gradient is reduced once (q/k/v's summed first), and so is the MLP's
    (gate/up's)."""
    from flax import nnx

    P = jax.sharding.PartitionSpec
    graphdef, state = nnx.split(layer)

    def state_spec(path, x):
        names = leaf_names(path)
        module = module_of_leaf(names)
        if module not in dims:
            return P()
        d = dims[module]
        if x.ndim == 2:          # the kernel
            return _kernel_spec(d)
        return P("model") if d == 1 else P()      # the bias

    def factor_specs(key, f):
        d = dims.get(key.rsplit(".", 1)[-1])
        return type(f)(**{n: None if getattr(f, n) is None else _factor_spec(n, d) for n in f._fields})

    lead = (None,) * (h.ndim - 1)
    specs = (jax.tree_util.tree_map_with_path(state_spec, state), P(*lead, None),
             P(*(None,) * attention_mask.ndim),
             None if lora is None else {k: factor_specs(k, f) for k, f in lora.items()},
             None if masks is None else {k: P() for k in masks},
             P())

    def local(st, hh, am, lo, ma, sc):
        token = _LOCAL.set(dims)
        try:
            return call(nnx.merge(graphdef, st), hh, am, lo, ma, sc)
        finally:
            _LOCAL.reset(token)

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(*lead, None))(
        state, h, attention_mask, lora, masks, jax.numpy.asarray(scale))
