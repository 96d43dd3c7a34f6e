"""Setting 2 of a comparison (issue 32): the same arms, data and claims with the classifier head
frozen at its seed's initialization in every arm (``freeze_head=True``), so that the adapters carry
all of the learning. ``pilot_agnews_frozen_head.py`` decided that MiniLM-L6 on AG News leaves the
adapters room this way (results page, "Pilots").

What changes from setting 1: the head-only arm and every claim against it go (a frozen head with
no adapter trains nothing; its accuracy is each run's evaluation before training), and so do
the claims on metrics listed in ``drop_metrics``; the target accuracy (a fraction of a LoRA arm's)
is then beyond what the untrained head reaches.
"""

from __future__ import annotations

import dataclasses


def frozen_head(base, *, drop_metrics=()) -> dict:
    """``METHODS``, ``CLAIMS``, ``TARGET``, ``MARGINS``, ``DIFFERENCES`` and ``SEEDS`` of the
    frozen-head setting of the ``base`` comparison module. Seeds 0-4 (issue 32: 5 paired seeds
    where 3 cannot decide): seeds 0-2 run first, seed-major; seeds 3-4 follow where the 3-seed
    verdicts are underpowered (each config's runbook says which arms have run them)."""
    methods = {k: dict(v) for k, v in base.METHODS.items() if v.get("algorithm") != "head_only"}
    claims = tuple(c for c in base.CLAIMS if c["ref"] in methods and c["arm"] in methods
                   and c["metric"] not in drop_metrics)
    metrics = {c["metric"] for c in claims}
    return dict(METHODS=methods, CLAIMS=claims, TARGET=getattr(base, "TARGET", None), SEEDS=(0, 1, 2, 3, 4),
                MARGINS={k: v for k, v in base.MARGINS.items() if k in metrics},
                DIFFERENCES=base.DIFFERENCES + " The classifier head is frozen at its initialization in every arm "
                "(the paper trains it).")


def frozen_config(base, variant: str, name: str, **changes):
    """The base comparison's config with ``freeze_head=True``, renamed ``name`` (plus ``changes``)."""
    cfg = base.get_config(variant)
    return dataclasses.replace(cfg, name=cfg.name.replace(base.get_config("full").name, name, 1), freeze_head=True,
                               **changes)
