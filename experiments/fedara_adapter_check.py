"""Does FedARA's SVD-form adapter train at our scale? One client, 100 local steps, real data.

Compares the AdaLoRA/FedARA SVD-form adapter (``delta_W = scale * Q^T diag(lambda) P^T``,
library layout ``a [N,R] = Q^T``, ``b [R,M] = P^T``, ``e [R] = lambda = 0`` at init; no rank
allocation, every slot active) against plain LoRA (``a`` random, ``b = 0``) at equal settings,
then sweeps what might keep the SVD form from training: its learning rate, a larger learning
rate for lambda only, the orthogonality penalty's weight, form (plain vs squared Frobenius) and
warm-up, each with and without an Adam-state reset every 6 steps (the FedARA experiments run 6
local steps per round and re-create the optimizer every round).

Setup (fixed across arms): the real MiniLM-L6 encoder (``all-MiniLM-L6-v2``, head initialised
with ``jax.random.key(0)``), AG News (``/work/shared/data/agnews``), max_length 40, batch 16,
client 0 of a 20-client IID split of the training file (about 500 examples, so 100 steps are
~3 epochs), adapters on query/key/value/attn_out/ffn_in/ffn_out of all 6 layers (36 modules,
as ``experiments/configs/fedara.py``), r_max 12, lora_alpha 16 (scale 16/12), AdamW with
weight decay 0 (the driver's default), the head trained at the same learning rate.

Per arm, one JSON line in ``--out`` (default ``experiments/results/fedara_adapter/check.jsonl``):
arm settings; ``probe_loss``/``probe_acc`` at steps 0/25/50/75/100 (the current model evaluated
on the 320 examples of the last 20 steps' batches; the value at step 100 is the final train
loss/accuracy); the raw minibatch loss at those steps; held-out accuracy/loss on the first
``--test-size`` (500) test examples after training; mean |lambda| over all slots; sum over
modules of ``||delta_W||_F``; the orthogonality penalty (plain and squared) at the end; the
fraction of lambda-gradient sign flips between consecutive steps; wall time; metadata.

Run (resumable: arms already in the output file are skipped; one line appended and fsynced
per arm)::

    JAX_PLATFORMS=cpu python experiments/fedara_adapter_check.py            # default arm list
    JAX_PLATFORMS=cpu python experiments/fedara_adapter_check.py --list     # all arm names
    JAX_PLATFORMS=cpu python experiments/fedara_adapter_check.py --arms svd_g0.1_r6,lora_r6

Arm names: ``head`` (no adapter), ``lora``, ``svd`` + ``_lr1e-2`` (lr 1e-2, else 2e-3),
``_lamK`` (lambda's lr K times the rest), ``_sq`` (squared Frobenius penalty, else plain),
``_hold50`` (gamma 0 for steps 0-49) / ``_ramp100`` (gamma ramped linearly over 100 steps),
``_gG`` (penalty weight), then ``_r6`` (Adam state re-created every 6 steps) or ``_nr`` (never),
then ``_s1`` for seed 1 (adapter init and batch order; seed 0 has no suffix).

The optimizer is ``optax.adamw(1.0, weight_decay=0)`` followed by a multiplication of the
updates by the arm's learning rate (so lr is a runtime argument and all SVD arms share one
compiled step) and of the lambda (``e``) part by ``lam_mult``: equal to ``optax.adamw(lr)``
with lambda's learning rate ``lam_mult * lr``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("FEDLORA_DATA_DIR", "/work/shared/data")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedlora_jax import data as data_lib  # noqa: E402
from fedlora_jax import lora as lora_lib  # noqa: E402
from fedlora_jax.algorithms import rank_rules  # noqa: E402
from fedlora_jax.driver.tasks import classification_task  # noqa: E402
from fedlora_jax.lora import LoraFactors  # noqa: E402
from fedlora_jax.models import loading as model_loading  # noqa: E402
from fedlora_jax.models.common import functional_forward, split_for_round  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results" / "fedara_adapter" / "check.jsonl"

MODEL = "all-MiniLM-L6-v2"
DATASET = "agnews"
MAX_LENGTH = 40
BATCH = 16
NUM_CLIENTS = 20
CLIENT = 0
TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
R_MAX = 12
LORA_ALPHA = 16.0
SCALE = LORA_ALPHA / R_MAX
CHECKPOINTS = (0, 25, 50, 75, 100)
PROBE_STEPS = 20  # the probe set is the last 20 steps' batches
EVAL_CHUNK = 80


# ----------------------------------------------------------------------------------------- arms

def _arm(kind, lr, *, gamma=0.0, penalty="plain", lam_mult=1.0, warmup="none", reset=0, seed=0):
    return dict(kind=kind, lr=lr, gamma=gamma, penalty=penalty, lam_mult=lam_mult, warmup=warmup,
                reset_every=reset, seed=seed)


def _base_arms() -> dict:
    """``{suffix-less name: settings}`` (reset and seed are added in :func:`all_arms`)."""
    return {
        "head": _arm("head", 2e-3),
        "lora": _arm("lora", 2e-3),
        "svd_g0.1": _arm("svd", 2e-3, gamma=0.1),                      # today's default
        "svd_g0": _arm("svd", 2e-3, gamma=0.0),
        "svd_g0.01": _arm("svd", 2e-3, gamma=0.01),
        "svd_lr1e-2_g0.1": _arm("svd", 1e-2, gamma=0.1),
        "svd_lr1e-2_g0": _arm("svd", 1e-2, gamma=0.0),
        "svd_lam10_g0.1": _arm("svd", 2e-3, gamma=0.1, lam_mult=10.0),
        "svd_lam10_g0": _arm("svd", 2e-3, gamma=0.0, lam_mult=10.0),
        "svd_lam30_g0.1": _arm("svd", 2e-3, gamma=0.1, lam_mult=30.0),
        "svd_sq_g0.1": _arm("svd", 2e-3, gamma=0.1, penalty="squared"),
        "svd_sq_lam10_g0.1": _arm("svd", 2e-3, gamma=0.1, penalty="squared", lam_mult=10.0),
        "svd_hold50_g0.1": _arm("svd", 2e-3, gamma=0.1, warmup="hold:50"),
        "svd_ramp100_g0.1": _arm("svd", 2e-3, gamma=0.1, warmup="ramp:100"),
        "svd_lam10_hold50_g0.1": _arm("svd", 2e-3, gamma=0.1, lam_mult=10.0, warmup="hold:50"),
    }


def all_arms() -> dict:
    arms = {}
    for seed in (0, 1):
        for reset in (6, 0):
            for name, a in _base_arms().items():
                full = f"{name}_{'r6' if reset else 'nr'}" + (f"_s{seed}" if seed else "")
                arms[full] = dict(a, reset_every=reset, seed=seed)
    return arms


# The default run list, most important first (Adam-reset variants are what the federated run
# sees). This is what produced experiments/results/fedara_adapter/check.jsonl (17 arms, ~20 min
# on 2 shared CPU cores); every other name in all_arms() (e.g. gamma 0.01, lambda x30, no-reset
# variants of the fixes) runs with --arms.
DEFAULT_ARMS = (
    "head_r6", "lora_r6", "svd_g0.1_r6", "svd_g0_r6", "svd_lr1e-2_g0.1_r6", "svd_lam10_g0.1_r6",
    "svd_sq_g0.1_r6", "svd_hold50_g0.1_r6", "svd_ramp100_g0.1_r6", "lora_nr", "svd_g0.1_nr",
    # second seed for the references and the top candidates, and the combined fix
    "lora_r6_s1", "svd_g0.1_r6_s1", "svd_lam10_g0.1_r6_s1", "svd_lam10_hold50_g0.1_r6",
    "svd_lam10_hold50_g0.1_r6_s1", "svd_lr1e-2_g0.1_r6_s1",
)


def gamma_at(arm: dict, step: int) -> float:
    g, w = arm["gamma"], arm["warmup"]
    if w == "none":
        return g
    kind, n = w.split(":")
    n = int(n)
    if kind == "hold":
        return 0.0 if step < n else g
    if kind == "ramp":
        return g * min(1.0, step / n)
    raise ValueError(f"unknown warmup {w!r}")


# ---------------------------------------------------------------------------------------- setup

def build():
    t0 = time.time()
    train_ds = data_lib.load_text_classification(DATASET, split="train")
    test_ds = data_lib.load_text_classification(DATASET, split="test", label_names=train_ds.label_names)
    num_labels = len(train_ds.label_names)
    model = model_loading.from_pretrained(MODEL, num_labels=num_labels, key=jax.random.key(0))
    tokenizer = model_loading.load_tokenizer(model_loading.resolve_model_dir(MODEL))
    train = data_lib.tokenize(train_ds, tokenizer, max_length=MAX_LENGTH)
    test = data_lib.tokenize(test_ds, tokenizer, max_length=MAX_LENGTH)
    parts = data_lib.iid_partition(len(train.labels), NUM_CLIENTS, seed=0)
    client_idx = np.asarray(parts[CLIENT])
    targets = model.adapter_targets(list(TARGETS))
    shapes = {k: (t.in_features, t.out_features) for k, t in targets.items()}
    graphdef, base, head0 = split_for_round(model)
    print(f"setup: {len(client_idx)} client examples / {len(test.labels)} test, {num_labels} labels, "
          f"{len(shapes)} modules, {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return dict(train=train, test=test, client_idx=client_idx, shapes=shapes, graphdef=graphdef,
                base=base, head0=head0, num_labels=num_labels, train_examples=len(train.labels))


def batch_indices(client_idx: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """``[steps, BATCH]`` indices: epochs of fresh permutations of the client's examples."""
    rng = np.random.default_rng([seed, 12345])
    need = steps * BATCH
    order = []
    while sum(len(o) for o in order) < need:
        order.append(rng.permutation(client_idx))
    return np.concatenate(order)[:need].reshape(steps, BATCH)


