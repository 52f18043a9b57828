"""Launchers (dry runs) and sweep expansion: fast, no gcloud, no training."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from muse_jax import sweep
from tests.helpers import ROOT, run_command, run_module

TPU = os.path.join(ROOT, "launch", "tpu_train.sh")
LOCAL = os.path.join(ROOT, "launch", "local_train.sh")
EXAMPLE_SWEEP = os.path.join(ROOT, "configs", "sweeps", "shapes_lr.py")
CONFIG = "configs/shapes_tiny.py"


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`bash SCRIPT ARGS` with this interpreter as $PYTHON and `env` over the environment."""
    environ = dict(os.environ, PYTHON=sys.executable, **env)
    return run_command(["bash", script, *args], env=environ, timeout=60)


def _dry(script: str, *args: str) -> list[list[str]]:
    """The dry run's lines, each split as a shell would split it (commands must be exact)."""
    r = _run(script, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def _remote(cmd: list[str]) -> list[str]:
    """The words of the command that `gcloud ... ssh --command CMD` runs on the workers."""
    return shlex.split(cmd[cmd.index("--command") + 1])


def _train_args(words: list[str]) -> list[str]:
    return words[words.index("muse_jax.train") + 1 :]


def _write(tmp_path, body: str) -> str:
    path = tmp_path / "sweep_def.py"
    path.write_text(body)
    return str(path)


# --- tpu_train.sh ---------------------------------------------------------------------------


def test_tpu_dry_run_commands():
    lines = _dry(
        TPU,
        "--name=my-tpu",
        "--zone=us-east5-a",
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",
        f"--config={CONFIG}",
        "--workdir=gs://bucket/muse",
        "--stage=tokenizer,base",
        "--config.base.train.num_steps=5000",
        "--config.base.sampling.negative_prompt",
        "a blue 'square'",
    )
    create, tar, scp, install, tok, base = lines
    describe = shlex.split(create[0].split("$(", 1)[1])
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert "||" in create
    rest = create[create.index("||") + 1 :]
    assert rest[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    delete = create[create.index("TERMINATED)") + 1 :]
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    for flag in ("--zone=us-east5-a", "--accelerator-type=v5litepod-16"):
        assert flag in rest
    assert "--version=v2-alpha-tpuv5-lite" in rest
    assert "tar" in tar and "ls-files" in tar
    assert scp[4] == "scp" and "--worker=all" in scp
    assert install[4:6] == ["ssh", "my-tpu"] and "--worker=all" in install
    assert "pip install -q -e . 'jax[tpu]'" in install[install.index("--command") + 1]
    for cmd, stage in ((tok, "tokenizer"), (base, "base")):
        assert cmd[4:6] == ["ssh", "my-tpu"] and "--worker=all" in cmd
        words = _remote(cmd)
        assert "MUSE_DISTRIBUTED=1" in words
        assert _train_args(words) == [
            f"--config={CONFIG}",
            "--workdir=gs://bucket/muse",
            f"--config.stage={stage}",
            "--config.base.train.num_steps=5000",
            "--config.base.sampling.negative_prompt=a blue 'square'",  # One word, quotes intact.
        ]


def test_tpu_dry_run_repo_and_log(tmp_path):
    log_dir = str(tmp_path / "my logs")
    lines = _dry(
        TPU,
        f"--config={os.path.join(ROOT, CONFIG)}",  # Absolute: made relative to the repository.
        "--workdir=gs://b/w/",
        "--repo=https://example.com/muse.git",
        "--ref=dev",
        f"--log-dir={log_dir}",
    )
    assert not any(line[0] == "tar" for line in lines)  # Nothing is copied with --repo.
    install = lines[1][lines[1].index("--command") + 1]
    assert "git clone --depth=1 --branch=dev https://example.com/muse.git" in install
    assert lines[2] == ["mkdir", "-p", log_dir]
    train = lines[3]
    assert train[-4:] == ["2>&1", "|", "tee", "-a"] or train[-3:-1] == ["tee", "-a"]
    assert train[-1] == os.path.join(log_dir, "train.log")
    assert _train_args(_remote(train)) == [f"--config={CONFIG}", "--workdir=gs://b/w"]


def test_tpu_dry_run_sweep():
    lines = _dry(
        TPU,
        f"--config={CONFIG}",
        "--workdir=gs://b/sweep",
        "--stage=base",
        f"--sweep={EXAMPLE_SWEEP}",
        "--skip-install",
        "--config.base.train.num_steps=100",
    )
    trains = [_train_args(_remote(line)) for line in lines if "--command" in line]
    assert len(trains) == 6 and len(lines) == 7  # Describe/create, then one run per point.
    workdirs = [a for t in trains for a in t if a.startswith("--workdir=")]
    assert len(set(workdirs)) == 6
    assert all(w.startswith("--workdir=gs://b/sweep/") for w in workdirs)
    names = [n for n, _ in sweep.expand(EXAMPLE_SWEEP)]
    assert workdirs == [f"--workdir=gs://b/sweep/{n}" for n in names]
    for t, (_, point) in zip(trains, sweep.expand(EXAMPLE_SWEEP)):
        assert t[3] == "--config.base.train.num_steps=100"
        assert t[4:6] == point
        # Base-only sweeps share the sweep root's tokenizer and dataset.
        assert t[6:] == [
            "--config.tokenizer_workdir=gs://b/sweep",
            "--config.data.data_dir=gs://b/sweep/data",
        ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([f"--config={CONFIG}", "--workdir=/local/dir"], "must be a gs:// path"),
        (["--workdir=gs://b/w"], "--config is required"),
        ([f"--config={CONFIG}"], "--workdir is required"),
        (["--config=configs/nope.py", "--workdir=gs://b/w"], "config file not found"),
        ([f"--config={CONFIG}", "--workdir=gs://b/w", "--bogus"], "unknown argument '--bogus'"),
        ([f"--config={CONFIG}", "--workdir=gs://b/w", "--stage=vq"], "--stage must be"),
        ([f"--config={CONFIG}", "--workdir=gs://b/w", f"--sweep={EXAMPLE_SWEEP}"], "needs --stage"),
        ([f"--config={CONFIG}", "--workdir=gs://b/w", "--restarts=-1"], "--restarts must be"),
    ],
)
def test_tpu_usage_errors(args, message):
    r = _run(TPU, "--dry-run", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and message in r.stderr


_FAKE_GCLOUD = """#!/usr/bin/env bash
# Records each call; the slice is PREEMPTED after the first training command, which fails.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
    *describe*) cat "$FAKE_DIR/state" 2>/dev/null || exit 1 ;;
    *create*) echo READY > "$FAKE_DIR/state" ;;
    *delete*) rm -f "$FAKE_DIR/state" ;;
    *muse_jax.train*)
        if [ ! -e "$FAKE_DIR/preempted" ]; then
            touch "$FAKE_DIR/preempted"; echo PREEMPTED > "$FAKE_DIR/state"; exit 255
        fi ;;
esac
"""


def _fake_gcloud(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "MUSE_RESTART_DELAY_S": "0",
    }


def _calls(tmp_path) -> list[str]:
    return [c.split()[3] for c in (tmp_path / "calls").read_text().splitlines()]


def test_tpu_restarts_recreate_a_preempted_slice_and_rerun(tmp_path):
    args = [f"--config={CONFIG}", "--workdir=gs://b/w", "--name=t", "--restarts=1"]
    r = _run(TPU, *args, **_fake_gcloud(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "restart 1 of 1" in r.stderr
    # First attempt: create, copy, install, train (fails: preempted). Second: the preempted
    # slice is deleted and created again, the code reinstalled, and training rerun.
    first = ["describe", "create", "scp", "ssh", "ssh"]
    assert _calls(tmp_path) == first + ["describe", "delete", "create", "scp", "ssh", "ssh"]


def test_tpu_without_restarts_fails_with_the_commands_code(tmp_path):
    args = [f"--config={CONFIG}", "--workdir=gs://b/w", "--name=t"]
    r = _run(TPU, *args, **_fake_gcloud(tmp_path))
    assert r.returncode == 255 and "restart 1" not in r.stderr
    assert _calls(tmp_path) == ["describe", "create", "scp", "ssh", "ssh"]


def test_tpu_without_gcloud_fails_in_one_line(tmp_path):
    # A PATH with the usual tools but no gcloud.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "git", "dirname", "basename", "tar", "mkdir", "python3"):
        target = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if target:
            os.symlink(target, bin_dir / tool)
    r = _run(TPU, f"--config={CONFIG}", "--workdir=gs://b/w", PATH=str(bin_dir))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: gcloud not found")
    r = _run(TPU, "--dry-run", f"--config={CONFIG}", "--workdir=gs://b/w", PATH=str(bin_dir))
    assert r.returncode == 0 and "gcloud compute tpus tpu-vm ssh" in r.stdout  # No gcloud needed.


def test_help():
    for script in (TPU, LOCAL):
        r = _run(script, "--help")
        assert r.returncode == 0 and "--dry-run" in r.stdout and "--sweep" in r.stdout


# --- local_train.sh -------------------------------------------------------------------------


def test_local_dry_run():
    (line,) = _dry(LOCAL, f"--config={CONFIG}:smoke", "--workdir=runs/x", "--config.seed=3")
    assert line[:3] == [sys.executable, "-m", "muse_jax.train"]
    assert line[3:] == [f"--config={CONFIG}:smoke", "--workdir=runs/x", "--config.seed=3"]


def test_local_dry_run_sweep_and_stages():
    lines = _dry(
        LOCAL,
        f"--config={CONFIG}",
        "--workdir=runs/sw",
        "--stage=tokenizer,base",
        f"--sweep={EXAMPLE_SWEEP}",
    )
    assert len(lines) == 12  # 6 points x 2 stages; each point trains its own tokenizer.
    workdirs = {a for line in lines for a in line if a.startswith("--workdir=")}
    assert len(workdirs) == 6
    assert not any("tokenizer_workdir" in a for line in lines for a in line)


def test_local_sweep_with_unknown_key_fails(tmp_path):
    path = _write(
        tmp_path, "def get_sweep():\n    return [{'base.train.nope': 1}, {'base.train.nope': 2}]\n"
    )
    r = _run(
        LOCAL, "--dry-run", f"--config={CONFIG}", "--workdir=w", "--stage=base", f"--sweep={path}"
    )
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown config key 'base.train.nope'" in r.stderr


# --- muse_jax.sweep -------------------------------------------------------------------------


def test_product_and_zip_counts_and_names():
    points = sweep.product(
        sweep.axis("config.base.train.optimizer.learning_rate", [1e-4, 3e-4]),
        sweep.zipped(
            sweep.axis("sampling.guidance_scale", [1.0, 2.0, 4.0]),
            sweep.axis("sampling.guidance_schedule", ["constant", "linear", "linear"]),
        ),
        sweep.fixed(base__cond_dropout=0.1),
    )
    assert len(points) == 6
    assert points[0] == {
        "base.train.optimizer.learning_rate": 1e-4,
        "sampling.guidance_scale": 1.0,
        "sampling.guidance_schedule": "constant",
        "base.cond_dropout": 0.1,
    }
    names = sweep.name_points(points)
    assert len(set(names)) == 6
    assert names[0] == "lr0.0001_gs1_gschedconstant"  # Fixed keys are not in the names.
    assert all(n == n.strip() and "/" not in n and " " not in n for n in names)
    assert sweep.overrides(points[0])[0] == "--config.base.train.optimizer.learning_rate=0.0001"


def test_names_are_safe_and_unique():
    points = sweep.chain(
        [{"sampling.negative_prompt": "a red/blue  circle!"}],
        [{"sampling.negative_prompt": "a red/blue circle?"}],
        [{"data.held_out": ("red triangle",), "seed": True}],
    )
    names = sweep.name_points(points)
    assert len(set(names)) == 3
    for n in names:
        assert n and all(c.isalnum() or c in "._-+=" for c in n), n
    assert sweep.overrides(points[2]) == [
        "--config.data.held_out=(red triangle,)",
        "--config.seed=True",
    ]


def test_expand_example_sweep_and_keys_exist():
    from configs import shapes_tiny

    runs = sweep.expand(EXAMPLE_SWEEP)
    assert len(runs) == 6 and len({n for n, _ in runs}) == 6
    config = shapes_tiny.get_config()
    for _, flags in runs:
        for flag in flags:
            key, value = flag.removeprefix("--config.").split("=", 1)
            node = config
            for part in key.split("."):
                node = node[part]  # KeyError: the sweep names a key the config lacks.
            assert isinstance(node, float) and float(value) > 0


def test_cli_output(tmp_path):
    path = _write(
        tmp_path,
        "from muse_jax.sweep import axis, product\n"
        "def get_sweep():\n"
        "    return product(axis('seed', [0, 1]), axis('base.sampling.negative_prompt', ['a b']))\n",
    )
    r = run_module("muse_jax.sweep", path, f"--config={CONFIG}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "seed0\t--config.seed=0 '--config.base.sampling.negative_prompt=a b'",
        "seed1\t--config.seed=1 '--config.base.sampling.negative_prompt=a b'",
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        (None, "sweep file not found"),
        ("x = 1\n", "defines no get_sweep()"),
        ("def get_sweep():\n    return []\n", "returned no points"),
        (
            "from muse_jax.sweep import axis, zipped\n"
            "def get_sweep():\n    return zipped(axis('seed', [0, 1]), axis('base.cond_dropout', [0.1]))\n",
            "zipped axes have different lengths: [2, 1]",
        ),
        ("def get_sweep():\n    return [{'bad key': 1}]\n", "bad override key 'bad key'"),
        ("def get_sweep():\n    return 3\n", "expected a list of override dicts"),
    ],
)
def test_errors(tmp_path, body, message):
    path = str(tmp_path / "missing.py") if body is None else _write(tmp_path, body)
    with pytest.raises(sweep.SweepError, match=re.escape(message)):
        sweep.expand(path)
    r = run_module("muse_jax.sweep", path)
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr == f"error: {r.stderr[7:]}" and message in r.stderr and r.stderr.count("\n") == 1
    )
    # The launchers stop with the same message.
    r = _run(
        TPU,
        "--dry-run",
        f"--config={CONFIG}",
        "--workdir=gs://b/w",
        "--stage=base",
        f"--sweep={path}",
    )
    assert r.returncode == 2 and r.stdout == "" and message in r.stderr


def test_readme_pod_command_dry_runs():
    """The README's "Train on a TPU pod" command, word for word, as a dry run."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Train on a TPU pod") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[0] == "launch/tpu_train.sh" and "--restarts=20" in words
    lines = _dry(TPU, *words[1:])
    train = [_train_args(_remote(line)) for line in lines if "muse_jax.train" in " ".join(line)]
    assert [t[2] for t in train] == ["--config.stage=tokenizer", "--config.stage=base"]
    assert train[0][:2] == ["--config=configs/user_data.py", "--workdir=gs://my-bucket/muse/run1"]
