"""The tiny pipeline with a `gs://` workdir against a local GCS emulator: train, SIGTERM mid-stage,
resume, sample, evaluate. Everything must land in the bucket and nothing in a local `gs:` folder;
the interrupted-and-resumed stage must equal an uninterrupted one to the bit."""

from __future__ import annotations

import os

import pytest

from tests.gcs_emulator import gcs_emulator
from tests.helpers import ROOT, child_env, run_python, sigterm_after

CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py") + ":smoke"
TOKENIZER = [
    "--config.tokenizer.train.num_steps=8",
    "--config.tokenizer.train.log_every=1",
    "--config.tokenizer.train.summary_every=4",
    "--config.tokenizer.train.checkpoint_every=4",
]
BASE = ["--config.base.train.num_steps=2", "--config.base.train.summary_every=2"]

# Loads one stage's full train state from two workdirs and prints whether they are identical.
_COMPARE = """
import sys, jax, numpy as np
from configs import shapes_tiny
from muse_jax import parallel
from muse_jax import checkpoints
from muse_jax.train.tokenizer_stage import TokenizerStage
config = shapes_tiny.get_config("smoke")
states = []
for workdir in sys.argv[1:]:
    stage = TokenizerStage(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    states.append(checkpoints.load_state(stage.stage_dir, abstract, "tokenizer"))
(a, sa), (b, sb) = states
same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print("STEPS", sa, sb, "IDENTICAL" if same else "DIFFERENT", flush=True)
"""


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    proc = run_python(*args, env=env, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


def _train(env, workdir: str, stage: str, *overrides: str) -> list[str]:
    args = ["-m", "muse_jax.train", f"--config={CONFIG}", f"--workdir={workdir}"]
    return [*args, f"--config.stage={stage}", *overrides]


@pytest.mark.slow
def test_smoke_pipeline_on_a_gs_workdir(tmp_path):
    local = str(tmp_path / "local")
    with gcs_emulator() as gcs:
        env = child_env(**gcs.env)
        run = f"gs://{gcs.bucket}/run"

        # The tokenizer stage on gs://, stopped by SIGTERM after step 3, then resumed.
        returncode, out = sigterm_after(
            _train(env, run, "tokenizer", *TOKENIZER), "[tokenizer] step 3/8", env=env
        )
        assert returncode == 0 and "(preempted); checkpoint saved" in out, out[-3000:]
        assert "training steps 4 -> 8" not in out
        out = _run(env, *_train(env, run, "tokenizer", *TOKENIZER))
        assert "resumed from checkpoint step" in out and "completed at step 8" in out, out

        # The same stage uninterrupted, on local disk: identical state.
        _run(env, *_train(env, local, "tokenizer", *TOKENIZER))
        out = _run(env, "-c", _COMPARE, run, local)
        assert "STEPS 8 8 IDENTICAL" in out, out

        # Base stage, sampling and evaluation, all on gs://.
        _run(env, *_train(env, run, "base", *BASE))
        samples = f"gs://{gcs.bucket}/samples"
        sample = ["-m", "muse_jax.sample", f"--config={CONFIG}", f"--workdir={run}", *BASE]
        _run(
            env,
            *sample,
            "--prompt=a red circle",
            "--num_samples=2",
            "--stages=base",
            f"--output_dir={samples}",
        )
        evaluate = ["-m", "muse_jax.evaluate", f"--config={CONFIG}", f"--workdir={run}", *BASE]
        _run(env, *evaluate, "--stages=base")

        objects = gcs.list()
    expected = [
        "run/data/shapes_words.model",
        "run/tokenizer/config.json",
        "run/tokenizer/checkpoints/8/params/_METADATA",
        "run/tokenizer/checkpoints/8/train_state/_METADATA",
        "run/base/checkpoints/2/params/_METADATA",
        "samples/grid.png",
        "samples/sample_001.png",
        "samples/samples.json",
        "run/eval/base/metrics_2.json",
        "run/eval/base/evaluated.json",
    ]
    for name in expected:
        assert name in objects, (name, objects)
    for prefix in ("run/tokenizer/events.out.tfevents.", "run/eval/base/events.out.tfevents."):
        assert any(o.startswith(prefix) for o in objects), prefix
    assert any(o.startswith("run/data/tfds/") for o in objects)
    assert any(o.startswith("run/compilation_cache/") for o in objects)
    for where in (ROOT, str(tmp_path), os.getcwd()):
        assert not os.path.exists(os.path.join(where, "gs:")), where


@pytest.mark.slow
def test_an_unreachable_bucket_is_one_line_and_writes_nothing(tmp_path):
    with gcs_emulator() as gcs:
        env = child_env(**gcs.env)
        run = "gs://no-such-bucket/run"
        out = str(tmp_path / "out")
        commands = [
            _train(env, run, "tokenizer"),
            ["-m", "muse_jax.sample", f"--config={CONFIG}", f"--workdir={run}"]
            + ["--prompt=a red circle", "--stages=base", f"--output_dir={out}"],
            ["-m", "muse_jax.evaluate", f"--config={CONFIG}", f"--workdir={run}"],
        ]
        for args in commands:
            proc = run_python(*args, cwd=tmp_path, env=env, timeout=300)
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert errors == [
                f"error: using {run} failed: bucket gs://no-such-bucket does not exist "
                "(or is not visible to these credentials)."
            ]
        assert gcs.list() == []
    assert os.listdir(tmp_path) == []