def take(tok, idx: np.ndarray) -> dict:
    return {"input_ids": jnp.asarray(tok.input_ids[idx]), "attention_mask": jnp.asarray(tok.attention_mask[idx]),
            "labels": jnp.asarray(tok.labels[idx]), "example_mask": jnp.ones(idx.shape, jnp.float32)}


def eval_chunks(tok, idx: np.ndarray) -> list:
    """Chunks of EVAL_CHUNK examples (the last padded, padding rows masked out)."""
    out = []
    for s in range(0, len(idx), EVAL_CHUNK):
        part = idx[s:s + EVAL_CHUNK]
        n = len(part)
        pad = np.concatenate([part, np.full(EVAL_CHUNK - n, part[0])])
        b = take(tok, pad)
        b["example_mask"] = jnp.asarray((np.arange(EVAL_CHUNK) < n).astype(np.float32))
        out.append(b)
    return out


# ------------------------------------------------------------------------------------- penalties

def orth_squared(lora: dict) -> jax.Array:
    """Mean over matrices of ``||QQ^T - I||_F^2`` and ``||P^TP - I||_F^2`` (all slots active)."""
    total, n = 0.0, 0
    for f in lora.values():
        a, b = f.a.astype(jnp.float32), f.b.astype(jnp.float32)
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
        total = total + jnp.sum((a.T @ a - eye) ** 2) + jnp.sum((b @ b.T - eye) ** 2)
        n += 2
    return total / max(n, 1)


