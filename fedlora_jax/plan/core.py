"""Plan a federated round for a TPU slice from any CPU host: build, lower, compile with XLA:TPU, read.

:func:`plan_round` builds the config's exact round (model shape from the config without loading
weights, algorithm, ranks, ``C, S, B, T``, chunk size, cut variants), lowers it with abstract
inputs (``jax.ShapeDtypeStruct`` with ``NamedSharding``) on a mesh of a TPU topology's devices
(``jax.experimental.topologies``, from ``libtpu``) and compiles it with the real XLA:TPU
compiler, which refuses a program that does not fit in HBM. Facts read from the compiled
program: per-chip argument / temporary / output bytes, the shardings of the inputs, FLOPs and
collective traffic per chip (:mod:`fedlora_jax.plan.hlo`, loop trip counts included). Derived
and labelled as such: an analytic FLOP count to check against, and a roofline round-time
*estimate* from the public chip figures of :mod:`fedlora_jax.plan.chips`.

Nothing here runs the program, needs a TPU or the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import threading
import time
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.models import parallel
from fedlora_jax.models.family import family_of_config, family_of_model_type
from fedlora_jax.plan import hlo
from fedlora_jax.plan.chips import Chip, chip_of_topology
from fedlora_jax.plan.flops import lora_step_flops_per_token

TPU_PLAN_INSTALL = ('pip install "fedlora_jax[tpu-plan]"   (or: pip install "libtpu==0.0.42.*", the version '
                    "jax 0.10.2's jax[tpu] extra pins)")

#: Model shapes by name (``model="shape:<name>"`` in a config): the public ``config.json`` dimensions
#: of each model, random init, for planning only (no weights exist or are needed).
SHAPES = {
    "llama-tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=1e5,
                       tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         intermediate_size=1536, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=1e5,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                         head_dim=64, intermediate_size=8192, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=5e5, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       head_dim=128, intermediate_size=14336, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=5e5, tie_word_embeddings=False),
}

#: Megatron-style placement of the frozen base on the ``"model"`` axis, by module name
#: (:data:`fedlora_jax.models.parallel.COLUMN` / ``ROW``): column-parallel (split the output features
#: ``M``) where the next op is per-feature, row-parallel (split the input features ``N``) where the
#: input arrives split; embeddings split over the vocabulary.
#: ``"megatron"`` runs each split linear as an explicit ``shard_map`` (:mod:`fedlora_jax.models.parallel`);
#: ``"megatron-spmd"`` places the base the same way and leaves the rest to XLA's SPMD partitioner (the
#: comparison in benchmarks/README.md).
BASE_SHARDINGS = ("replicated", "megatron", "megatron-spmd", "fsdp")


def _require_topologies():
    try:
        from jax.experimental import topologies
    except ImportError as err:  # pragma: no cover - jax always has it
        raise RuntimeError(f"this jax has no jax.experimental.topologies: {err}") from err
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"fedlora plan needs libtpu (the XLA:TPU compiler; it runs on this CPU host, no TPU "
                           f"needed): {TPU_PLAN_INSTALL}") from err
    return topologies


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology (e.g. ``"v5e:2x2"``) on this host, from ``libtpu``.

    Raises:
      RuntimeError: ``libtpu`` is not installed (the message says what to install) or does not
        know the topology.
    """
    topologies = _require_topologies()
    chip_of_topology(topology)
    # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) meant for real TPU hosts; a CPU
    # host that only compiles may run several planners (or test workers) at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as err:  # noqa: BLE001 - libtpu raises plain RuntimeError/ValueError variants
        raise RuntimeError(f"libtpu cannot give topology {topology!r}: {err}") from err


def parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    """``"clients=8,model=2"`` -> ``{"clients": 8, "model": 2}``; ``None`` -> all devices on clients.

    Raises:
      ValueError: unknown axis names, sizes that are not positive ints or whose product is not
        the device count.
    """
    if not text:
        return {"clients": n_devices}
    axes: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in ("clients", "model") or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected 'clients=N' or 'clients=N,model=M' with positive ints")
        axes[name] = int(size)
    axes.setdefault("clients", n_devices // axes.get("model", 1))
    if int(np.prod(list(axes.values()))) != n_devices:
        raise ValueError(f"--mesh {text!r}: the axis sizes multiply to {int(np.prod(list(axes.values())))}, "
                         f"but the topology has {n_devices} chips")
    return {"clients": axes["clients"], **({"model": axes["model"]} if axes.get("model", 1) > 1 else {})}


def make_mesh(devices, axes: dict[str, int]) -> jax.sharding.Mesh:
    """A mesh of ``devices`` with ``axes`` (``"model"`` innermost, so a model group is ICI neighbours)."""
    shape = tuple(axes.values())
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - fall back to the plain order for shapes mesh_utils does not know
        arr = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(arr, tuple(axes))


def base_partition_spec(path, shape, n_model: int, mode: str) -> jax.sharding.PartitionSpec:
    """Where one frozen-base leaf goes on a ``"model"`` axis of ``n_model`` devices.

    ``mode``: ``"replicated"``; ``"megatron"`` / ``"megatron-spmd"`` (column-parallel
    q/k/v/gate/up, row-parallel o/down, embeddings split over the vocabulary; a leaf whose dimension
    does not divide stays replicated);
    ``"fsdp"`` (every 2-D leaf split along its first divisible dimension; XLA gathers it where used).
    """
    P = jax.sharding.PartitionSpec
    if mode not in BASE_SHARDINGS:
        raise ValueError(f"base sharding must be one of {BASE_SHARDINGS}, got {mode!r}")
    if mode == "replicated" or n_model == 1 or len(shape) != 2:
        return P()
    if mode == "fsdp":
        for d in range(2):
            if shape[d] % n_model == 0:
                return P(*(["model" if i == d else None for i in range(2)]))
        return P()
    return parallel.megatron_spec(path, shape, n_model)


# ------------------------------------------------------------------ the config's round, abstractly

def model_config(cfg) -> Any:
    """The model config of ``cfg.model`` without loading any weight: ``"shape:<name>"`` (see
    :data:`SHAPES`), a GGUF model (metadata only) or a ``config.json`` directory. CPU-only
    switches (``norm_barrier``, ``merged_lora``) are "off" (what ``auto`` gives on TPU)."""
    from fedlora_jax.models import loading
    from fedlora_jax.models.llama import LlamaConfig

    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    sw = {k: ("off" if getattr(cfg, k) == "auto" else getattr(cfg, k)) for k in ("norm_barrier", "merged_lora")}
    if sw["merged_lora"] == "on":
        sw["merged_lora"] = "off"
    kw = dict(dtype=dtype, param_dtype=dtype, **sw)
    name = str(cfg.model)
    if name.startswith("shape:"):
        key = name.split(":", 1)[1]
        if key not in SHAPES:
            raise ValueError(f"config field 'model' = {name!r}: unknown shape; known: "
                             f"{['shape:' + k for k in SHAPES]}")
        return LlamaConfig(model_type="llama", **SHAPES[key], **kw)
    gguf_file = loading.resolve_gguf_file(name)
    if gguf_file is not None:
        from fedlora_jax.models import gguf

        reader = gguf.open_gguf(gguf_file)
        return gguf.config_from_gguf(gguf.read_gguf_metadata(reader), gguf.gguf_tensor_names(reader), **kw)
    model_dir = loading.resolve_model_dir(name, None)
    hf = loading.read_config(model_dir)
    if not family_of_model_type(hf.get("model_type")).causal_lm:  # an encoder classifier: head and pooling
        kw["num_labels"] = 2
        names = []
        st = model_dir / "model.safetensors"
        if st.is_file():
            from safetensors import safe_open

            with safe_open(str(st), "np") as f:
                names = list(f.keys())
        kw["pooling"] = loading.default_pooling(model_dir, dict.fromkeys(names), hf["model_type"])
    return loading.config_from_hf(hf, **kw)[1]


def _num_labels(cfg) -> int:
    from fedlora_jax.driver.modes import get_task_mode

    if get_task_mode(cfg.task).causal_lm:
        return 2
    return {"sst2": 2, "ag_news": 4, "agnews": 4}.get(str(cfg.dataset).lower(), 2)


@dataclasses.dataclass
class RoundBuild:
    """Everything :func:`plan_round` lowers: the round function and its abstract inputs."""

    round_fn: Any
    args: tuple
    model_config: Any
    chunk_size: int
    clients: int
    r_max: int
    targets: dict
    static_grad_cut: int | None
    client_state: str = "none"


def build_round(cfg, mesh: jax.sharding.Mesh, *, base_sharding: str = "megatron") -> RoundBuild:
    """The config's exact round and its inputs as ``ShapeDtypeStruct``s placed on ``mesh``.

    Placement: client-stacked inputs (batches ``[C, S, B, ...]`` and every ``[C, ...]`` leaf of
    the spec) on ``"clients"``; the server state and key replicated; the frozen base by
    :func:`base_partition_spec` over ``"model"`` when the mesh has one, else replicated. With
    ``client_state="host"`` and an algorithm that keeps per-client state, the population's state
    is not an input (it stays in host RAM): the round takes the sampled clients' slices, on
    ``"clients"``, as the driver runs it.
    """
    from flax import nnx

    from fedlora_jax import lora as lora_lib
    from fedlora_jax.algorithms import AlgoContext, build_algorithm
    from fedlora_jax.driver import setup as setup_lib
    from fedlora_jax.driver.config import make_optimizer
    from fedlora_jax.driver.modes import get_task_mode
    from fedlora_jax.federated import init_server_state, make_round, make_spec
    from fedlora_jax.models import loading
    from fedlora_jax.models.common import split_for_round

    NS, P = jax.sharding.NamedSharding, jax.sharding.PartitionSpec
    mode = get_task_mode(cfg.task)
    mcfg = model_config(cfg)
    if not mode.causal_lm:  # an encoder classifier: its head's size
        mcfg = dataclasses.replace(mcfg, num_labels=_num_labels(cfg))
    cls = loading.model_class(mcfg)
    model = nnx.eval_shape(lambda: cls(mcfg, rngs=nnx.Rngs(0)))
    graphdef, base, head = split_for_round(model)
    lm = mode.causal_lm
    targets = model.adapter_targets(list(cfg.target_modules))
    keys = tuple(sorted(targets))
    ranks = setup_lib._client_ranks(cfg, np.zeros(cfg.num_clients, int), None)
    profiles = setup_lib._resolve_devices(cfg)
    client_devices = np.array([i % len(profiles) for i in range(cfg.num_clients)], np.int32)
    shape = setup_lib._model_shape(model, cfg, targets, _num_labels(cfg), family=family_of_config(mcfg))
    ctx = AlgoContext(keys=keys, layer_of_key={k: targets[k].layer for k in keys},
                      num_layers=mcfg.num_layers, r_max=cfg.r_max, client_ranks=ranks,
                      client_devices=client_devices, rounds=cfg.rounds, scale=cfg.scale,
                      aggregator_options=dict(cfg.aggregator_options), seed=cfg.seed,
                      device_profiles=tuple(profiles), model_shape=shape, batch_size=cfg.batch_size,
                      local_steps=cfg.local_steps, deadline_s=cfg.deadline_s or None)
    algo = build_algorithm(cfg.algorithm, ctx, **cfg.algo)
    task = mode.make_task(graphdef, cfg)

    c = cfg.clients_per_round
    nc = mesh.shape["clients"]
    if c % nc:
        raise ValueError(f"clients_per_round = {c} must be a multiple of the mesh's clients axis ({nc}): each chip "
                         "holds the same number of clients")
    chunk = max(nc, min(cfg.chunk_size, c) // nc * nc)

    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    with jax.default_device(jax.devices("cpu")[0]):
        lora0 = lora_lib.init(jax.random.key(cfg.seed), shapes, cfg.r_max, scheme=algo.init_scheme)
        head0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), head)
        state = init_server_state(lora0, head0, algo, num_clients=cfg.num_clients)
        ids = setup_lib.sample_clients(cfg, 0)
        plan = algo.plan(state, ids, 0)
        spec = make_spec(plan.masks, update_masks=plan.update_masks, num_steps=np.full(c, cfg.local_steps),
                         weight=np.ones(c, np.float32), client_id=ids, num_layers=mcfg.num_layers,
                         depth_mask=plan.depth_mask, device_id=client_devices[ids], layer_of_key=ctx.layer_of_key,
                         global_masks=plan.global_masks)
    static_cut = int(np.min(np.asarray(spec.grad_cut))) if algo.static_cut else None
    opt = make_optimizer(cfg)
    host_state = cfg.client_state == "host" and algo.client_state is not None
    round_fn = make_round(task, algo, optimizer=opt, chunk_size=chunk, static_grad_cut=static_cut,
                          cut_variants=cfg.cut_variants or None, mesh=mesh, client_state_on_host=host_state,
                          megatron=base_sharding == "megatron" and mesh.shape.get("model", 1) > 1)

    def abstract(x, spec_):
        return jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                                    sharding=NS(mesh, spec_))

    def per_client(x):
        return abstract(x, P("clients") if np.ndim(x) >= 1 and np.shape(x)[0] == c else P())

    s, b, t = cfg.local_steps, cfg.batch_size, cfg.max_length
    batch = {"input_ids": np.zeros((c, s, b, t), np.int32), "attention_mask": np.zeros((c, s, b, t), np.int32),
             "labels": np.zeros((c, s, b, t) if lm else (c, s, b), np.int32),
             "example_mask": np.zeros((c, s, b), np.float32)}
    n_model = mesh.shape.get("model", 1)
    extra = ()
    if host_state:  # the population's state stays in host RAM: the round gets the sampled clients' slices
        extra = (None, jax.tree.map(lambda x: per_client(np.asarray(x)[ids]), state.clients))
        state = state._replace(clients=())
    a_state = jax.tree.map(lambda x: abstract(x, P()), state)
    a_batch = jax.tree.map(per_client, batch)
    a_spec = jax.tree.map(per_client, spec)
    a_key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NS(mesh, P()))
    a_base = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NS(mesh, base_partition_spec(
            p, x.shape, n_model, base_sharding if n_model > 1 else "replicated"))), base)
    return RoundBuild(round_fn, (a_state, a_batch, a_spec, a_key, a_base, *extra), mcfg, chunk, c, cfg.r_max,
                      targets, static_cut, ("host" if host_state else "device") if algo.client_state else "none")


