"""fedlora_jax.federated (see docs/architecture.md)."""
