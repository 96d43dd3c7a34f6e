"""Atomic writes leave files with the mode a plain open() would give (not mkstemp's 0600)."""

import os
import stat

from fedlora_jax._atomic import _UMASK, atomic_write_json


def test_atomic_write_uses_the_umask_mode(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"a": 1})
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~_UMASK
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
