"""fedlora_jax.models (see docs/architecture.md)."""
