"""FedARA (Wu et al., arXiv 2501.14406), as reconstructed in ``shared/papers/fedara_legend.md`` 1.2-1.4.

- SVD-form adapters: ``delta_w = scale * a diag(z * lambda) b`` (``a = Q^T``, ``b = P^T``,
  ``e = lambda = 0`` at init, AdaLoRA's init), trained with the AdaLoRA orthogonality
  regulariser ``gamma * R(P, Q)`` on every client.
- Importance: AdaLoRA's triplet scores (EMA of ``|w * g|`` times its uncertainty) on every
  client (EMA reset each client round: ASSUMPTION), aggregated by the server per triplet with
  data weights and smoothed across rounds (aggregator option ``score_beta``; default 0.5 here,
  ASSUMPTION, measured: ``experiments/results/fedara_score_stability/``: the round-to-round rank
  correlation of the allocator's input settles after 2-3 rounds and stays at 0.97-0.99 with
  0.5 against 0.90-0.975 without smoothing, which drops to 0.90 when the sampled clients change).
- Rank allocation: a cubic budget indexed by round from ``b0 = n * r_max`` to
  ``b_T = n * target_rank`` (warm-up ``t_init_frac * T``, final phase ``t_final_frac * T``;
  defaults 0.25 / 0.25 so the first cut comes after the scores have settled, see above),
  a global *nested* top-b mask ``z`` (a pruned triplet is never trained or sent again), inside
  the compiled round (:attr:`Algorithm.server_update`) from the aggregator's smoothed scores.
- Module pruning: ``z`` is the clients' shared forward mask (``ClientPlan.global_masks``), so a
  module with no active triplet does no adapter matmul, and no backward pass runs below the
  lowest active layer (``static_cut=True`` removes it from the compiled program; the round is
  recompiled each time that layer moves up, at most ``L`` times).

Learning at our scale (ASSUMPTION, measured): ``lambda_lr_scale=10`` (default) multiplies the
optimizer's updates of ``lambda`` only (a 10x learning rate for the singular values). One client,
100 AdamW steps at lr 2e-3 with Adam reset every 6 steps (a federated client's view), MiniLM-L6
on AG News, 36 modules at r0 = 12 (``experiments/fedara_adapter_check.py``, results and table in
``experiments/results/fedara_adapter/``), training loss at step 25 / 100, mean of 2 seeds:
LoRA 0.435 / 0.104; the SVD form at LoRA's settings (gamma 0.1) 0.949 / 0.185 (the first ~25
steps do almost nothing: the head-only floor is 1.064 / 0.573); with ``lambda_lr_scale=10``
0.498 / 0.115, level with LoRA within seed noise. Holding the penalty off early (gamma 0,
``orth_warmup_frac``) removes the early stall but not the final gap (0.153-0.160); the squared
penalty (``orth_form="fro_sq"``) changes nothing (0.919 / 0.164). ``orth_form`` and
``orth_warmup_frac`` stay options; the defaults are PEFT's plain norm and no warm-up.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as agg_lib
from fedlora_jax import importance as imp
from fedlora_jax.algorithms import rank_rules
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientOptions, ClientPlan

#: FedARA's default cross-round smoothing of the aggregated scores (ASSUMPTION, see above).
DEFAULT_SCORE_BETA = 0.5


class FedaraState(NamedTuple):
    """Attributes: z: ``{key: [R]}`` float32 global triplet mask (nested: only shrinks)."""

    z: dict


def check_fraction(name: str, value, *, upper_open: bool = False) -> float:
    v = float(value)
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):
        raise ValueError(f"option {name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return v


def budget_schedule(ctx: AlgoContext, target_rank: int, t_init_frac: float, t_final_frac: float,
                    mask_interval: int) -> imp.BudgetSchedule:
    """The cubic budget over rounds for ``n`` modules: ``n * r_max -> n * target_rank``."""
    n = len(ctx.keys)
    if not isinstance(target_rank, int) or not 1 <= target_rank <= ctx.r_max:
        raise ValueError(f"option target_rank must be an int in [1, r_max={ctx.r_max}], got {target_rank!r}")
    if not isinstance(mask_interval, int) or mask_interval < 1:
        raise ValueError(f"option mask_interval must be an int >= 1, got {mask_interval!r}")
    t_init = int(round(check_fraction("t_init_frac", t_init_frac) * ctx.rounds))
    t_final = int(round(check_fraction("t_final_frac", t_final_frac) * ctx.rounds))
    if ctx.rounds - t_init - t_final <= 0:
        raise ValueError(f"options t_init_frac={t_init_frac} and t_final_frac={t_final_frac} leave no rounds for "
                         f"the budget to decay over {ctx.rounds} rounds (need t_init + t_final < rounds)")
    return imp.BudgetSchedule(b0=n * ctx.r_max, b_final=n * target_rank, t_init=t_init, t_final=t_final,
                              total=ctx.rounds, mask_interval=mask_interval)


def shared_mask_aggregator(ctx: AlgoContext):
    """``aggregation.fedara`` with FedARA's default ``score_beta``; refuses ``averaging``, which
    cannot change anything when every client holds the same mask (``renorm`` == ``zero_pad``)."""
    if "averaging" in ctx.aggregator_options:
        raise ValueError("aggregator option averaging ('renorm' / 'zero_pad') only differs for heterogeneous "
                         "masks; every client of this algorithm holds the same mask, so it would be ignored")
    return agg_lib.fedara(**{"score_beta": DEFAULT_SCORE_BETA, **ctx.aggregator_options})


def orth_term(ctx: AlgoContext, *, gamma: float, form: str, warmup_frac: float, count: str):
    """The clients' regulariser ``(lora, masks, round) -> gamma * ramp(round) * R(P, Q)``, or ``None``."""
    if gamma < 0:
        raise ValueError(f"option orth_reg must be >= 0, got {gamma!r}")
    if gamma == 0 and (form != "fro" or warmup_frac != 0.0):
        raise ValueError("options orth_form / orth_warmup_frac shape the orthogonality penalty, which "
                         "orth_reg=0 switches off")
    if form not in rank_rules.ORTH_FORMS:
        raise ValueError(f"option orth_form must be one of {rank_rules.ORTH_FORMS}, got {form!r}")
    warm = check_fraction("orth_warmup_frac", warmup_frac, upper_open=True) * ctx.rounds
    if gamma == 0:
        return None

    def regularizer(lora, masks, round_idx):
        ramp = 1.0 if warm == 0 else jnp.minimum(1.0, (jnp.asarray(round_idx, jnp.float32) + 1.0) / warm)
        use = masks if count == "active" else None
        return gamma * ramp * rank_rules.orth_regularizer(lora, use, count=count, form=form)

    return regularizer


