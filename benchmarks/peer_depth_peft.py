"""Depth-aware peer: a federated LoRA round with LEGEND-style per-client depths, the way a
PyTorch FL stack would simulate it (built on ``../shared/bench/peer_torch_peft.py``).

One shared frozen RoBERTa-shaped base (random weights); for every distinct client
configuration (per-layer ranks, 0 = no adapter) a peft LoRA model with adapters ONLY on the
adapted layers' ``query`` / ``value`` at that layer's rank (``rank_pattern``; ``lora_alpha =
2 r`` per module, so the scale is 2 as in the base peer and ours). peft leaves
``requires_grad`` on the LoRA factors (and the classifier head) only, checked below, so
nothing below the lowest adapted layer needs a gradient and torch's autograd records no
backward graph there: a shallow client pays only for its depth.

Clients run one after another: the global adapter (padded to ``r_max`` per module) is
copied in (its first ``r`` slots), a fresh AdamW trains ``S`` steps, the result is added
back zero-padded (FedAvg with zero padding, equal weights, ``/ C``; the head is averaged
over all clients). Hand-written loop (no HF Trainer), tensor copies instead of state-dict
round trips: the fast sequential baseline.

``--plan`` gives every client's per-layer ranks as JSON (``[[r_0 .. r_{L-1}], ...]``, one
list per client). Without ``--serve`` it runs ``--rounds`` rounds and prints one JSON line.
With ``--serve`` it prints a ``{"ready": ...}`` line after setup, then runs one round per
``round`` line read from stdin (printing ``{"round_s": ...}``) and, at ``quit`` or EOF, the
summary line: so a driver can alternate its rounds with ours in one invocation.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import RobertaConfig, RobertaForSequenceClassification

SIZES = {
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128),
}
MODULES = ("query", "value")


def vm_hwm_mb() -> float | None:
    """This process's peak RSS (VmHWM, MiB); restarts at exec, so it is the peer's own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def module_name(layer: int, mod: str) -> str:
    return f"roberta.encoder.layer.{layer}.attention.self.{mod}"


