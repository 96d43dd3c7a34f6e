"""Peer baseline at the LLM shape: a federated LoRA round of a causal LM the way PyTorch FL
stacks simulate it (FederatedScope-LLM / OpenFedLLM style), for ``round_bench.py --size smollm2``.

The structure of the project's encoder peer (``shared/bench/peer_torch_peft.py``), extended to
a decoder and heterogeneous ranks: one shared ``transformers.LlamaForCausalLM`` of the
benchmark's config with random weights; one peft LoRA adapter per distinct rank on the same
modules (``q_proj, k_proj, v_proj, o_proj``; ``lora_alpha = 2 r``, so the scale is 2 as ours);
clients one after another in a Python loop: load the global adapter truncated to the client's
rank (HetLoRA distribution), fresh AdamW (lr 1e-4), ``S`` steps of next-token cross-entropy on
every token (``labels = input_ids``), then FedAvg of the adapters zero-padded to ``r_max``
(= our ``fedit`` with heterogeneous masks). Hand-written loop (no HF Trainer): the *fast*
sequential baseline. Prints one JSON line per configuration (best round after the first).
``--dtype bf16``: the frozen base in bfloat16, the adapters in float32 (peft's default
``autocast_adapter_dtype``), the usual way an LLM is LoRA-tuned.

    python benchmarks/peer_llama_peft.py --size smollm2 --clients 4 --steps 2 --batch 4 --seq 64 --ranks 4 8 16
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {  # the same shapes as round_bench.LLM_SIZES
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

p = argparse.ArgumentParser()
p.add_argument("--size", default="smollm2", choices=list(SIZES))
p.add_argument("--clients", type=int, nargs="+", default=[4])
p.add_argument("--steps", type=int, default=2)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=64)
p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
a = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
kw = dict(SIZES[a.size])
theta = kw.pop("rope_theta")
try:   # transformers 5 reads rope_parameters; 4.x reads rope_theta
    cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta})
except TypeError:
    cfg = LlamaConfig(**kw, rope_theta=theta)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
if a.dtype == "bf16":
    model = model.to(torch.bfloat16)
r_max = max(a.ranks)
names = {r: f"r{r}" for r in sorted(set(a.ranks))}
lora = lambda r: LoraConfig(r=r, lora_alpha=2 * r, target_modules=MODULES, lora_dropout=0.0,
                            task_type="CAUSAL_LM")
first, *rest = sorted(names)
model = get_peft_model(model, lora(first), adapter_name=names[first])
for r in rest:
    model.add_adapter(names[r], lora(r))
model = model.to(dev)
# the global adapter at r_max (A random, B zero: peft's default init), in peft's layout
if r_max not in names:
    raise SystemExit("r_max must be one of --ranks")
glob0 = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=names[r_max]).items()}


def truncate(sd, r):
    """Prefix truncation to rank r: lora_A.weight [R, N] -> [r, N], lora_B.weight [M, R] -> [M, r]."""
    return {k: (v[:r] if "lora_A" in k else v[:, :r]).clone() for k, v in sd.items()}


def pad(sd, r):
    """Zero padding back to r_max."""
    out = {}
    for k, v in sd.items():
        z = torch.zeros_like(glob0[k])
        if "lora_A" in k:
            z[:r] = v
        else:
            z[:, :r] = v
        out[k] = z
    return out


n_trainable = {r: sum(v.numel() for v in truncate(glob0, r).values()) for r in names}
base = model.get_base_model()
assert base.lm_head.weight is base.model.embed_tokens.weight, "tied embeddings"


def vm_hwm_mb():
    """This process's peak resident memory (VmHWM, MiB; reset at exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def client_batches(c, steps):
    g = torch.Generator().manual_seed(c)
    return torch.randint(3, cfg.vocab_size, (steps, a.batch, a.seq), generator=g).to(dev)


for C in a.clients:
    ranks = [a.ranks[c % len(a.ranks)] for c in range(C)]
    data = [client_batches(c, a.steps) for c in range(C)]
    glob = {k: v.clone() for k, v in glob0.items()}
    times, losses = [], []
    for _ in range(a.rounds):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        for c in range(C):
            r = ranks[c]
            model.set_adapter(names[r])            # only this adapter active and trainable
            set_peft_model_state_dict(model, truncate(glob, r), adapter_name=names[r])
            params = [q for q in model.parameters() if q.requires_grad]
            assert sum(q.numel() for q in params) == n_trainable[r], "only the client's adapter trains"
            opt = torch.optim.AdamW(params, lr=1e-4)
            x = data[c]
            model.train()
            for s in range(a.steps):
                loss = model(input_ids=x[s], labels=x[s]).loss   # shifted inside: T - 1 targets
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            for k, v in pad(get_peft_model_state_dict(model, adapter_name=names[r]), r).items():
                acc[k] += v.detach() / C
        glob = acc
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = min(times[1:]) if len(times) > 1 else times[0]
    tokens = C * a.steps * a.batch * a.seq
    print(json.dumps(dict(system="torch+peft sequential (LlamaForCausalLM)",
                          device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                          torch=torch.__version__, torch_threads=torch.get_num_threads(),
                          attn_implementation=getattr(model.config, "_attn_implementation", None),
                          size=a.size, task="causal_lm", modules=MODULES, ranks=ranks, r_max=r_max,
                          trainable_params_per_rank=n_trainable, clients=C, steps=a.steps,
                          batch=a.batch, seq=a.seq, dtype=a.dtype, round_s=round(t, 4),
                          adapter_dtype=str(glob0[next(iter(glob0))].dtype).replace("torch.", ""),
                          round_times=[round(x, 4) for x in times], client_steps_per_s=round(C * a.steps / t, 3),
                          tokens_per_s=round(tokens / t), mean_last_step_loss=round(sum(losses[-C:]) / C, 4),
                          self_vmhwm_mb=vm_hwm_mb())),
          flush=True)
