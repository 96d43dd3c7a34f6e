"""AdaLoRA in federation: the faithful baseline beside FedARA (PEFT's AdaLoRA, run federatedly).

What PEFT's ``AdaLoraModel`` / ``RankAllocator`` do, moved to the server of a federation
(``shared/research/fidelity_audit.md`` section 4):

- The forward is *unmasked*: every client trains all ``r0`` triplets (forward and update masks
  all ones). A triplet is pruned only by setting its ``lambda`` to zero *in place*, here at
  distribution (``e * z``); its ``P``, ``Q`` and ``lambda`` keep training and being scored, so
  it can come back.
- The orthogonality regulariser covers every triplet (no mask; ``count="all"``).
- Allocation: a *non-nested* global top-``b(t)`` over all triplets, from the aggregated scores
  smoothed across rounds (aggregator option ``score_beta``; default 0.5, as FedARA), on the
  same cubic budget as FedARA; in the final phase the pattern is frozen (PEFT's
  ``rank_pattern``): the mask is nested from then on.
- Communication is the full initial rank up and down (nothing saved on the wire): that is
  the contrast FedARA's nested masks are meant to win.
- Evaluation uses ``lambda * z``.

ASSUMPTION: PEFT re-zeroes masked ``lambda`` every ``deltaT`` optimizer steps; here once per
round, at distribution (a client round is a few steps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from fedlora_jax.algorithms import fedara, rank_rules
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientOptions, ClientPlan


class AdaloraState(NamedTuple):
    """Attributes: z: ``{key: [R]}`` float32 global triplet mask (may revive triplets)."""

    z: dict


def build(ctx: AlgoContext, *, target_rank: int | None = None, orth_reg: float = 0.1, orth_form: str = "fro",
          orth_warmup_frac: float = 0.0, lambda_lr_scale: float = 10.0, t_init_frac: float = 0.25,
          t_final_frac: float = 0.25, mask_interval: int = 1) -> Algorithm:
    """AdaLoRA (Zhang et al., arXiv 2303.10512, PEFT's implementation) run federatedly: unmasked
    forward, pruned triplets zeroed in place, non-nested allocation, full-rank traffic; FedARA's
    baseline (details: the module docstring).

    Options (as :func:`fedlora_jax.algorithms.fedara.build`, less ``r_min`` and ``static_cut``):
    ``target_rank``, ``orth_reg``, ``orth_form``, ``orth_warmup_frac``, ``lambda_lr_scale``,
    ``t_init_frac``, ``t_final_frac``, ``mask_interval``. Aggregator options: those of
    ``fedlora_jax.aggregation.fedara``: ``score_beta`` (default 0.5 here); ``averaging`` is refused.
    """
    target = max(1, ctx.r_max // 3) if target_rank is None else target_rank
    schedule = fedara.budget_schedule(ctx, target, t_init_frac, t_final_frac, mask_interval)
    aggregator = fedara.shared_mask_aggregator(ctx)
    regularizer = fedara.orth_term(ctx, gamma=float(orth_reg), form=orth_form, warmup_frac=orth_warmup_frac,
                                   count="all")
    client = ClientOptions(track_importance=True, regularizer=regularizer,
                           update_scale=fedara.lambda_scale(lambda_lr_scale))
    keys, r_max = ctx.keys, ctx.r_max
    final_from = ctx.rounds - schedule.t_final

    def init(lora):
        del lora
        return AdaloraState({k: jnp.ones((r_max,), jnp.float32) for k in keys})

    def server_update(algo_state, out):
        free = rank_rules.fedara_allocate(algo_state.z, out.agg_state.scores, out.round, schedule, nested=False)
        frozen = rank_rules.fedara_allocate(algo_state.z, out.agg_state.scores, out.round, schedule, nested=True)
        # Final phase (rounds > final_from): its first round allocates freely, later ones keep that pattern.
        keep = out.round > final_from + 1
        return AdaloraState({k: jnp.where(keep, frozen[k], free[k]) for k in keys})

    def distribute(state, masks, own):
        del own
        start = aggregator.distribute(state.lora, masks, state.agg_state)
        return {k: f._replace(e=f.e * state.algo.z[k].astype(f.e.dtype)) for k, f in start.items()}

    def plan(state, client_ids, round_idx):
        del state, round_idx
        ones = np.ones((len(client_ids), r_max), np.float32)
        masks = {k: ones for k in keys}
        return ClientPlan(masks, masks)

    options = dict(target_rank=target, orth_reg=orth_reg, orth_form=orth_form, orth_warmup_frac=orth_warmup_frac,
                   lambda_lr_scale=lambda_lr_scale, t_init_frac=t_init_frac, t_final_frac=t_final_frac,
                   mask_interval=mask_interval)
    return Algorithm(name="adalora", aggregator=aggregator, plan=plan, init_scheme="svd_form", client=client,
                     init=init, server_update=server_update, distribute=distribute, eval_masks=lambda s: s.z,
                     options=options)