def orth_plain(lora: dict) -> jax.Array:
    return rank_rules.orth_regularizer(lora, None)


# -------------------------------------------------------------------------------------- compiled

def make_fns(graphdef, base):
    task = classification_task(graphdef, scale=SCALE, remat=False)
    opt = optax.adamw(1.0, weight_decay=0.0)

    def loss_fn(tr, batch, g_plain, g_sq):
        ce, aux = task.loss(tr, base, batch, None, None, jax.random.key(0))
        lora = tr["lora"]
        if lora:
            pen_p, pen_s = orth_plain(lora), orth_squared(lora)
        else:
            pen_p = pen_s = jnp.zeros((), jnp.float32)
        return ce + g_plain * pen_p + g_sq * pen_s, (ce, pen_p, pen_s, aux["correct"])

    @jax.jit
    def step(tr, ost, batch, lr, lam_mult, g_plain, g_sq):
        (_, (ce, pen_p, pen_s, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            tr, batch, g_plain, g_sq)
        updates, ost = opt.update(grads, ost, tr)
        updates = jax.tree.map(lambda u: lr * u, updates)
        updates = dict(updates, lora={
            k: LoraFactors(f.a, f.b, None if f.e is None else lam_mult * f.e)
            for k, f in updates["lora"].items()})
        tr = optax.apply_updates(tr, updates)
        ge = [grads["lora"][k].e for k in sorted(grads["lora"]) if grads["lora"][k].e is not None]
        ge = jnp.concatenate(ge) if ge else jnp.zeros((0,), jnp.float32)
        return tr, ost, ce, pen_p, pen_s, correct, ge

    @jax.jit
    def evaluate(tr, batch):
        logits = functional_forward(graphdef, base, tr["head"], batch["input_ids"], batch["attention_mask"],
                                    lora=tr["lora"], masks=None, scale=SCALE).astype(jnp.float32)
        ex = batch["example_mask"]
        ll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        hit = (jnp.argmax(logits, -1) == batch["labels"]) * ex
        return jnp.sum(ll * ex), jnp.sum(hit), jnp.sum(ex)

    @jax.jit
    def adapter_stats(lora):
        dnorm = 0.0
        lam = []
        for f in lora.values():
            d = lora_lib.delta(f, None, scale=SCALE)
            dnorm = dnorm + jnp.sqrt(jnp.sum(d.astype(jnp.float32) ** 2))
            if f.e is not None:
                lam.append(jnp.abs(f.e))
        lam = jnp.mean(jnp.concatenate(lam)) if lam else jnp.full((), jnp.nan)
        return dnorm, lam

    return opt, step, evaluate, adapter_stats


def run_eval(evaluate, tr, chunks) -> tuple[float, float]:
    ls, hs, ns = 0.0, 0.0, 0.0
    for b in chunks:
        l, h, n = evaluate(tr, b)
        ls, hs, ns = ls + float(l), hs + float(h), ns + float(n)
    return ls / ns, hs / ns


# ------------------------------------------------------------------------------------------ arm

def run_arm(name: str, arm: dict, env: dict, fns, *, steps: int, test_size: int) -> dict:
    opt, step, evaluate, adapter_stats = fns
    t0 = time.time()
    seed = arm["seed"]
    if arm["kind"] == "head":
        lora = {}
    else:
        scheme = "svd_form" if arm["kind"] == "svd" else "a_random_b_zero"
        lora = lora_lib.init(jax.random.fold_in(jax.random.key(seed), 7), env["shapes"], R_MAX, scheme=scheme)
    tr = {"lora": lora, "head": env["head0"]}
    ost = opt.init(tr)
    bidx = batch_indices(env["client_idx"], steps, seed)
    probe = eval_chunks(env["train"], bidx[-PROBE_STEPS:].reshape(-1))
    test_chunks = eval_chunks(env["test"], np.arange(min(test_size, len(env["test"].labels))))
    gp_w = 1.0 if arm["penalty"] == "plain" else 0.0
    checkpoints = tuple(c for c in CHECKPOINTS if c <= steps)
    probe_loss, probe_acc, mb_loss, dnorm_at, lam_at = {}, {}, {}, {}, {}
    ces, pens_p, pens_s, corrects = [], [], [], []
    flips, pairs, prev_ge = 0, 0, None
    resets = 0
    for s in range(steps + 1):
        if s in checkpoints:
            probe_loss[s], probe_acc[s] = run_eval(evaluate, tr, probe)
            if lora:
                d, lam = adapter_stats(tr["lora"])
                dnorm_at[s], lam_at[s] = float(d), float(lam)
        if s == steps:
            break
        if arm["reset_every"] and s > 0 and s % arm["reset_every"] == 0:
            ost = opt.init(tr)
            resets += 1
        g = gamma_at(arm, s)
        tr, ost, ce, pen_p, pen_s, correct, ge = step(
            tr, ost, take(env["train"], bidx[s]), jnp.float32(arm["lr"]), jnp.float32(arm["lam_mult"]),
            jnp.float32(g * gp_w), jnp.float32(g * (1.0 - gp_w)))
        ces.append(float(ce))
        pens_p.append(float(pen_p))
        pens_s.append(float(pen_s))
        corrects.append(float(correct))
        ge = np.asarray(ge)
        if ge.size:
            if prev_ge is not None:
                both = (ge != 0) & (prev_ge != 0)
                flips += int(np.sum((np.sign(ge) != np.sign(prev_ge)) & both))
                pairs += int(np.sum(both))
            prev_ge = ge
        if s == 0:
            t_first = time.time() - t0
    mb_loss = {c: ces[min(c, steps - 1)] for c in checkpoints}
    test_loss, test_acc = run_eval(evaluate, tr, test_chunks)
    if lora:
        d, lam = adapter_stats(tr["lora"])
        dnorm, lam = float(d), float(lam)
        pen_plain, pen_sq = float(orth_plain(tr["lora"])), float(orth_squared(tr["lora"]))
    else:
        dnorm, lam, pen_plain, pen_sq = 0.0, None, None, None
    last = slice(max(0, steps - PROBE_STEPS), steps)
    rec = {
        "arm": name, **arm, "steps": steps, "batch": BATCH, "r_max": R_MAX, "lora_alpha": LORA_ALPHA,
        "scale": SCALE, "n_modules": len(lora),
        "probe_loss": {str(k): round(v, 5) for k, v in probe_loss.items()},
        "probe_acc": {str(k): round(v, 5) for k, v in probe_acc.items()},
        "minibatch_loss": {str(k): round(v, 5) for k, v in mb_loss.items()},
        "final_train_loss": round(probe_loss[checkpoints[-1]], 5),
        "final_train_acc": round(probe_acc[checkpoints[-1]], 5),
        "last20_running_loss": round(float(np.mean(ces[last])), 5),
        "last20_running_acc": round(float(np.sum(corrects[last]) / (BATCH * len(ces[last]))), 5),
        "test_loss": round(test_loss, 5), "test_acc": round(test_acc, 5),
        "test_size": int(min(test_size, len(env["test"].labels))),
        "mean_abs_lambda": None if lam is None or np.isnan(lam) else round(lam, 6),
        "delta_w_norm_sum": round(dnorm, 5),
        "delta_w_norm_sum_at": {str(k): round(v, 5) for k, v in dnorm_at.items()},
        "mean_abs_lambda_at": ({str(k): round(v, 6) for k, v in lam_at.items()}
                               if arm["kind"] == "svd" else None),
        "orth_plain_start": round(pens_p[0], 5) if lora else None,
        "orth_plain_end": None if pen_plain is None else round(pen_plain, 5),
        "orth_squared_end": None if pen_sq is None else round(pen_sq, 5),
        "lambda_grad_sign_flip_frac": round(flips / pairs, 4) if pairs else None,
        "adam_resets": resets,
        "wall_s": round(time.time() - t0, 2), "first_step_s": round(t_first, 2),
    }
    return rec


# ------------------------------------------------------------------------------------------ main

def _library_commit(checkout_commit: str) -> str:
    """The commit the imported ``fedlora_jax`` came from: ``$FEDLORA_LIB_COMMIT`` when set (name
    the commit of a ``git archive`` snapshot there), the checkout's commit plus ``+dirty`` when it
    is imported from this checkout with local changes, else ``"unknown"``."""
    if os.environ.get("FEDLORA_LIB_COMMIT"):
        return os.environ["FEDLORA_LIB_COMMIT"]
    lib = Path(lora_lib.__file__).resolve().parents[1]
    if lib.parent != REPO:
        return "unknown"
    try:
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "fedlora_jax"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return checkout_commit + ("+dirty" if dirty else "")


def metadata() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
            "git_commit": commit, "fedlora_jax_path": str(Path(lora_lib.__file__).resolve().parents[1]),
            "library_commit": _library_commit(commit),
            "pythonpath": os.environ.get("PYTHONPATH", "")}


