"""fedlora_jax.devices (see docs/architecture.md)."""
