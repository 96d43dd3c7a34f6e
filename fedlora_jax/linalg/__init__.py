"""fedlora_jax.linalg (see docs/architecture.md)."""
