"""Model families: one record per ``models/<family>.py`` that loading, PEFT import/export,
memory estimation and the driver read, instead of inferring a family from the fields a config
happens to have.

Adding a family is its file (config, module, key table, a ``FAMILY = ModelFamily(...)`` at the
end) and one line in :func:`families`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the rest of the library knows about one architecture family.

    Attributes:
      name: e.g. ``"BERT/RoBERTa"`` (also the label of its PEFT target names).
      model_types: the ``config.json`` ``model_type`` values it loads.
      config_cls: our config class (has ``from_hf_config(hf, **overrides)``).
      model_cls: our NNX module class (``model_cls(config, rngs=...)``).
      causal_lm: a decoder with an LM head (True) or an encoder classifier (False).
      ffn_matrices: weight matrices of one FFN block: 2 (GELU MLP) or 3 (SwiGLU).
      key_table: ``key_table(config) -> {hf name: (our state path, transpose)}``.
      prefixes: ``prefixes(config) -> (architecture prefix, ...)`` of checkpoint keys.
      ignored: regexes of checkpoint keys that are buffers or unused heads.
      optional_keys: keys loaded when present with a matching shape (an encoder's classifier).
      peft_target_names: the PEFT ``target_modules`` names it accepts (besides ``all-linear``).
      peft_modules: ``((regex of an HF module path without its prefix, our module), ...)``;
        the regex's group 1 is the layer (no group: the pooler).
      fan_in_fan_out: our modules stored ``[in, out]`` in the HF checkpoint (GPT-2's Conv1D).
    """

    name: str
    model_types: tuple[str, ...]
    config_cls: type
    model_cls: type
    causal_lm: bool
    ffn_matrices: int
    key_table: Callable[[Any], Mapping[str, tuple[tuple, bool]]]
    prefixes: Callable[[Any], tuple[str, ...]]
    ignored: tuple[str, ...]
    peft_target_names: tuple[str, ...]
    peft_modules: tuple[tuple[str, str], ...]
    optional_keys: Mapping[str, tuple[tuple, bool]] = dataclasses.field(default_factory=dict)
    fan_in_fan_out: tuple[str, ...] = ()


def families() -> tuple[ModelFamily, ...]:
    """The registry: every family the library loads."""
    from fedlora_jax.models import bert, gpt2, llama

    return (bert.FAMILY, gpt2.FAMILY, llama.FAMILY)


def family_of_model_type(model_type: str) -> ModelFamily:
    """The family that loads ``config.json``'s ``model_type``; ``ValueError`` naming the supported."""
    for fam in families():
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in families() for t in fam.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")


def family_of_config(config: Any) -> ModelFamily:
    """The family of one of our model configs; ``TypeError`` for anything else."""
    for fam in families():
        if isinstance(config, fam.config_cls):
            return fam
    raise TypeError(f"unknown config type {type(config).__name__}; expected one of "
                    f"{[fam.config_cls.__name__ for fam in families()]}")


def family_of_model(model: Any) -> ModelFamily:
    """The family of one of our models (by its ``config``)."""
    return family_of_config(getattr(model, "config", None))