class DepthPeer:
    def __init__(self, a):
        self.a = a
        torch.manual_seed(0)
        if a.threads:
            torch.set_num_threads(a.threads)
        self.cfg = RobertaConfig(max_position_embeddings=514, num_labels=20, **SIZES[a.size])
        L = self.cfg.num_hidden_layers
        self.plan = [tuple(int(r) for r in p) for p in json.loads(a.plan)] if a.plan else [(a.rmax,) * L] * a.clients
        if len(self.plan) != a.clients or any(len(p) != L or min(p) < 0 or max(p) > a.rmax for p in self.plan):
            raise SystemExit(f"--plan must list {a.clients} clients x {L} layer ranks in [0, {a.rmax}]")
        base = RobertaForSequenceClassification(self.cfg).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        self.models, self.handles, self.trainable = {}, {}, {}
        for ranks in sorted(set(self.plan)):
            if max(ranks) == 0:
                raise SystemExit("a client without any adapted layer is not supported")
            names = [module_name(i, m) for i, r in enumerate(ranks) if r for m in MODULES]
            rank_pattern = {module_name(i, m): r for i, r in enumerate(ranks) if r for m in MODULES}
            cfg = LoraConfig(r=a.rmax, lora_alpha=2 * a.rmax, target_modules=names, rank_pattern=rank_pattern,
                             alpha_pattern={k: 2 * v for k, v in rank_pattern.items()}, task_type="SEQ_CLS")
            model = get_peft_model(copy.deepcopy(base), cfg)
            model.train()
            for n, p in model.named_parameters():   # only LoRA factors of adapted layers + the head
                want = "lora_" in n or "classifier.modules_to_save" in n
                if p.requires_grad != want:
                    raise SystemExit(f"unexpected requires_grad={p.requires_grad} on {n}")
                if "lora_" in n and not any(f"layer.{i}." in n for i, r in enumerate(ranks) if r):
                    raise SystemExit(f"adapter outside the client's depth: {n}")
            mods = dict(model.named_modules())
            h = {}
            for i, r in enumerate(ranks):
                for m in MODULES:
                    if r:
                        lm = mods["base_model.model." + module_name(i, m)]
                        h[(i, m)] = (r, lm.lora_A["default"].weight, lm.lora_B["default"].weight)
            head = {n: p for n, p in model.named_parameters() if "classifier.modules_to_save" in n}
            self.models[ranks], self.handles[ranks] = model, (h, head)
            self.trainable[ranks] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # global adapters, r_max per module (A [R, N] random, B [M, R] zero, peft's layout)
        g = torch.Generator().manual_seed(1)
        H = self.cfg.hidden_size
        self.glob = {(i, m): (torch.randn(a.rmax, H, generator=g) * 0.02, torch.zeros(H, a.rmax))
                     for i in range(L) for m in MODULES}
        any_head = next(iter(self.handles.values()))[1]
        self.glob_head = {self._head_key(n): p.detach().clone() for n, p in any_head.items()}
        self.data = [self._client_batches(c) for c in range(a.clients)]
        self.times: list[float] = []

    @staticmethod
    def _head_key(name: str) -> str:
        return name.split("classifier.", 1)[1]

    def _client_batches(self, c):
        g = torch.Generator().manual_seed(c)
        a = self.a
        x = torch.randint(3, self.cfg.vocab_size, (a.steps, a.batch, a.seq), generator=g)
        y = torch.randint(0, self.cfg.num_labels, (a.steps, a.batch), generator=g)
        return x, y

    def round(self) -> float:
        a, C = self.a, self.a.clients
        t0 = time.perf_counter()
        acc = {k: (torch.zeros_like(A), torch.zeros_like(B)) for k, (A, B) in self.glob.items()}
        acc_head = {k: torch.zeros_like(v) for k, v in self.glob_head.items()}
        for c in range(C):
            ranks = self.plan[c]
            model, (h, head) = self.models[ranks], self.handles[ranks]
            with torch.no_grad():
                for k, (r, pa, pb) in h.items():
                    pa.copy_(self.glob[k][0][:r])
                    pb.copy_(self.glob[k][1][:, :r])
                for n, p in head.items():
                    p.copy_(self.glob_head[self._head_key(n)])
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            x, y = self.data[c]
            for s in range(a.steps):
                loss = model(input_ids=x[s], labels=y[s]).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():   # zero-padding FedAvg: unadapted slots / layers add 0
                for k, (r, pa, pb) in h.items():
                    acc[k][0][:r] += pa / C
                    acc[k][1][:, :r] += pb / C
                for n, p in head.items():
                    acc_head[self._head_key(n)] += p / C
        self.glob, self.glob_head = acc, acc_head
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt

    def summary(self) -> dict:
        a, C = self.a, self.a.clients
        t = min(self.times) if self.times else None
        depths = [sum(1 for r in p if r) for p in self.plan]
        return dict(system="torch+peft sequential, depth-aware (requires_grad only on adapted layers)",
                    device="cpu", torch=torch.__version__, threads=torch.get_num_threads(), size=a.size,
                    clients=C, steps=a.steps, batch=a.batch, seq=a.seq, r_max=a.rmax, depths=depths,
                    plan=[list(p) for p in self.plan],
                    trainable_params={",".join(map(str, k)): v for k, v in self.trainable.items()},
                    round_s=None if t is None else round(t, 4), round_times=[round(x, 4) for x in self.times],
                    client_steps_per_s=None if t is None else round(C * a.steps / t, 3),
                    peer_process_peak_rss_mb=vm_hwm_mb())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="minilm", choices=list(SIZES))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rmax", type=int, default=8)
    p.add_argument("--plan", default=None, help="JSON [[layer ranks] per client]; default: every layer at rmax")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--serve", action="store_true", help="one round per 'round' line on stdin (see module doc)")
    a = p.parse_args()
    t0 = time.perf_counter()
    peer = DepthPeer(a)
    setup_s = round(time.perf_counter() - t0, 2)
    if not a.serve:
        for _ in range(a.rounds):
            peer.round()
        if len(peer.times) > 1:
            peer.times = peer.times[1:]           # the first round warms torch up, as the base peer
        print(json.dumps(dict(peer.summary(), setup_s=setup_s)), flush=True)
        return
    print(json.dumps({"ready": True, "setup_s": setup_s}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            print(json.dumps({"round_s": round(peer.round(), 4)}), flush=True)
        elif cmd == "quit":
            break
    print(json.dumps(dict(peer.summary(), setup_s=setup_s)), flush=True)


if __name__ == "__main__":
    main()
