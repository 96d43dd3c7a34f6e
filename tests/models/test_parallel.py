"""Megatron tensor parallelism (fedlora_jax.models.parallel): a block as one shard_map, and each
column/row-parallel linear as its own, give the unsplit model's values and LoRA gradients, per
client under ``vmap(spmd_axis_name="clients")``, on a ("clients", "model") mesh of 4 fake CPU
devices."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from federated.test_round import fedavg_aggregator
from helpers import tiny
from jax.sharding import Mesh

from fedlora_jax.federated import make_round, shard_base
from fedlora_jax.models import parallel

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from flax import nnx
    from fedlora_jax import lora as lora_lib
    from fedlora_jax.models import LlamaConfig, LlamaLM, parallel
    from fedlora_jax.federated import shard_base
    from fedlora_jax.models.common import functional_forward, split_for_round
    from fedlora_jax.plan import base_partition_spec
    assert jax.device_count() == 4, jax.devices()
    C, B, T, R = 4, 2, 8, 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("clients", "model"))
    # (float32 with merged_lora="on": inside megatron() the split linears never fold, so this also
    # checks the unfolded path against the folded reference)
    # heads (4, 2): every block runs as one shard_map (parallel.split_block); heads (6, 3): 3 key/value
    # heads do not split over 2, so each linear runs as its own shard_map (parallel.split_linear)
    for dtype, merged, with_e, heads in (("float32", "on", True, (4, 2)), ("bfloat16", "off", False, (4, 2)),
                                         ("float32", "off", True, (6, 3))):
        cfg = LlamaConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=heads[0],
                          num_kv_heads=heads[1], head_dim=8, intermediate_size=48, max_position_embeddings=64,
                          merged_lora=merged, dtype=dtype)
        model = LlamaLM(cfg, rngs=nnx.Rngs(0))
        assert (parallel.block_dims(model.layers[0], 2) is None) == (heads == (6, 3))
        gd, base, head = split_for_round(model)
        shapes = {k: (v.in_features, v.out_features) for k, v in model.adapter_targets().items()}

        def client_lora(k):
            tree = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(k, x.shape), lora_lib.init(k, shapes, R))
            if with_e:  # FedARA / AdaLoRA's per-rank gain
                tree = {n: f._replace(e=1.0 + jnp.arange(R, dtype=jnp.float32) / R) for n, f in tree.items()}
            return tree

        lora = jax.vmap(client_lora)(jax.random.split(jax.random.key(1), C))
        masks = {k: jnp.tile((jnp.arange(R) < 1 + (i % 4)).astype(jnp.float32), (C, 1))
                 for i, k in enumerate(sorted(shapes))}
        ids = jax.random.randint(jax.random.key(2), (C, B, T), 0, 64)
        am = jnp.ones((C, B, T), jnp.int32).at[:, 0, -3:].set(0)

        def loss(lo, m, i, a, base):
            logits = functional_forward(gd, base, head, i, a, lora=lo, masks=m, scale=2.0)
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3])

        def per_client(spmd):
            return jax.vmap(jax.value_and_grad(loss), in_axes=(0, 0, 0, 0, None), spmd_axis_name=spmd)

        ref_v, ref_g = jax.jit(per_client(None))(lora, masks, ids, am, base)
        placed = shard_base(base, mesh, placement="megatron")
        for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(placed),
                                  jax.tree_util.tree_leaves_with_path(base), strict=True):
            assert x.sharding.spec == base_partition_spec(p, y.shape, 2, "megatron")   # fedlora plan's placement
        P = jax.sharding.PartitionSpec
        assert placed["layers"][0]["q_proj"]["kernel"].sharding.spec == P(None, "model")
        assert placed["layers"][0]["down_proj"]["kernel"].sharding.spec == P("model", None)

        def split(*args):
            with parallel.megatron(mesh):
                return per_client("clients")(*args)

        with jax.set_mesh(mesh):
            v, g = jax.jit(split)(lora, masks, ids, am, placed)
        tol = 2e-5 if dtype == "float32" else 3e-2
        np.testing.assert_allclose(np.asarray(v), np.asarray(ref_v), rtol=tol, atol=tol)
        n = 0
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref_g)):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            scale = max(float(np.abs(want).max()), 1e-3)
            assert np.abs(got - want).max() <= 4 * tol * scale, (dtype, merged, jax.tree_util.keystr(path))
            n += 1
        assert n == len(shapes) * (3 if with_e else 2), n
        print(dtype, merged, with_e, heads, "OK")
    print("MEGATRON_OK")
    """
)


def test_megatron_linears_equal_the_unsplit_model():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MEGATRON_OK" in proc.stdout


def test_megatron_dim_rules():
    assert parallel.megatron_dim("q_proj", (32, 64), 2) == 1
    assert parallel.megatron_dim("down_proj", (48, 32), 4) == 0
    assert parallel.megatron_dim("o_proj", (30, 32), 4) is None     # 30 rows do not split over 4
    assert parallel.megatron_dim("lm_head", (32, 64), 2) is None    # not a Megatron linear
    assert parallel.megatron_dim("q_proj", (32, 64), 1) is None
    assert parallel.megatron_dim(None, (32, 64), 2) is None


def test_megatron_needs_a_model_axis():
    mesh = Mesh(np.array(jax.devices()[:1]), ("clients",))
    with pytest.raises(ValueError, match="'model' axis"), parallel.megatron(mesh):
        pass
    assert parallel.active_mesh() is None
    with pytest.raises(ValueError, match="'model' axis"):
        make_round(tiny.TASK, fedavg_aggregator(), megatron=True)
    with pytest.raises(ValueError, match="'model' axis"):
        make_round(tiny.TASK, fedavg_aggregator(), mesh=mesh, megatron=True)
    with pytest.raises(ValueError, match="placement must be one of"):
        shard_base({"w": np.zeros((2, 2))}, mesh, placement="rows")
