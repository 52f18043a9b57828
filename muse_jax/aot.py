r"""Compile every stage's train step and the samplers for a TPU slice, on a host without one.

With `libtpu` installed (`pip install -e ".[tpu]"`), JAX compiles for a described TPU slice
without the hardware. This binary compiles exactly the programs training and sampling run (the
trainer's own jitted step, the pipeline's own sampler) against abstract inputs sharded by the
config's rules, and prints what the XLA:TPU compiler says about each:

  python -m muse_jax.aot --config=configs/muse_paper.py:3b --topology=v4-32

- per-device memory (arguments, outputs, temporaries, total) against the chip's HBM;
- compiled FLOPs per device and per step;
- the collectives of one step (kind, count, GiB sent per device);
- compile time;
- a roofline step time: the slowest of FLOPs at the chip's peak, HBM traffic at its bandwidth and
  collective traffic at its ICI bandwidth; an estimate, never a measurement.

Programs: the train steps of the config's stages (tokenizer, base, base_decoder,
superres_tokenizer, superres, decoder); the base and super-res steps once per text route (`--text`: "precomputed" embeddings,
or the encoder in the "graph", frozen T5 or the trainable tiny one); and the samplers at
`--sampler_batch` on `--sampler_chips` chips: the base stage alone and, with super-res, the whole
cascade. Nothing reads a checkpoint, a dataset or a vocabulary, and nothing runs.

Exit status 1 when a program does not fit its chip's memory (the line names the program and the
overshoot), 2 for bad flags (an unknown topology, a mesh that does not divide the chips, a batch
that does not divide the data axes). `--json_out` writes every figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from muse_jax import stages, tpu
from muse_jax.errors import UsageError

TRAIN_PROGRAMS = stages.NAMES  # One train program per registered stage.
TEXT_STAGES = ("base", "superres")
# Stages whose batches hold captions: aot gives them the text route's conditioner.
CAPTIONED_STAGES = TEXT_STAGES + ("base_decoder",)
TEXT_ROUTES = ("precomputed", "graph")
GiB = tpu.GiB


@dataclasses.dataclass
class Result:
    program: str
    topology: str
    mesh: dict[str, int]
    batch: int  # Global batch (images per step or per sampler call).
    memory: Any  # compiled_stats.Memory
    cost: dict[str, float]
    collectives: dict[str, Any]  # kind -> compiled_stats.Collective
    compile_s: float
    roofline: Any  # compiled_stats.Roofline
    hbm_bytes: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A program the compiler refused for memory: its own words, and the bytes it asked for
    # (memory, cost and collectives are then None / empty).
    error: str = ""
    required_bytes: float = 0.0
    compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled

    @property
    def fits(self) -> bool:
        return not self.error and self.memory.total <= self.hbm_bytes

    @property
    def total_bytes(self) -> float:
        return self.required_bytes if self.error else self.memory.total

    def to_json(self) -> dict[str, Any]:
        head = {
            "program": self.program,
            "topology": self.topology,
            "mesh": self.mesh,
            "batch": self.batch,
            "settings": self.settings,
            "hbm_bytes": self.hbm_bytes,
            "fits": self.fits,
            "compile_s": self.compile_s,
        }
        if self.error:
            return head | {"error": self.error, "required_bytes": self.required_bytes}
        return head | {
            "memory_bytes": dataclasses.asdict(self.memory) | {"total": self.memory.total},
            "flops_per_device": self.cost["flops"],
            "bytes_accessed_per_device": self.cost["bytes accessed"],
            "loop_scale": self.cost["loop_scale"],
            "xla_cost_analysis": {
                "flops": self.cost["xla_flops"],
                "bytes_accessed": self.cost["xla_bytes_accessed"],
            },
            "collectives": {k: dataclasses.asdict(v) for k, v in self.collectives.items()},
            "roofline_estimate": dataclasses.asdict(self.roofline)
            | {"seconds": self.roofline.seconds, "bound": self.roofline.bound},
        }


# ---------------------------------------------------------------------------------------------
# Meshes.


def mesh_shape(shape_cfg, num_chips: int, num_slices: int = 1) -> tuple[int, ...]:
    """The config's (data, fsdp, tensor) sizes on `num_chips` (ValueError in one line)."""
    from muse_jax import parallel

    try:
        shape = parallel.mesh_shape(shape_cfg, num_chips)
    except ValueError as e:
        raise UsageError(
            f"{e} Valid: data*fsdp*tensor = {num_chips} (one axis may be -1: the rest)."
        ) from None
    if shape[0] % num_slices:
        raise UsageError(
            f"data={shape[0]} does not divide over {num_slices} slices: the data axis spans "
            "the slices; make it a multiple of num_slices."
        )
    return shape


