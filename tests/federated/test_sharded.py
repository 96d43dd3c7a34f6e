"""The sharded round on 8 fake CPU devices equals the single-device round (subprocess)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax
    from jax.sharding import Mesh
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import tiny
    from federated.test_round import fedavg_aggregator, setup, specs_for
    from fedlora_jax.federated import init_server_state, make_round
    assert jax.device_count() == 8, jax.devices()
    c = 16
    base, head, glob, data = setup(c)
    spec = specs_for(c, ranks=[1, 2, 3, 4] * 4, steps=[3, 2, 1, 3] * 4, weights=list(range(1, 17)))
    agg = fedavg_aggregator()
    key = jax.random.key(3)
    single = make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=8)
    s1, m1 = single(init_server_state(glob, head, agg), data, spec, key, base)
    mesh = Mesh(np.array(jax.devices()), ("clients",))
    sharded = make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=8, mesh=mesh)
    s2, m2 = sharded(init_server_state(glob, head, agg), data, spec, key, base)
    for k in glob:
        np.testing.assert_allclose(np.asarray(s1.lora[k].a), np.asarray(s2.lora[k].a), rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(s1.lora[k].b), np.asarray(s2.lora[k].b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(m1["client_loss"]), np.asarray(m2["client_loss"]), rtol=2e-5)
    # 2-D mesh: clients x model, base kernels split on "model".
    from fedlora_jax.federated import client_mesh, shard_base
    mesh2 = client_mesh(model=2)
    assert dict(mesh2.shape) == {{"clients": 4, "model": 2}}
    base2 = shard_base(base, mesh2)
    assert base2["w0"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    sharded2 = make_round(tiny.TASK, agg, optimizer=optax.adam(1e-2), chunk_size=8, mesh=mesh2)
    s3, _ = sharded2(init_server_state(glob, head, agg), data, spec, key, base2)
    for k in glob:
        np.testing.assert_allclose(np.asarray(s1.lora[k].a), np.asarray(s3.lora[k].a), rtol=2e-5, atol=2e-6)
    print("SHARDED_OK")
    """
)


def test_sharded_round_equals_single_device():
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SHARDED_OK" in proc.stdout
