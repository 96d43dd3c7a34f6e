"""fedlora_jax.aggregation (see docs/architecture.md)."""
