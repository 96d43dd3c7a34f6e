"""fedlora_jax.data (see docs/architecture.md)."""