# ------------------------------------------------------------------ analytic FLOPs

def analytic_flops_per_token(mcfg, targets: dict, seq_len: int, rank: float, *, remat: bool = False) -> float:
    """Model FLOPs per token of one local LoRA training step of ``mcfg`` with adapters on
    ``targets`` at ``rank``: :func:`fedlora_jax.plan.flops.lora_step_flops_per_token`, the formula
    ``benchmarks/round_bench.py`` reports utilisation with."""
    fam = family_of_config(mcfg)
    d = mcfg.hidden_size
    head_dim = getattr(mcfg, "head_dim", d // mcfg.num_heads)
    kv_heads = getattr(mcfg, "num_kv_heads", mcfg.num_heads)  # grouped-query attention (Llama/Qwen2)
    lora_by_layer: dict[int, float] = {}
    for tinfo in targets.values():
        lora_by_layer[tinfo.layer] = lora_by_layer.get(tinfo.layer, 0.0) + rank * (tinfo.in_features
                                                                                   + tinfo.out_features)
    return lora_step_flops_per_token(hidden=d, intermediate=mcfg.intermediate_size, q_width=mcfg.num_heads * head_dim,
                                     kv_width=kv_heads * head_dim, ffn_matrices=fam.ffn_matrices,
                                     num_layers=mcfg.num_layers, seq_len=seq_len, lora_by_layer=lora_by_layer,
                                     vocab=mcfg.vocab_size if fam.causal_lm else 0, remat=remat)


# ------------------------------------------------------------------ compile and read

def _versions() -> dict:
    out = {"jax": jax.__version__}
    for pkg in ("jaxlib", "libtpu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _host() -> str:
    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.system()})"