def make_mesh(shape_cfg, devices: Sequence[Any], num_slices: int = 1):
    """The config's (data, fsdp, tensor) mesh over `devices`.

    Within a slice the devices are laid out so that each mesh axis follows the torus
    (`mesh_utils`); several slices stack on the data axis, which must then divide by them.
    """
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from muse_jax import parallel

    shape = mesh_shape(shape_cfg, len(devices), num_slices)
    if num_slices > 1:
        ici = (shape[0] // num_slices,) + shape[1:]
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, (num_slices, 1, 1), devices, allow_split_physical_axes=True
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, parallel.MESH_AXES)


def _mesh_dict(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def check_batch(batch: int, shape: Sequence[int] | Any, what: str) -> None:
    """`batch` must split evenly over the data axes (data * fsdp) of a mesh or mesh shape."""
    sizes = tuple(shape.devices.shape) if hasattr(shape, "devices") else tuple(shape)
    data = sizes[0] * sizes[1]
    if batch < 1 or batch % data:
        raise UsageError(
            f"{what} batch {batch} does not divide over the data axes data*fsdp={data}; "
            f"valid: multiples of {data}, e.g. {data * max(1, batch // data)}."
        )


# ---------------------------------------------------------------------------------------------
# Programs: (jitted function, abstract arguments).


def _conditioner(config, route: str):
    from muse_jax.text.conditioning import ShapeConditioner

    return ShapeConditioner(config, precomputed=route == "precomputed")


def train_program(config, name: str, mesh, batch_size: int, route: str = "precomputed"):
    """The trainer's jitted step of stage `name` and its abstract (state, batch, frozen)."""
    import jax

    from muse_jax import parallel
    from muse_jax.train import stage as stage_lib
    from muse_jax.train import trainer

    cls = stage_lib.get(name)
    kwargs = {"conditioner": _conditioner(config, route)} if name in CAPTIONED_STAGES else {}
    stage = cls(config, "<aot: nothing is read>", **kwargs)
    rules = parallel.rules(config)
    check_batch(batch_size, mesh, f"{name}.train")
    state, shardings = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    frozen = stage.frozen(mesh, rules, abstract=True)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in stage.batch_spec(batch_size).items()
    }
    step = trainer.jit_train_step(stage, shardings, batch_sharding, rules)
    return step, (state, batch, frozen)


def sampler_program(config, mesh, batch_size: int, cascade: bool, route: str = "precomputed"):
    """The pipeline's jitted sampler (the base stage, or the whole cascade) and its abstract
    (params, cond, uncond, rng, init tokens, ..., settings), as `MusePipeline` calls it."""
    import jax
    import jax.numpy as jnp

    from muse_jax import parallel
    from muse_jax.inference import model as model_lib
    from muse_jax.sampling.sampler import Settings

    rules = parallel.rules(config)
    check_batch(batch_size, mesh, "sampler")
    conditioner = _conditioner(config, route)
    model = model_lib.load(config, None, conditioner, cascade, mesh=mesh)
    spec = parallel.batch_sharding(mesh, rules)
    text = {
        k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=spec)
        for k, v in conditioner.encode([""]).items()
    }
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    base = model.base_sampler
    tokens = jax.ShapeDtypeStruct((batch_size, base.transformer.seq_len), jnp.int32, sharding=spec)
    base_settings = Settings.from_config(config.base.sampling)
    if not cascade:
        args = (model.sampler_params(False), text, text, rng, tokens, None, base_settings)
        return base._jitted, args
    sr = model.superres_sampler
    hr = jax.ShapeDtypeStruct((batch_size, sr.transformer.seq_len), jnp.int32, sharding=spec)
    settings = (base_settings, Settings.from_config(config.superres.sampling))
    args = (model.sampler_params(True), text, text, rng, tokens, hr, settings)
    return model.cascade_sampler._jitted, args


