"""Deviceless TPU compilation (`muse_jax.aot`): slice names, the compiled-program readers, bad
input in one line, and, where libtpu is installed (the `[tpu]` extra), the tiny config's train
steps and samplers compiled for a real TPU v4 slice with the rules table's shardings."""

from __future__ import annotations

import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_tiny
from muse_jax import aot, compiled_stats, stages, tpu
from tests.helpers import run_module

LIBTPU_MISSING = tpu.libtpu_missing()
needs_libtpu = pytest.mark.skipif(bool(LIBTPU_MISSING), reason=str(LIBTPU_MISSING))


@pytest.mark.parametrize(
    "name, grid, chips",
    [
        ("v4-8", "2x2x1", 4),
        ("v4-32", "2x2x4", 16),
        ("v4-64", "2x4x4", 32),
        ("v4:2x2x4", "2x2x4", 16),
        ("v5e-16", "4x4", 16),
        ("v5litepod-4", "2x2", 4),
        ("v6e:2x4", "2x4", 8),
        ("v5p-128", "4x4x4", 64),
    ],
)
def test_slice_names(name, grid, chips):
    t = tpu.parse(name)
    assert (t.grid, t.num_chips) == (grid, chips)


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9-8", r"Unknown TPU topology 'v9-8'; valid: chips \['v4', 'v5e', 'v5p', 'v6e'\]"),
        ("v4-12", r"No v4 slice of 12 TensorCores \('v4-12'\); valid sizes: v4-8, v4-16"),
        ("v5e:2x2x2", r"TPU v5e grids have 2 dimensions, got '2x2x2'"),
        ("v4", r"Unknown TPU topology 'v4'"),
    ],
)
def test_bad_slice_names_are_one_line(name, message):
    with pytest.raises(ValueError, match=message):
        tpu.parse(name)


_HLO = """\
HloModule m, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), replica_groups=[1,4]<=[4], dimensions={0}
  %ag-done = f32[8]{0} all-gather-done(%ag-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %rs = f32[2]{0} reduce-scatter(%a), replica_groups=mesh['x'=4] {'x'}, dimensions={0}
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_trips_and_async_results():
    got = compiled_stats.collectives(_HLO, num_devices=4)
    assert got["all-reduce"].count == 24
    assert got["all-reduce"].result_bytes == 24 * 32
    assert got["all-reduce"].sent_bytes == pytest.approx(24 * 2 * 32 * 3 / 4)
    assert got["all-gather"].count == 24  # The start counts, the done does not.
    assert got["all-gather"].result_bytes == 24 * 32  # The gathered result, not the shard.
    assert got["reduce-scatter"].count == 1
    assert got["reduce-scatter"].sent_bytes == pytest.approx(8 * 3)


def test_jaxpr_flops_counts_scanned_bodies_as_often_as_they_run():
    x = jnp.ones((64, 64))
    loop = lambda a: jax.lax.fori_loop(0, 10, lambda i, b: jnp.tanh(b @ a), a)
    jaxpr = jax.make_jaxpr(loop)(x)
    assert compiled_stats.jaxpr_flops(jaxpr) == 10 * 2 * 64**3
    assert compiled_stats.jaxpr_flops(jaxpr, count_loops=False) == 2 * 64**3


def test_required_bytes_from_xla_refusals():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (310.00G) exceeds available HBM (30.75G)."
    )
    assert aot.required_bytes(msg) == 310 * 1024**3
    assert aot.required_bytes("Used 40.5G of 31.25G hbm. Exceeded hbm capacity by 9.25G.") == (
        40.5 * 1024**3
    )


def _run(*flags: str) -> subprocess.CompletedProcess:
    return run_module("muse_jax.aot", *flags, timeout=900)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology=v4-12"], "error: No v4 slice of 12 TensorCores ('v4-12'); valid sizes: v4-8"),
        (
            ["--topology=v4-8", "--config.mesh.shape.data=3"],
            "error: Mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, 4 are available.",
        ),
        (
            ["--topology=v4-8", "--batch_size=6"],
            "error: tokenizer.train batch 6 does not divide over the data axes data*fsdp=4; "
            "valid: multiples of 4",
        ),
        (["--programs=base,vae"], "error: Unknown program ['vae']; valid: tokenizer, base"),
        (["--text=t5"], "error: Unknown text route ['t5']; valid: precomputed, graph"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, message):
    proc = _run("--config=configs/shapes_tiny.py:smoke", *flags)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_specs_are_the_batches_the_stages_yield(tmp_path):
    """What aot compiles against is what training feeds: every stage's batch_spec matches the
    shapes and dtypes of its real batches' device entries."""
    from muse_jax import parallel
    from muse_jax.train import stage as stage_lib

    config = shapes_tiny.get_config("smoke")
    for name in stages.NAMES:
        stage = stage_lib.get(name)(config, str(tmp_path))
        batch = parallel.device_entries(next(stage.batches(seed=0)))
        spec = stage.batch_spec(config[name].train.batch_size)
        got = {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
        want = {k: (v.shape, np.dtype(v.dtype)) for k, v in spec.items()}
        assert got == want, name


@needs_libtpu
def test_tiny_programs_compile_for_a_v4_slice_with_the_rules_shardings():
    """The tiny config's base and super-res train steps and its cascade sampler, compiled by
    XLA:TPU for v4:2x2x1 on a 2x2 (fsdp, tensor) mesh: every parameter of the compiled step is
    sharded as the rules table says, and the compiler's figures are read."""
    import flax.linen as nn

    from muse_jax import parallel
    from muse_jax.text.conditioning import ShapeConditioner
    from muse_jax.train import stage as stage_lib

    tpu.quiet_libtpu_environment()
    config = shapes_tiny.get_config("smoke")
    config.mesh.shape.update(dict(data=1, fsdp=2, tensor=2))
    topology = tpu.parse("v4:2x2x1")
    devices = tpu.devices(topology)
    mesh = aot.make_mesh(config.mesh.shape, devices)
    assert {d.platform for d in mesh.devices.flat} == {"tpu"}
    rules = parallel.rules(config)
    for name in ("base", "superres"):
        fn, args = aot.train_program(config, name, mesh, 8, route="graph")
        result = aot.compile_program(name, fn, args, mesh, topology, 8, {})
        assert result.fits and 0 < result.memory.total < result.hbm_bytes
        assert result.cost["flops"] > 0 and result.collectives  # A sharded step communicates.
        # Expected from the rules table alone, from the stage's boxed logical axis names.
        stage = stage_lib.get(name)(config, "x", conditioner=ShapeConditioner(config, False))
        with mesh, nn.logical_axis_rules(list(rules)):
            boxed = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
        expected = parallel.logical_shardings(boxed, mesh, rules).params
        compiled_params = result.compiled.input_shardings[0][0].params
        shapes = dict(jax.tree.leaves_with_path(args[0].params))
        split = 0
        for path, want in jax.tree.leaves_with_path(expected):
            have = dict(jax.tree.leaves_with_path(compiled_params))[path]
            assert have.is_equivalent_to(want, shapes[path].ndim), jax.tree_util.keystr(path)
            split += any(axis is not None for axis in want.spec)
        assert split > len(shapes) // 3, "the 2x2 mesh splits many parameters"
    one_chip = aot.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices[:1])
    fn, args = aot.sampler_program(config, one_chip, 4, cascade=True, route="graph")
    result = aot.compile_program("sampler", fn, args, one_chip, topology, 4, {})
    assert result.fits and not result.collectives
    # Base and super-res decoding loops run 4 + 3 steps; the body counts that often.
    assert result.cost["loop_scale"] > 1.5


