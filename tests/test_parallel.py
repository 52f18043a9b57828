"""Sharding on a simulated 8-device CPU mesh (run in subprocesses: XLA_FLAGS must precede JAX)."""

import json
import os

import numpy as np
import pytest

from muse_jax import parallel
from tests.helpers import ROOT, run_python


def _run(check: str, tmp_path) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = os.path.join(ROOT, "tests", "multidevice_checks.py")
    proc = run_python(script, check, str(tmp_path), env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
def test_every_parameter_is_sharded_as_the_rules_say_on_a_2x2x2_mesh(tmp_path):
    result = _run("shardings", tmp_path)
    assert result["checked"] > 40 and result["sharded"] > 0


@pytest.mark.slow
def test_a_train_step_on_8_devices_equals_the_step_on_one(tmp_path):
    result = _run("step", tmp_path)
    np.testing.assert_allclose(result["loss8"], result["loss1"], rtol=1e-5)
    assert result["max_param_diff"] < 1e-5


@pytest.mark.slow
def test_a_checkpoint_written_on_one_mesh_restores_onto_others(tmp_path):
    result = _run("restore", tmp_path)
    assert result["(8, 1, 1)"]["equal"] and result["(1, 4, 2)"]["equal"]
    assert result["(1, 4, 2)"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert parallel.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="At most one"):
        parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.mesh_shape({"data": 4, "fsdp": 2, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="do not divide"):
        parallel.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