def done_arms(path: Path) -> set:
    if not path.is_file():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.add(json.loads(line)["arm"])
        except (json.JSONDecodeError, KeyError):
            continue  # a torn last line from an interrupted write: that arm is rerun
    return out


def append_line(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes() if path.is_file() else b""
    if data and not data.endswith(b"\n"):  # drop a torn last line
        data = data[:data.rfind(b"\n") + 1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data + (json.dumps(rec) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def table(path: Path) -> str:
    """A markdown table of the results in ``path`` (one row per arm, in file order)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    head = ("| arm | lr | lam x | gamma | penalty | warm-up | reset | seed | probe loss @0/25/50/75/100 | "
            "final train acc | held-out acc | mean abs lambda | sum norm dW | lambda-grad flips | s |")
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        pl = "/".join(f"{r['probe_loss'][k]:.3f}" for k in r["probe_loss"])
        lam = "-" if r["mean_abs_lambda"] is None else f"{r['mean_abs_lambda']:.3f}"
        fl = "-" if r["lambda_grad_sign_flip_frac"] is None else f"{r['lambda_grad_sign_flip_frac']:.2f}"
        svd = r["kind"] == "svd"
        gamma = f"{r['gamma']:g}" if svd else "-"
        pen = r["penalty"] if svd else "-"
        warm = r["warmup"] if svd else "-"
        lamx = f"{r['lam_mult']:g}" if svd else "-"
        out.append(f"| {r['arm']} | {r['lr']:g} | {lamx} | {gamma} | {pen} | {warm} | {r['reset_every'] or '-'} | "
                   f"{r['seed']} | {pl} | {r['final_train_acc']:.3f} | {r['test_acc']:.3f} | {lam} | "
                   f"{r['delta_w_norm_sum']:.1f} | {fl} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="default",
                   help="comma-separated arm names, 'default' (the prioritised list) or 'all'")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="stop starting new arms after this many seconds (0: no limit)")
    p.add_argument("--list", action="store_true", help="print the arm names and exit")
    p.add_argument("--table", action="store_true", help="print a markdown table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    arms = all_arms()
    if args.list:
        for k, v in arms.items():
            print(k, json.dumps(v))
        return 0
    names = (list(DEFAULT_ARMS) if args.arms == "default" else list(arms) if args.arms == "all"
             else [a.strip() for a in args.arms.split(",") if a.strip()])
    unknown = [n for n in names if n not in arms]
    if unknown:
        p.error(f"unknown arms {unknown}; see --list")
    done = done_arms(args.out)
    todo = [n for n in names if n not in done]
    print(f"{len(names) - len(todo)} arms already in {args.out}, {len(todo)} to run", file=sys.stderr)
    if not todo:
        return 0
    t_start = time.time()
    env = build()
    fns = make_fns(env["graphdef"], env["base"])
    meta = dict(metadata(), model=MODEL, dataset=DATASET, max_length=MAX_LENGTH, num_clients=NUM_CLIENTS,
                client=CLIENT, client_examples=int(len(env["client_idx"])), targets=list(TARGETS),
                train_examples=env["train_examples"])
    for n in todo:
        if args.budget_s and time.time() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f}s spent; stopping before {n}", file=sys.stderr)
            break
        rec = run_arm(n, arms[n], env, fns, steps=args.steps, test_size=args.test_size)
        rec["meta"] = meta
        append_line(args.out, rec)
        pl = rec["probe_loss"]
        print(f"{n:28s} loss {' '.join(f'{pl[k]:.3f}' for k in pl)}  train_acc {rec['final_train_acc']:.3f} "
              f"test_acc {rec['test_acc']:.3f}  |lam| {rec['mean_abs_lambda']}  "
              f"||dW|| {rec['delta_w_norm_sum']:.3f}  flips {rec['lambda_grad_sign_flip_frac']}  "
              f"{rec['wall_s']:.1f}s", file=sys.stderr, flush=True)
    print(f"total {time.time() - t_start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