@needs_libtpu
def test_binary_compiles_the_smoke_config_and_writes_json(tmp_path):
    out = tmp_path / "aot.json"
    proc = _run(
        "--config=configs/shapes_tiny.py:smoke",
        "--topology=v4-8",
        "--programs=tokenizer,base,sampler",
        "--text=precomputed",
        "--sampler_batch=4",
        f"--json_out={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    names = [r["program"] for r in results]
    assert names == [
        "tokenizer train step",
        "base train step (text precomputed)",
        "sampler base (text precomputed)",
        "sampler cascade (text precomputed)",
    ]
    for r in results:
        assert r["fits"] and 0 < r["memory_bytes"]["total"] < r["hbm_bytes"]
        assert r["flops_per_device"] > 0 and r["roofline_estimate"]["seconds"] > 0
    # The sampler's decoding loop is counted as it runs (XLA's cost analysis counts it once).
    assert results[2]["settings"]["steps"] == 4
    assert "memory per device" in proc.stdout and "roofline estimate" in proc.stdout


@needs_libtpu
def test_a_program_that_does_not_fit_exits_1_naming_it_and_the_overshoot():
    proc = _run(
        "--config=configs/shapes_tiny.py:smoke",
        "--topology=v4-8",
        "--programs=base",
        "--text=precomputed",
        "--batch_size=1048576",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("does not fit:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("does not fit: base train step (text precomputed) needs ")
    assert "GiB over the v4's 32.00 GiB HBM" in lines[0]
    assert "DOES NOT FIT" in proc.stdout


@needs_libtpu
def test_sizing_reports_the_compilers_memory_in_place_of_its_estimate():
    from muse_jax import sizing

    config = shapes_tiny.get_config("smoke")
    line = sizing.compiler_report(config, 8, {"data": 1, "fsdp": 4, "tensor": 1}, "")
    assert line.startswith("XLA:TPU compiler on v4:2x2x1 (replaces the estimate): ")
    assert "GiB per device of 32.00 GiB HBM, fits" in line


@needs_libtpu
def test_two_slices_stack_on_the_data_axis():
    tpu.quiet_libtpu_environment()
    topology = tpu.parse("v5e:2x2", num_slices=2)
    assert topology.num_chips == 8 and topology.name == "v5e:2x2 x 2 slices"
    config = shapes_tiny.get_config("smoke")
    config.mesh.shape.update(dict(data=4, fsdp=2, tensor=1))
    mesh = aot.make_mesh(config.mesh.shape, tpu.devices(topology), topology.num_slices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # Each half of the data axis is one slice; fsdp stays inside a slice.
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
    fn, args = aot.train_program(config, "tokenizer", mesh, 8)
    result = aot.compile_program("tokenizer", fn, args, mesh, topology, 8, {})
    assert result.fits and result.mesh == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="data=3 does not divide over 2 slices"):
        aot.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 12, 2)
