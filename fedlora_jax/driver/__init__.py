"""fedlora_jax.driver (see docs/architecture.md)."""