def advice_for(error: str, mesh_axes: dict, chunk: int, remat: bool) -> list[str]:
    """What to change when XLA:TPU refuses a program for memory."""
    nc = mesh_axes["clients"]
    tips = []
    if chunk > nc:
        tips.append(f"lower chunk_size (now {chunk}; {chunk // nc} clients per chip at once; -o chunk_size={nc} "
                    "holds one client per chip in memory)")
    if not remat:
        tips.append("-o remat=true (recompute each block's activations in the backward pass)")
    if "model" not in mesh_axes:
        tips.append("add a model axis: --mesh clients=N,model=M splits the frozen base over M chips")
    else:
        tips.append(f"a larger model axis (now {mesh_axes['model']}) splits the base over more chips")
    tips.append("fewer clients per chip: a larger slice, or fewer clients_per_round")
    tips.append("shorter sequences or smaller local batches (max_length, batch_size)")
    return tips


class _Ticker:
    """Prints ``compiling ... N s`` every ``every`` seconds until stopped."""

    def __init__(self, what: str, every: float, out):
        self.what, self.every, self.out = what, every, out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _run(self):
        while not self._stop.wait(self.every):
            print(f"  {self.what} ... {time.perf_counter() - self.t0:.0f} s", file=self.out, flush=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plan_round(cfg, topology: str, *, mesh: str | dict | None = None, base_sharding: str = "megatron",
               progress=sys.stderr, progress_every: float = 15.0, keep_hlo: bool = False) -> dict:
    """Compile ``cfg``'s round for a TPU slice with XLA:TPU on this host and report per chip.

    Args:
      cfg: an :class:`~fedlora_jax.driver.config.ExperimentConfig`.
      topology: a TPU topology name, e.g. ``"v5e:2x2"``, ``"v5p:2x2x1"``, ``"v6e:4x4"``.
      mesh: ``"clients=N[,model=M]"`` or a dict; default every chip on ``"clients"``.
      base_sharding: placement of the frozen base on a ``"model"`` axis (see
        :func:`base_partition_spec`; ``"megatron"`` also runs each block as one explicit
        ``shard_map``, :mod:`fedlora_jax.models.parallel`); ignored without one.
      progress: stream for progress lines (``None``: silent).
      keep_hlo: also return the compiled program's text under ``"hlo_text"``.

    Returns:
      A JSON-able dict (see the README's "Plan a TPU run from your laptop" for the fields):
      ``fits`` and the compiler's words when it refuses; per-chip bytes against HBM; FLOPs per chip
      read from the compiled program with loop trip counts (``flops_per_chip``) next to the
      analytic count and XLA's own ``cost_analysis`` value; collectives; a roofline
      ``estimate`` (labelled as one); compile seconds; versions and host.

    Raises:
      RuntimeError: ``libtpu`` missing (says what to install) or the topology unknown.
      ValueError: a config or mesh that cannot be placed (names the numbers).
    """
    log = (lambda m: print(m, file=progress, flush=True)) if progress is not None else (lambda m: None)
    chip: Chip = chip_of_topology(topology)
    devices = topology_devices(topology)
    axes = mesh if isinstance(mesh, dict) else parse_mesh(mesh, len(devices))
    m = make_mesh(devices, axes)
    t0 = time.perf_counter()
    build = build_round(cfg, m, base_sharding=base_sharding)
    use_mesh = getattr(jax.sharding, "use_mesh", None) or jax.sharding.set_mesh
    with use_mesh(m):
        lowered = build.round_fn.jitted.lower(*build.args)
    lower_s = time.perf_counter() - t0
    n = len(devices)
    c, s, b, t = cfg.clients_per_round, cfg.local_steps, cfg.batch_size, cfg.max_length
    log(f"plan: {cfg.name} on {topology} ({n} x {chip.device_kind}), mesh {axes}, C={c} S={s} B={b} T={t}, "
        f"chunk {build.chunk_size}; lowered in {lower_s:.1f} s; compiling with XLA:TPU")
    row: dict[str, Any] = dict(
        config=cfg.name, model=str(cfg.model), algorithm=cfg.algorithm, dtype=cfg.dtype, topology=topology,
        chip=chip.name, device_kind=str(devices[0].device_kind), chips=n, mesh=axes,
        base_sharding=base_sharding if "model" in axes else "replicated", clients=c, steps=s, batch=b, seq=t,
        chunk=build.chunk_size, clients_per_chip=c / axes["clients"], r_max=build.r_max,
        client_state=build.client_state,
        adapted_modules=len(build.targets), remat=bool(cfg.remat), cut_variants=list(cfg.cut_variants),
        hbm_capacity_bytes=chip.hbm_bytes, lower_s=round(lower_s, 2))
    t1 = time.perf_counter()
    try:
        with (_Ticker("compiling", progress_every, progress) if progress is not None else _nullctx()):
            compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - XlaRuntimeError is not importable by a stable name
        msg = str(err)
        row.update(compile_s=round(time.perf_counter() - t1, 2), fits=False,
                   error=msg.splitlines()[0][:600] if msg else type(err).__name__)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        row["advice"] = advice_for(msg, axes, build.chunk_size, bool(cfg.remat))
        row.update(_stamp())
        return row
    row["compile_s"] = round(time.perf_counter() - t1, 2)
    ma = compiled.memory_analysis()
    arg, tmp, outb, alias = (int(getattr(ma, k, 0) or 0) for k in (
        "argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"))
    code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    total = arg + tmp + outb - alias + code
    row.update(argument_bytes=arg, temp_bytes=tmp, output_bytes=outb, alias_bytes=alias, code_bytes=code,
               total_bytes=total, hbm_fraction=round(total / chip.hbm_bytes, 4), fits=total <= chip.hbm_bytes)
    if not row["fits"]:
        row["advice"] = advice_for("", axes, build.chunk_size, bool(cfg.remat))
    in_sh = compiled.input_shardings[0]
    batch_sh = in_sh[1]["input_ids"]
    row["batch_shard_shape"] = list(batch_sh.shard_shape((c, s, b, t)))
    row["batch_sharding"] = str(batch_sh.spec)
    base_leaves = jax.tree.leaves(build.args[4])
    base_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in base_leaves)
    base_chip = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x in base_leaves)
    row.update(base_bytes=base_bytes, base_bytes_per_chip=base_chip)

    text = compiled.as_text()
    counts = hlo.count(text)
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, list) else ca) or {}
    c_pad = -(-c // build.chunk_size) * build.chunk_size
    per_tok = analytic_flops_per_token(build.model_config, build.targets, t, build.r_max, remat=bool(cfg.remat))
    analytic = per_tok * c_pad * s * b * t / n
    row.update(flops_per_chip=counts.flops, analytic_flops_per_chip=analytic,
               flops_ratio=round(counts.flops / analytic, 4) if analytic else None,
               xla_cost_analysis_flops=ca.get("flops"), xla_cost_analysis_optimal_seconds=ca.get("optimal_seconds"),
               unknown_trip_counts=counts.unknown_trip_counts, conditionals=counts.conditionals,
               collectives={k: {"count": int(v["count"]), "bytes": v["bytes"]} for k, v in counts.collectives.items()},
               collective_bytes_per_chip=counts.collective_bytes, hbm_traffic_bytes_per_chip=counts.hbm_bytes)
    row["estimate"] = roofline(counts.flops, counts.hbm_bytes, counts.collective_bytes, chip, c * s)
    row.update(_stamp())
    if keep_hlo:
        row["hlo_text"] = text
    return row


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stamp() -> dict:
    return dict(date=time.strftime("%Y-%m-%d", time.gmtime()), versions=_versions(), host=_host())


def roofline(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip, client_steps: int) -> dict:
    """An ESTIMATE of the round time from published peaks, never a measurement: compute
    ``flops / bf16 peak``, memory ``hbm_bytes / HBM bandwidth``, collectives ``bytes / ICI
    bandwidth``; ``round_s = max(compute, memory) + collectives`` (no overlap of communication)."""
    compute = flops / chip.bf16_flops
    memory = hbm_bytes / chip.hbm_bytes_per_s
    ici = collective_bytes / chip.ici_bytes_per_s
    round_s = max(compute, memory) + ici
    return dict(kind="estimate (roofline from public chip peaks), not a measurement", compute_s=compute,
                hbm_s=memory, collective_s=ici, round_s=round_s,
                collective_share=round(ici / round_s, 4) if round_s else None,
                client_steps_per_s=client_steps / round_s if round_s else None, chip_source=chip.source)


# ------------------------------------------------------------------ printing

def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def format_plan(row: dict) -> str:
    """A human-readable table of a :func:`plan_round` result."""
    lines = [f"TPU plan: {row['config']} ({row['model']}, {row['algorithm']}) on {row['topology']}: {row['chips']} x "
             f"{row['device_kind']}, mesh {row['mesh']}, base {row['base_sharding']}",
             f"  round: C={row['clients']} clients ({row['clients_per_chip']:g} per chip), S={row['steps']} steps, "
             f"B={row['batch']}, T={row['seq']}, chunk {row['chunk']}, r_max {row['r_max']}"
             + {"host": "; per-client state in host RAM (sampled slices sent each round)",
                "device": "; per-client state on the chips"}.get(row.get("client_state"), ""),
             f"  compile: {row['compile_s']:.1f} s on this host (lowering {row['lower_s']:.1f} s)"]
    cap = row["hbm_capacity_bytes"]
    if "error" in row:
        lines.append(f"  DOES NOT FIT: XLA:TPU says: {row['error']}")
    else:
        lines += [
            f"  HBM per chip:  arguments {_gb(row['argument_bytes'])}, temporaries {_gb(row['temp_bytes'])}, "
            f"outputs {_gb(row['output_bytes'])} (aliased {_gb(row['alias_bytes'])}) = {_gb(row['total_bytes'])} "
            f"of {_gb(cap)} ({100 * row['hbm_fraction']:.1f} %): {'fits' if row['fits'] else 'DOES NOT FIT'}",
            f"  batch per chip: {row['batch_shard_shape']} of [C, S, B, T] (sharding {row['batch_sharding']}); "
            f"frozen base {_gb(row['base_bytes_per_chip'])} per chip of {_gb(row['base_bytes'])}",
            f"  FLOPs per chip per round: {row['flops_per_chip']:.4g} (compiled program, loops counted); analytic "
            f"{row['analytic_flops_per_chip']:.4g} (ratio {row['flops_ratio']}); XLA cost_analysis "
            f"{row['xla_cost_analysis_flops'] or 0:.4g} (one loop trip, not used)",
            "  collectives per chip per round: " + (", ".join(
                f"{k} x{v['count']} {_gb(v['bytes'])}" for k, v in sorted(row["collectives"].items()))
                or "none") + f"; total {_gb(row['collective_bytes_per_chip'])}",
            f"  HBM traffic per chip (compiled program, estimate): {_gb(row['hbm_traffic_bytes_per_chip'])}"]
        e = row["estimate"]
        lines.append(f"  ESTIMATE (roofline, not a measurement): {e['round_s'] * 1e3:.2f} ms per round = "
                     f"max(compute {e['compute_s'] * 1e3:.2f} ms, HBM {e['hbm_s'] * 1e3:.2f} ms) + collectives "
                     f"{e['collective_s'] * 1e3:.2f} ms; {e['client_steps_per_s']:.1f} client-steps/s")
    for tip in row.get("advice", []):
        lines.append(f"  to fit: {tip}")
    return "\n".join(lines)


def plan_json(row: dict) -> str:
    """One JSON line of a plan (without the HLO text)."""
    return json.dumps({k: v for k, v in row.items() if k != "hlo_text"}, default=float)

