"""FedSA-LoRA (Guo et al., arXiv 2410.01463): ``a`` is shared and averaged, ``b`` stays on each
client.

Every client's last adapter is per-client state (``ServerState.clients``, leaves ``[K, ...]``,
kept on the server in this simulation; on a real deployment it stays on the device) and its
own ``b`` is handed back at distribution. Global evaluation uses the server's ``a`` with the
server's ``b`` (which FedSA never updates); per-client evaluation is the meaningful one.
"""

import jax
import jax.numpy as jnp

from fedlora_jax import aggregation as agg_lib
from fedlora_jax.algorithms.base import AlgoContext, Algorithm, ClientStateRule, static_rank


def _init_personal(lora, num_clients):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape).copy(), lora)


def _keep_trained(old, out):
    del old
    return out.lora


def build(ctx: AlgoContext) -> Algorithm:
    """FedSA-LoRA (Guo et al., arXiv 2410.01463): fixed-rank prefixes; ``a`` is averaged, every
    client keeps its own ``b`` (per-client state, handed back at distribution).

    Options: none of its own. Aggregator option (``ExperimentConfig.aggregator_options``, see
    ``fedlora_jax.aggregation.fedsa_lora``): ``averaging`` (``"zero_pad"`` | ``"renorm"``).
    """
    aggregator = agg_lib.fedsa_lora(**ctx.aggregator_options)

    def distribute(state, masks, own):
        return aggregator.distribute(state.lora, masks, state.agg_state, client_lora=own)

    return static_rank("fedsa", aggregator, ctx, client_state=ClientStateRule(_init_personal, _keep_trained),
                       distribute=distribute)
