"""Pallas kernels, installed as ``fedlora_jax.kernels``; each has a pure-jnp twin."""
