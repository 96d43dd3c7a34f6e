"""fedlora_jax.importance (see docs/architecture.md)."""
