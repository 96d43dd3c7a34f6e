"""Deploying the library's methods on real federations.

- :mod:`fedlora_jax.deploy.payload`: what travels between server and client (active slots
  only, numpy arrays; no optional dependency).
- :mod:`fedlora_jax.deploy.flower`: a Flower (``flwr``) ClientApp / ServerApp whose client
  runs :func:`~fedlora_jax.federated.client_update` and whose strategy wraps any
  ``Aggregator`` (needs the ``flower`` extra: ``pip install fedlora_jax[flower]``; imported
  on demand, ``from fedlora_jax.deploy import flower``).
"""

from fedlora_jax.deploy import payload
from fedlora_jax.deploy.payload import pack_lora, payload_bytes, unpack_lora

__all__ = ["pack_lora", "payload", "payload_bytes", "unpack_lora"]