def compile_program(
    label: str,
    fn: Callable,
    args: tuple,
    mesh,
    topology: tpu.Topology,
    batch: int,
    settings: dict[str, Any],
) -> Result:
    """Traces `fn` for the TPU (its platform-specific layers take their TPU paths), compiles it
    for `mesh`'s devices and reads the compiler's figures.

    XLA's cost analysis counts a loop body once (the sampler's decoding steps, scanned layers).
    FLOPs: the program's jaxpr gives matmul FLOPs with and without counting loops, and their
    ratio (1 without loops) scales the compiler's per-device figure. HBM bytes: the same with
    the ratio of the optimised HLO's scheduled-op traffic counting loop bodies as they run and
    once (`compiled_stats.hbm_bytes`).
    """
    from muse_jax import compiled_stats
    from muse_jax.models import kernels

    t = time.time()
    with kernels.target("tpu"):
        traced = fn.trace(*args)
        try:
            compiled = traced.lower().compile()
        except Exception as e:  # XLA's JaxRuntimeError; only memory refusals are results.
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return _refused(label, str(e), mesh, topology, batch, settings, time.time() - t)
    compile_s = time.time() - t
    once = compiled_stats.jaxpr_flops(traced.jaxpr, count_loops=False)
    loops = compiled_stats.jaxpr_flops(traced.jaxpr, count_loops=True)
    scale = loops / once if once > 0 else 1.0
    mem = compiled_stats.memory(compiled)
    xla = compiled_stats.cost(compiled)
    program = compiled_stats.parse(compiled.as_text())
    once_bytes = compiled_stats.hbm_bytes(program, count_loops=False)
    bytes_scale = compiled_stats.hbm_bytes(program) / once_bytes if once_bytes else 1.0
    cost = {
        "flops": xla["flops"] * scale,
        "bytes accessed": xla["bytes accessed"] * bytes_scale,
        "loop_scale": scale,
        "xla_flops": xla["flops"],
        "xla_bytes_accessed": xla["bytes accessed"],
    }
    colls = compiled_stats.collectives(program, mesh.size)
    chip = topology.chip
    roof = compiled_stats.roofline(
        cost["flops"],
        cost["bytes accessed"],
        sum(c.sent_bytes for c in colls.values()),
        chip.bf16_flops,
        chip.hbm_bandwidth,
        chip.ici_bandwidth,
    )
    return Result(
        label,
        topology.name,
        _mesh_dict(mesh),
        batch,
        mem,
        cost,
        colls,
        compile_s,
        roof,
        chip.hbm_bytes,
        settings,
        compiled=compiled,
    )


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def required_bytes(message: str) -> float:
    """The bytes an XLA:TPU out-of-memory refusal asked for (0 when it names none), e.g.
    '... memory required for HLO temporaries (310.00G) exceeds available HBM (30.75G)' or
    '... Used 40.2G of 31.25G hbm. Exceeded hbm capacity by 9.0G.'"""
    import re

    m = re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available", message)
    if m is None:
        m = re.search(r"Used ([\d.]+)([KMGT]?) of", message)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0


def _refused(label, message, mesh, topology, batch, settings, compile_s) -> Result:
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), message)
    return Result(
        label,
        topology.name,
        _mesh_dict(mesh),
        batch,
        None,
        {},
        {},
        compile_s,
        None,
        topology.chip.hbm_bytes,
        settings,
        error=first,
        required_bytes=required_bytes(message),
    )