def lambda_scale(value) -> tuple[tuple[str, float], ...]:
    if not float(value) > 0:
        raise ValueError(f"option lambda_lr_scale must be > 0, got {value!r}")
    return () if float(value) == 1.0 else (("e", float(value)),)


def build(ctx: AlgoContext, *, target_rank: int | None = None, orth_reg: float = 0.1, orth_form: str = "fro",
          orth_warmup_frac: float = 0.0, lambda_lr_scale: float = 10.0, t_init_frac: float = 0.25,
          t_final_frac: float = 0.25, mask_interval: int = 1, r_min: int = 1, static_cut: bool = False) -> Algorithm:
    """FedARA (Wu et al., arXiv 2501.14406): SVD-form adapters whose triplets are scored by
    importance on the clients, pruned by the server to a cubic budget under one nested global
    mask ``z`` that also prunes whole modules (details: the module docstring).

    Args:
      ctx: the algorithm context.
      target_rank: final average rank per module (default ``max(1, r_max // 3)``).
      orth_reg: orthogonality weight ``gamma`` (0.1: the AdaLoRA GLUE scripts).
      orth_form: ``"fro"`` or ``"fro_sq"``.
      orth_warmup_frac: linear ramp of the penalty over this fraction of the rounds.
      lambda_lr_scale: multiplier of ``lambda``'s optimizer updates (its learning rate; 10 =
        measured default, 1 = the plain SVD form).
      t_init_frac, t_final_frac: warm-up and final phase of the budget, fractions of ``T``.
      mask_interval: re-allocate every this many rounds in the middle phase.
      r_min: a module with fewer active triplets is pruned whole (1 = only empty modules).
      static_cut: remove the backward pass below the lowest active layer statically.

    Aggregator option (``ExperimentConfig.aggregator_options``, see ``fedlora_jax.aggregation.fedara``):
    ``score_beta`` (default 0.5 here); ``averaging`` is refused (every client holds the same mask).
    """
    target = max(1, ctx.r_max // 3) if target_rank is None else target_rank
    schedule = budget_schedule(ctx, target, t_init_frac, t_final_frac, mask_interval)
    if not isinstance(r_min, int) or not 1 <= r_min <= ctx.r_max:
        raise ValueError(f"option r_min must be an int in [1, r_max={ctx.r_max}], got {r_min!r}")
    aggregator = shared_mask_aggregator(ctx)
    regularizer = orth_term(ctx, gamma=float(orth_reg), form=orth_form, warmup_frac=orth_warmup_frac, count="active")
    client = ClientOptions(track_importance=True, regularizer=regularizer, update_scale=lambda_scale(lambda_lr_scale))
    keys, r_max = ctx.keys, ctx.r_max

    def init(lora):
        del lora
        return FedaraState({k: jnp.ones((r_max,), jnp.float32) for k in keys})

    def server_update(algo_state, out):
        # out.round is the round about to start: the allocation is for it.
        z = rank_rules.fedara_allocate(algo_state.z, out.agg_state.scores, out.round, schedule, r_min=r_min,
                                       nested=True)
        return FedaraState(z)

    def plan(state, client_ids, round_idx):
        del round_idx
        z = {k: np.asarray(v, np.float32) for k, v in state.algo.z.items()}
        c = len(client_ids)
        per_client = {k: np.broadcast_to(v, (c, r_max)).copy() for k, v in z.items()}
        return ClientPlan(per_client, per_client, global_masks=z)

    options = dict(target_rank=target, orth_reg=orth_reg, orth_form=orth_form, orth_warmup_frac=orth_warmup_frac,
                   lambda_lr_scale=lambda_lr_scale, t_init_frac=t_init_frac, t_final_frac=t_final_frac,
                   mask_interval=mask_interval, r_min=r_min, static_cut=static_cut)
    return Algorithm(name="fedara", aggregator=aggregator, plan=plan, init_scheme="svd_form", client=client,
                     init=init, server_update=server_update, eval_masks=lambda s: s.z,
                     static_cut=bool(static_cut), options=options)
