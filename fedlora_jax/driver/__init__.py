"""The experiment driver: configs, the run loop, checkpoints, evaluation (see docs/architecture.md).

- :func:`run_experiment` (``driver.run``): run or resume one experiment into a run directory.
- :func:`load_config` / :class:`ExperimentConfig` (``driver.config``): configs as code, safe overrides.
- :func:`evaluate_run` / :func:`export_run_peft` (``driver.evaluate``): operate on a run directory.
"""

from fedlora_jax.driver.config import ExperimentConfig, apply_overrides, load_config
from fedlora_jax.driver.evaluate import evaluate_run, export_run_peft, load_run
from fedlora_jax.driver.run import run_experiment

__all__ = ["ExperimentConfig", "apply_overrides", "evaluate_run", "export_run_peft", "load_config", "load_run",
           "run_experiment"]