# ---------------------------------------------------------------------------------------------
# Report.


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_result(r: Result) -> str:
    m = r.memory
    mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items())
    head = (
        f"{r.program}  [{r.topology}, mesh {mesh}, batch {r.batch}"
        + "".join(f", {k}={v}" for k, v in r.settings.items())
        + "]"
    )
    if r.error:
        return (
            f"{head}\n  DOES NOT FIT: the compiler refused it after {r.compile_s:.1f} s "
            f"(its figure counts temporaries; arguments come on top): {r.error}"
        )
    verdict = "fits" if r.fits else f"DOES NOT FIT (+{_gib(m.total - r.hbm_bytes)} GiB)"
    lines = [
        head,
        f"  memory per device: {_gib(m.total)} GiB of {_gib(r.hbm_bytes)} GiB HBM, {verdict} "
        f"(arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)}, donated "
        f"{_gib(m.aliased)}, temporaries {_gib(m.temporaries)})",
        f"  FLOPs per device {r.cost['flops']:.3e} (x{math.prod(r.mesh.values())} devices = "
        f"{r.cost['flops'] * math.prod(r.mesh.values()):.3e}); HBM bytes "
        f"{r.cost['bytes accessed']:.3e}",
    ]
    if r.collectives:
        parts = [
            f"{k} x{c.count} {c.sent_bytes / GiB:.3f} GiB" for k, c in sorted(r.collectives.items())
        ]
        lines.append("  collectives (sent per device): " + ", ".join(parts))
    else:
        lines.append("  collectives: none")
    ro = r.roofline
    lines.append(
        f"  compile {r.compile_s:.1f} s; roofline estimate {ro.seconds * 1e3:.1f} ms per call, "
        f"{ro.bound}-bound (compute {ro.compute_s * 1e3:.1f} ms, HBM {ro.memory_s * 1e3:.1f} ms, "
        f"ICI {ro.collective_s * 1e3:.1f} ms)"
    )
    return "\n".join(lines)


def planned_programs(config, programs: Sequence[str], routes: Sequence[str]) -> list[tuple]:
    """[(label, kind, stage or cascade flag, text route)] in run order."""
    enabled = stages.enabled(config)
    out = []
    for name in programs:
        if name == "sampler":
            for cascade in (False, True) if stages.has_cascade(config) else (False,):
                for route in routes:
                    label = f"sampler {'cascade' if cascade else 'base'} (text {route})"
                    out.append((label, "sampler", cascade, route))
        elif name not in enabled:
            continue
        elif name in TEXT_STAGES:
            for route in routes:
                out.append((f"{name} train step (text {route})", "train", name, route))
        else:
            out.append((f"{name} train step", "train", name, None))
    return out


