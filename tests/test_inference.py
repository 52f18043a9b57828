"""The Python API (`MusePipeline`), exported model directories and the layer rule that the
inference package never imports the trainer."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from muse_jax.errors import UsageError
from muse_jax.inference import export, weights
from muse_jax.inference import model as model_lib
from muse_jax.inference.pipeline import MusePipeline
from muse_jax.stages import NAMES as STAGE_NAMES
from tests.helpers import ROOT, child_env, run_module, run_python

PROMPTS = ["a large red circle on the left", "a small blue square at the top"]


def _env(**extra) -> dict[str, str]:
    return child_env(TF_CPP_MIN_LOG_LEVEL="2", **extra)


def test_the_inference_package_imports_nothing_from_train():
    code = textwrap.dedent(
        """
        import sys
        import muse_jax
        from muse_jax import MusePipeline
        import muse_jax.inference.export, muse_jax.eval.alignment_eval, muse_jax.eval.report
        import muse_jax.eval.evaluator
        print(sorted(m for m in sys.modules if m.startswith("muse_jax.train")))
        """
    )
    out = run_python("-c", code, env=_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_below_train_imports_it_even_inside_a_function():
    """The layers data, models, text, sampling, inference and eval never reach up into train/
    (a static scan: function-level imports count too)."""
    import ast

    offenders = []
    for package in ("data", "models", "text", "sampling", "inference", "eval"):
        for path in sorted(Path(ROOT, "muse_jax", package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "muse_jax.train" or n.startswith("muse_jax.train.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.fixture(scope="module")
def exported(trained_cascade, tmp_path_factory):
    config, workdir = trained_cascade
    out = str(tmp_path_factory.mktemp("exported") / "model")
    export.export(model_lib.from_workdir(config, workdir), out, source=workdir)
    return config, workdir, out


def _compiles() -> list[str]:
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


@pytest.mark.slow
def test_guidance_temperature_and_seed_compile_nothing_new(exported):
    _, _, out = exported
    pipe = MusePipeline.from_pretrained(out, batch_size=4)
    events = _compiles()
    first = pipe(PROMPTS, guidance_scale=3.0, temperature=1.0, seed=0)
    warm = len(events)
    assert warm > 0
    second = pipe(PROMPTS, guidance_scale=5.5, temperature=0.7, seed=1)
    third = pipe(PROMPTS, guidance_scale=1.25, temperature=1.3, seed=2, negative_prompt="a cat")
    # The config's own schedule given explicitly: the same images, no compile.
    sampling = pipe.config.base.sampling
    schedule = (sampling.temperature, sampling.temperature_final)
    same = pipe(PROMPTS, guidance_scale=3.0, temperature=schedule, seed=0)
    np.testing.assert_array_equal(same.array, pipe(PROMPTS, guidance_scale=3.0, seed=0).array)
    assert len(events) == warm, "a runtime setting recompiled the sampler"
    assert not np.array_equal(first.tokens, second.tokens)
    assert not np.array_equal(second.tokens, third.tokens)
    # A new step count or batch size compiles once, then is cached.
    pipe(PROMPTS, num_steps=3)
    after_steps = len(events)
    assert after_steps > warm
    pipe(PROMPTS, num_steps=3, guidance_scale=2.0, seed=5)
    assert len(events) == after_steps
    pipe(PROMPTS, num_images_per_prompt=2)  # 4 rows instead of 2.
    after_batch = len(events)
    assert after_batch > after_steps
    pipe(PROMPTS, num_images_per_prompt=2, seed=9, temperature=0.9)
    assert len(events) == after_batch


@pytest.mark.slow
def test_exported_model_samples_bit_identically_to_the_workdir(exported):
    config, workdir, out = exported
    names = sorted(os.listdir(out))
    assert names == [
        "README.md",
        "base.safetensors",
        "base_decoder.safetensors",
        "config.json",
        "decoder.safetensors",
        "superres.safetensors",
        "superres_tokenizer.safetensors",
        "tokenizer.safetensors",
        "vocab.model",
    ]
    manifest = json.loads(Path(out, "config.json").read_text())
    assert manifest["stages"] == "cascade"
    assert set(manifest["components"]) == set(STAGE_NAMES)  # Every stage trained.
    exported_bytes = sum(os.path.getsize(os.path.join(out, n)) for n in names)
    trained_bytes = sum(p.stat().st_size for p in Path(workdir).rglob("*") if p.is_file())
    assert exported_bytes < trained_bytes / 4  # No optimizer state, data or logs.
    card = Path(out, "README.md").read_text()
    assert "| base | 6 |" in card and "Data:" in card
    for stages in ("cascade", "base"):
        a = MusePipeline.from_workdir(config, workdir, stages=stages)(
            PROMPTS, seed=4, num_images_per_prompt=2
        )
        b = MusePipeline.from_pretrained(out, stages=stages)(
            PROMPTS, seed=4, num_images_per_prompt=2
        )
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert a.steps == b.steps


@pytest.mark.slow
def test_requests_run_in_batches_and_a_ceiling_refuses_big_ones(exported):
    _, _, out = exported
    pipe = MusePipeline.from_pretrained(out, batch_size=3, max_images=6)
    parts = list(pipe.generate(PROMPTS, num_images_per_prompt=3, seed=7))
    assert [len(p.array) for p in parts] == [3, 3]
    whole = pipe(PROMPTS, num_images_per_prompt=3, seed=7)
    np.testing.assert_array_equal(whole.array, np.concatenate([p.array for p in parts]))
    assert whole.captions == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    # A request that fits in one batch is one call: equal to a pipeline of a larger batch size.
    big = MusePipeline.from_pretrained(out, batch_size=16)
    np.testing.assert_array_equal(pipe(PROMPTS, seed=7).array, big(PROMPTS, seed=7).array)
    with pytest.raises(ValueError, match="7 images requested; this pipeline makes at most 6"):
        pipe(PROMPTS[:1], num_images_per_prompt=7)
    with pytest.raises(ValueError, match="Empty prompt"):
        pipe(["  "])
    with pytest.raises(ValueError, match="at most 1000 are accepted"):
        pipe(["a red circle " * 100])
    base_only = MusePipeline.from_pretrained(out, stages="base")
    with pytest.raises(ValueError, match="without the super-res stages"):
        base_only(PROMPTS, stages="cascade")
    assert base_only(PROMPTS).array.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_inpaint_and_outpaint_keep_the_pixels_outside_the_mask(exported):
    _, _, out = exported
    pipe = MusePipeline.from_pretrained(out)
    source = pipe(PROMPTS[:1], seed=0).images[0]
    size = source.size[0]
    mask = np.zeros((size, size), np.uint8)
    mask[8:40, 8:40] = 255
    edit = pipe.inpaint(source, Image.fromarray(mask), "a large green triangle", num_images=2)
    assert edit.array.shape == (2, size, size, 3)
    outside = mask == 0
    for image in edit.array:
        np.testing.assert_array_equal(image[outside], np.asarray(source)[outside])
    wider = pipe.outpaint(np.asarray(source)[:, : size // 2], (0, 0, size // 2, 0), "a red circle")
    assert wider.array.shape == (1, size, size, 3) and wider.mask[:, -1].all()
    with pytest.raises(ValueError, match="no white pixels"):
        pipe.inpaint(source, Image.new("L", (size, size)), "a red circle")
    with pytest.raises(ValueError, match="mask is 5x5 but the image is"):
        pipe.inpaint(source, Image.new("L", (5, 5), 255), "a red circle")


@pytest.mark.slow
def test_a_damaged_export_names_the_tensor(exported, tmp_path):
    import shutil

    _, _, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    path = broken / "base.safetensors"
    tree = weights._read_arrays(str(path))
    name = sorted(tree)[0]
    del tree[name]
    from flax import traverse_util

    weights.save(str(path), traverse_util.unflatten_dict(tree, sep="."))
    with pytest.raises(weights.WeightsError, match=re.escape(name) + " is missing from"):
        MusePipeline.from_pretrained(str(broken))
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not an exported muse_jax model"):
        MusePipeline.from_pretrained(str(broken))


@pytest.mark.slow
def test_export_binary_writes_once_and_refuses_bad_input(trained_cascade, tmp_path):
    config_path = f"{ROOT}/configs/shapes_tiny.py:smoke"
    _, workdir = trained_cascade

    def run(*args):
        return run_module(
            "muse_jax.export", f"--config={config_path}", *args, env=_env(), cwd=tmp_path
        )

    out = tmp_path / "model"
    done = run(f"--workdir={workdir}", f"--out={out}", "--stages=base")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported base model to" in done.stdout
    assert json.loads((out / "config.json").read_text())["stages"] == "base"
    again = run(f"--workdir={workdir}", f"--out={out}", "--stages=base")
    assert again.returncode == 2 and "already holds an exported model" in again.stderr
    missing = tmp_path / "nowhere"
    bad = run(f"--workdir={missing}", f"--out={tmp_path / 'other'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "other").exists() and not missing.exists()


@pytest.mark.slow
def test_sample_binary_writes_in_batches(exported, tmp_path):
    config, workdir, out = exported
    args = [
        f"--config={ROOT}/configs/shapes_tiny.py:smoke",
        f"--workdir={workdir}",
        "--prompt=a large red circle on the left",
        "--seed=3",
        "--batch_size=2",
    ]
    done = run_module(
        "muse_jax.sample", *args, "--num_samples=3", f"--output_dir={tmp_path / 's'}", env=_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[sample] 2/3 images written" in done.stdout
    files = sorted(p.name for p in (tmp_path / "s").glob("sample_*.png"))
    assert files == ["sample_000.png", "sample_001.png", "sample_002.png"]
    expected = MusePipeline.from_pretrained(out, batch_size=2)(
        ["a large red circle on the left"], num_images_per_prompt=3, seed=3
    )
    got = np.stack([np.asarray(Image.open(tmp_path / "s" / f)) for f in files])
    np.testing.assert_array_equal(got, expected.array)
    refused = run_module(
        "muse_jax.sample",
        *args,
        "--num_samples=5000",
        f"--output_dir={tmp_path / 'big'}",
        env=_env(),
    )
    assert refused.returncode == 2 and "over --max_images=1024" in refused.stderr
    assert not (tmp_path / "big").exists()


def _readme_snippet() -> str:
    text = Path(ROOT, "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(exported, tmp_path):
    _, _, out = exported
    (tmp_path / "models").mkdir()
    os.symlink(out, tmp_path / "models" / "shapes")
    code = _readme_snippet()
    assert len(code.strip().splitlines()) <= 6
    done = run_python("-c", code, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(tmp_path.glob("*.png"))
    assert written and all(Image.open(p).size == (64, 64) for p in written)


@pytest.mark.slow
def test_export_to_gcs_and_load_from_it(exported, tmp_path):
    from tests.gcs_emulator import gcs_emulator

    config, workdir, out = exported
    expected = MusePipeline.from_pretrained(out)(PROMPTS, seed=2).array
    np.save(tmp_path / "expected.npy", expected)
    code = textwrap.dedent(
        f"""
        import numpy as np
        from configs import shapes_tiny
        from muse_jax import MusePipeline, storage
        from muse_jax.inference import export, model
        remote = storage.join("{{bucket}}", "models", "shapes")
        config = shapes_tiny.get_config("smoke")
        export.export(model.from_workdir(config, {workdir!r}), remote, source={workdir!r})
        print(sorted(storage.listdir(remote)))
        got = MusePipeline.from_pretrained(remote)({PROMPTS!r}, seed=2).array
        np.testing.assert_array_equal(got, np.load("expected.npy"))
        print("identical")
        """
    )
    with gcs_emulator() as emu:
        done = run_python(
            "-c",
            code.replace("{bucket}", f"gs://{emu.bucket}"),
            env=_env(**emu.env, JAX_PLATFORMS="cpu"),
            cwd=tmp_path,
            timeout=300,
        )
        objects = emu.list("models/shapes/")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "identical" in done.stdout
    assert {o.rsplit("/", 1)[-1] for o in objects} >= {"config.json", "base.safetensors"}
    assert not (tmp_path / "gs:").exists()


def test_a_missing_stage_suggests_the_base_stage_only_when_that_would_work():
    from muse_jax import cli

    base = FileNotFoundError("No base checkpoint in w/base/checkpoints. Train that stage first.")
    sr = FileNotFoundError("No superres checkpoint in w/superres/checkpoints. Train it first.")
    assert "--stages=base" not in str(cli.missing_stage(base, "sample", cascade=True))
    assert str(cli.missing_stage(sr, "sample", cascade=True)).endswith(
        "(or sample the base stage alone: --stages=base)"
    )
    assert "--stages=base" not in str(cli.missing_stage(sr, "sample", cascade=False))


@pytest.mark.slow
def test_refinement_can_be_turned_off_per_call(exported):
    """`refine_rounds=0` samples the plain decoding loop; the default refines that very draw,
    so the two differ only in some of the base tokens."""
    _, _, out = exported
    pipe = MusePipeline.from_pretrained(out, stages="base", batch_size=4)
    assert pipe.config.base.sampling.refine_rounds > 0
    refined = pipe(PROMPTS, seed=3)
    plain = pipe(PROMPTS, seed=3, refine_rounds=0)
    differ = (refined.tokens != plain.tokens).mean()
    assert 0 < differ < 1
    with pytest.raises(UsageError, match="refine_rounds"):
        pipe(PROMPTS, refine_rounds=-1)
