r"""Train-step throughput and MFU of every stage of a config, on random weights.

Each stage's jitted train step (the trainer's: donated state, frozen inputs) runs on a synthetic
batch of the stage's shapes; with the stage's `train.steps_per_call` K > 1 so does the trainer's
K-step program, whose rate is the headline (the K=1 MFU is printed beside it). Frozen parts
(tokenizers, ...) are random values, which cost the same FLOPs as trained ones. The stages
and their shapes come from the registry (`muse_jax.stages`) and each stage's `batch_spec` and
`frozen`. Prints steps/s, examples/s, XLA's FLOPs per step and the MFU against a float32
matmul measured in the same run, plus the seconds that `num_steps` of the config take at that
rate (compile time reported apart).

  python benchmarks/train_steps.py --config=configs/shapes_tiny.py
  python benchmarks/train_steps.py --config=configs/shapes_tiny.py --stages=superres --steps=20
  python benchmarks/train_steps.py --stages=base --set base.model.width=256 --set data.image_size=64
"""

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax import entry  # noqa: E402

if __name__ == "__main__":
    entry.prepare_process()  # Before jax starts: huge pages, MUSE_JAX_ONEDNN's flags.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax import config_files, parallel, stages  # noqa: E402
from muse_jax.train import stage as stage_lib  # noqa: E402
from muse_jax.train import trainer  # noqa: E402


def wall_times(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after one warm-up call; results are waited for."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one jitted n^3 matmul in `dtype`, best of repeats: the roofline MFU is measured
    against. bf16 accumulates in f32 (the form our models use and XLA's CPU backend runs
    natively, see models/precision.py)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32).astype(a.dtype))
    return 2 * n**3 / min(wall_times(lambda: f(x), repeats))


def cost_flops(compiled) -> float:
    """FLOPs of a compiled executable by XLA's cost analysis (NaN if it reports none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def random_frozen(stage, mesh, rules):
    """What `Stage.frozen` would load from checkpoints: random values of the same shapes,
    dtypes and shardings (the same FLOPs as trained weights)."""
    abstract = stage.frozen(mesh, rules, abstract=True)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(1), max(len(leaves), 1))
    values = [
        jax.device_put(0.02 * jax.random.normal(k, x.shape, x.dtype), x.sharding)
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, values)


def synthetic_batch(stage, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of `stage.batch_spec`'s shapes: images uniform in [-1, 1], integer inputs
    (caption ids, masks) all ones."""
    rng = np.random.default_rng(0)
    out = {}
    for key, spec in stage.batch_spec(batch_size).items():
        if np.issubdtype(spec.dtype, np.integer):
            out[key] = np.ones(spec.shape, spec.dtype)
        else:
            out[key] = rng.uniform(-1, 1, spec.shape).astype(spec.dtype)
    return out


def bench(name: str, config, workdir: str, steps: int, peak: float) -> dict:
    stage = stage_lib.get(name)(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    state, shardings, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    frozen = random_frozen(stage, mesh, rules)
    bs = stage.train_config.batch_size
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(stage, bs).items()}

    def step_fn(state, batch, frozen):
        with nn.logical_axis_rules(list(rules)):
            return stage.train_step(state, batch, frozen)

    step = jax.jit(step_fn, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    flops = cost_flops(compiled)  # Per step, from the one-step program.
    state, dt_single = _seconds_per_step(compiled, state, (batch, frozen), steps, 1)
    k = trainer.steps_per_call_of(stage.train_config)
    dt = dt_single
    if k > 1:  # The trainer's multi-step program: what training runs at.
        batches = jax.tree.map(lambda x: jnp.stack([x] * k), batch)
        multi = jax.jit(trainer.multi_step(step_fn), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled_k = multi.lower(state, batches, frozen).compile()
        compile_s += time.perf_counter() - t0
        state, dt = _seconds_per_step(compiled_k, state, (batches, frozen), steps, k)
    return dict(
        stage=name,
        batch=bs,
        steps_per_call=k,
        steps_per_s=1 / dt,
        examples_per_s=bs / dt,
        gflop_per_step=flops / 1e9,
        mfu=flops / dt / peak,
        mfu_single=flops / dt_single / peak,
        compile_s=compile_s,
        config_steps=int(stage.train_config.num_steps),
        config_s=int(stage.train_config.num_steps) * dt,
    )


def _seconds_per_step(compiled, state, args: tuple, steps: int, per_call: int):
    """(state, wall seconds per train step) over at least `steps` steps after one warm-up call."""
    state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)
    calls = -(-steps // per_call)
    t0 = time.perf_counter()
    for _ in range(calls):
        state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t0) / (calls * per_call)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    parser.add_argument("--stages", default="", help="Comma-separated (default: the config's).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/muse_bench_train_steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set base.model.width=256 (Python literal values)",
    )
    args = parser.parse_args()
    config = config_files.load(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # A plain string.
        config.update_from_flattened_dict({key: value})
    peak = matmul_peak()
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (MUSE_JAX_ONEDNN=1 adds muse_jax's oneDNN flags); "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (muse_jax.host_memory)"
    )
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"float32 matmul (2048^3, jit, best of 5): {peak / 1e9:.1f} GFLOP/s"
    )
    head = (
        f"{'stage':<20}{'batch':>6}{'K':>3}{'steps/s':>9}{'ex/s':>9}{'GFLOP/step':>12}{'MFU':>7}"
        f"{'MFU K=1':>9}{'compile s':>11}{'config steps -> s':>19}"
    )
    print(head)
    total = 0.0
    for name in args.stages.split(",") if args.stages else stages.enabled(config):
        r = bench(name, config, args.workdir, args.steps, peak)
        total += r["config_s"]
        print(
            f"{r['stage']:<20}{r['batch']:>6}{r['steps_per_call']:>3}{r['steps_per_s']:>9.2f}"
            f"{r['examples_per_s']:>9.1f}{r['gflop_per_step']:>12.2f}{r['mfu']:>7.0%}"
            f"{r['mfu_single']:>9.0%}{r['compile_s']:>11.1f}"
            f"{r['config_steps']:>10} -> {r['config_s']:>5.0f}"
        )
    print(
        f"all listed stages at these rates: {total / 60:.1f} min of steps (excl. compile, data, summaries)"
    )


if __name__ == "__main__":
    main()