def parse_list(text: str, valid: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise UsageError(f"Unknown {what} {bad or text!r}; valid: {', '.join(valid)}.")
    return items


def validate(
    config,
    topology: tpu.Topology,
    plan: Sequence[tuple],
    batch_size: int = 0,
    sampler_batch: int = 32,
    sampler_chips: int = 1,
) -> None:
    """Every bad setting in one line, before libtpu or the first (slow) compile."""
    shape = mesh_shape(config.mesh.shape, topology.num_chips, topology.num_slices)
    if not 1 <= sampler_chips <= topology.num_chips:
        raise UsageError(
            f"sampler_chips must be in [1, {topology.num_chips}] on {topology.name}, "
            f"got {sampler_chips}."
        )
    for _, kind, what, _ in plan:
        if kind == "train":
            check_batch(batch_size or config[what].train.batch_size, shape, f"{what}.train")
        else:
            check_batch(sampler_batch, (sampler_chips, 1, 1), "sampler")


def run(
    config,
    topology: tpu.Topology,
    programs: Sequence[str],
    routes: Sequence[str],
    batch_size: int = 0,
    sampler_batch: int = 32,
    sampler_chips: int = 1,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Compiles the planned programs and returns their results (printing each as it comes)."""
    import ml_collections

    plan = planned_programs(config, programs, routes)
    validate(config, topology, plan, batch_size, sampler_batch, sampler_chips)
    devices = tpu.devices(topology)
    train_mesh = make_mesh(config.mesh.shape, devices, topology.num_slices)
    sampler_shape = ml_collections.ConfigDict(dict(data=sampler_chips, fsdp=1, tensor=1))
    sampler_mesh = make_mesh(sampler_shape, devices[:sampler_chips])
    results = []
    for i, (label, kind, what, route) in enumerate(plan):
        log(f"[{i + 1}/{len(plan)}] compiling {label} ...")
        if kind == "train":
            batch = batch_size or config[what].train.batch_size
            model = config[what].get("model", {})
            settings = {"dtype": model.get("dtype", "float32")}
            if what in TEXT_STAGES:
                settings |= {
                    "remat": model.get("remat", "none"),
                    "scan": model.get("scan_layers", False),
                }
            fn, args = train_program(config, what, train_mesh, batch, route or "precomputed")
            mesh = train_mesh
        else:
            batch = sampler_batch
            steps = config.base.sampling.num_steps
            settings = {"steps": steps}
            if what:
                settings["steps"] = f"{steps}+{config.superres.sampling.num_steps}"
            fn, args = sampler_program(config, sampler_mesh, batch, what, route)
            mesh = sampler_mesh
        result = compile_program(label, fn, args, mesh, topology, batch, settings)
        results.append(result)
        log(format_result(result))
    return results


def main(argv: list[str]) -> int:
    from muse_jax import cli

    cli.check_no_extra_args(argv)
    topology = tpu.parse(_TOPOLOGY.value, _NUM_SLICES.value)
    programs = parse_list(_PROGRAMS.value, TRAIN_PROGRAMS + ("sampler",), "program")
    routes = parse_list(_TEXT.value, TEXT_ROUTES, "text route")
    config = _CONFIG.value
    plan = planned_programs(config, programs, routes)
    validate(config, topology, plan, _BATCH.value, _SAMPLER_BATCH.value, _SAMPLER_CHIPS.value)
    missing = tpu.libtpu_missing()
    if missing:
        raise cli.UsageError(f"Cannot compile for TPUs here: {missing}.")
    results = run(
        config,
        topology,
        programs,
        routes,
        batch_size=_BATCH.value,
        sampler_batch=_SAMPLER_BATCH.value,
        sampler_chips=_SAMPLER_CHIPS.value,
    )
    if _JSON_OUT.value:
        from muse_jax import storage

        storage.write_text(
            _JSON_OUT.value, json.dumps([r.to_json() for r in results], indent=2) + "\n"
        )
    over = [r for r in results if not r.fits]
    for r in over:
        what = "of temporaries alone" if r.error else "per device"
        print(
            f"does not fit: {r.program} needs {_gib(r.total_bytes)} GiB {what}, "
            f"{_gib(r.total_bytes - r.hbm_bytes)} GiB over the {topology.chip.name}'s "
            f"{_gib(r.hbm_bytes)} GiB HBM",
            file=sys.stderr,
        )
    return 1 if over else 0


def run_main() -> None:
    """Console script `muse-aot`."""
    tpu.quiet_libtpu_environment()
    from muse_jax import cli

    _define_flags()
    cli.run(main)


def _define_flags() -> None:
    global _CONFIG, _TOPOLOGY, _NUM_SLICES, _PROGRAMS, _TEXT, _BATCH
    global _SAMPLER_BATCH, _SAMPLER_CHIPS, _JSON_OUT
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _TOPOLOGY = flags.DEFINE_string(
        "topology", "v4-8", "TPU slice: v4-32 (Cloud TPU name) or a chip grid such as v4:2x2x4."
    )
    _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Identical slices (data axis spans them).")
    _PROGRAMS = flags.DEFINE_string(
        "programs",
        ",".join(TRAIN_PROGRAMS + ("sampler",)),
        "Comma list of train steps (stages the config lacks are skipped) and 'sampler'.",
    )
    _TEXT = flags.DEFINE_string(
        "text", "precomputed,graph", "Text routes for base, superres and sampler programs."
    )
    _BATCH = flags.DEFINE_integer("batch_size", 0, "Global train batch (0: each stage's config).")
    _SAMPLER_BATCH = flags.DEFINE_integer("sampler_batch", 32, "Images per sampler call.")
    _SAMPLER_CHIPS = flags.DEFINE_integer("sampler_chips", 1, "Chips the sampler runs on.")
    _JSON_OUT = flags.DEFINE_string("json_out", "", "Write every figure here as JSON.")
    flags.mark_flag_as_required("config")


if __name__ == "__main__":
    run_main()
