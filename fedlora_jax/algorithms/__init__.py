"""fedlora_jax.algorithms (see docs/architecture.md)."""
