"""`gs://` for real, against a local GCS emulator (tests/gcs_emulator.py), never real GCS.

Each test runs its client code in a fresh subprocess with the emulator's environment, as the
end-to-end tests run our binaries: TF's and tensorstore's GCS clients read their settings
once, at first use, so they must see the environment from the start. Each test also checks
that nothing landed in a local `./gs:` folder, the failure mode of a path mangled by `os.path`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gcs_emulator import GcsEmulator, gcs_emulator
from tests.helpers import child_env, run_python


@pytest.fixture(scope="module")
def emulator() -> Iterator[GcsEmulator]:
    with gcs_emulator() as emu:
        yield emu


def _run(emu: GcsEmulator, cwd: Path, code: str) -> str:
    """Runs `code` in a subprocess pointed at the emulator; returns its stdout."""
    env = child_env(
        **emu.env, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", BUCKET=f"gs://{emu.bucket}"
    )
    done = run_python("-c", textwrap.dedent(code), cwd=cwd, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (cwd / "gs:").exists(), "a gs:// path was written to local disk"
    return done.stdout


def test_epath_and_storage_round_trip(emulator: GcsEmulator, tmp_path: Path) -> None:
    out = _run(
        emulator,
        tmp_path,
        """
        import os
        from etils import epath
        from muse_jax import storage
        root = os.environ["BUCKET"] + "/epath"
        storage.write_json(root + "/run/config.json", {"lr": 0.5})
        storage.write_bytes(root + "/run/samples/0.bin", b"\\0" * 3_000_000)
        assert storage.read_json(root + "/run/config.json") == {"lr": 0.5}
        assert storage.listdir(root + "/run") == ["config.json", "samples"]
        assert storage.isdir(root + "/run/samples") and not storage.exists(root + "/nope")
        src, dst = epath.Path(root + "/run/samples"), epath.Path(root + "/kept")
        src.rename(dst)
        assert (dst / "0.bin").read_bytes() == b"\\0" * 3_000_000 and not src.exists()
        storage.write_text(root + "/tmp/a.txt", "x")
        storage.remove_tree(root + "/tmp")
        assert not storage.exists(root + "/tmp")
        print("ok")
    """,
    )
    assert out.strip() == "ok"
    names = emulator.list("epath/")
    assert {"epath/run/config.json", "epath/kept/0.bin"} <= set(names)
    assert not [n for n in names if n.startswith(("epath/tmp/", "epath/run/samples/"))]


def test_orbax_checkpoint_manager(emulator: GcsEmulator, tmp_path: Path) -> None:
    out = _run(
        emulator,
        tmp_path,
        """
        import os
        import jax, jax.numpy as jnp, numpy as np
        import orbax.checkpoint as ocp
        tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"x": jnp.ones(5, jnp.bfloat16)}}
        for mode in ("async", "sync"):
            directory = os.environ["BUCKET"] + "/ckpt_" + mode
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2, enable_async_checkpointing=mode == "async")
            with ocp.CheckpointManager(directory, options=options) as manager:
                for step in (1, 2, 3):
                    manager.save(step, args=ocp.args.StandardSave(
                        jax.tree.map(lambda a: a * step, tree)))
                manager.wait_until_finished()
            with ocp.CheckpointManager(directory, options=options) as manager:
                assert manager.all_steps() == [2, 3] and manager.latest_step() == 3, mode
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
                restored = manager.restore(3, args=ocp.args.StandardRestore(abstract))
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want) * 3)
        print("ok")
    """,
    )
    assert out.strip().endswith("ok")
    for mode in ("async", "sync"):
        names = emulator.list(f"ckpt_{mode}/")
        steps = {n.split("/")[1] for n in names} - {""}  # "" is the folder marker
        assert steps == {"2", "3"}, names  # max_to_keep deleted step 1 from the bucket
        assert f"ckpt_{mode}/3/_CHECKPOINT_METADATA" in names
        assert any(n.endswith("manifest.ocdbt") for n in names)  # tensorstore wrote the arrays


def test_tensorboard_scalars(emulator: GcsEmulator, tmp_path: Path) -> None:
    out = _run(
        emulator,
        tmp_path,
        """
        import os
        import tensorflow as tf
        from clu import metric_writers
        logdir = os.environ["BUCKET"] + "/tb/train"
        writer = metric_writers.create_default_writer(logdir, just_logging=False)
        writer.write_scalars(1, {"loss": 0.5})
        writer.write_scalars(2, {"loss": 0.25})
        writer.flush()
        writer.close()
        (event_file,) = tf.io.gfile.glob(logdir + "/events.out.tfevents.*")
        values = [(e.step, v.tag, float(tf.make_ndarray(v.tensor)))
                  for e in tf.compat.v1.train.summary_iterator(event_file)
                  for v in e.summary.value]
        assert values == [(1, "loss", 0.5), (2, "loss", 0.25)], values
        print("ok")
    """,
    )
    assert out.strip().endswith("ok")
    (name,) = emulator.list("tb/train/events.out.tfevents.")
    assert name.startswith("tb/train/events.out.tfevents.")


def test_tfds_builder_and_tf_data_on_gs(emulator: GcsEmulator, tmp_path: Path) -> None:
    out = _run(
        emulator,
        tmp_path,
        """
        import os
        import numpy as np, tensorflow as tf, tensorflow_datasets as tfds
        class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
            VERSION = tfds.core.Version("1.0.0")
            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {"x": tfds.features.Tensor(shape=(3,), dtype=np.float32), "y": np.int64}))
            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}
            def _generate_examples(self):
                for i in range(10):
                    yield i, {"x": np.full((3,), i, np.float32), "y": i}
        tfds.disable_progress_bar()
        builder = Tiny(data_dir=os.environ["BUCKET"] + "/tfds")
        builder.download_and_prepare()  # writes to incomplete.*, then renames the folder
        ys = sorted(int(e["y"]) for e in builder.as_dataset(split="train"))
        assert ys == list(range(10)), ys
        assert tfds.builder_from_directory(builder.data_dir).info.splits["train"].num_examples == 10
        records = os.environ["BUCKET"] + "/records/a.tfrecord"
        with tf.io.TFRecordWriter(records) as writer:
            for i in range(5):
                writer.write(b"%d" % i)
        got = [r.numpy() for r in tf.data.TFRecordDataset([records])]
        assert got == [b"0", b"1", b"2", b"3", b"4"], got
        print("ok")
    """,
    )
    assert out.strip().endswith("ok")
    names = emulator.list("tfds/tiny/1.0.0/")
    assert "tfds/tiny/1.0.0/dataset_info.json" in names
    assert any(n.startswith("tfds/tiny/1.0.0/tiny-train.tfrecord") for n in names)
    assert not [n for n in emulator.list("tfds/tiny/") if "incomplete" in n]
    assert emulator.list("records/") == ["records/a.tfrecord"]


def test_user_datasets_read_from_gs_like_local_ones(emulator: GcsEmulator, tmp_path: Path) -> None:
    """An image folder and an img2dataset tar, built from gs:// and from a local copy: the same
    records (ids, captions, image bytes)."""
    out = _run(
        emulator,
        tmp_path,
        """
        import io, os, tarfile
        import numpy as np
        import tensorflow_datasets as tfds
        from PIL import Image
        from muse_jax import storage
        from muse_jax.data import image_text_tfds

        rng = np.random.default_rng(0)
        files = {}
        rows = ["file,caption"]
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(buf, "PNG")
                files[f"folder/img{i}.png"] = buf.getvalue()
                rows.append(f"img{i}.png,shape number {i}")
                for name, data in ((f"{i:09d}.png", buf.getvalue()), (f"{i:09d}.txt", f"tar {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        files["folder/captions.csv"] = ("\\n".join(rows) + "\\n").encode()
        files["web/00000.tar"] = tar_buf.getvalue()
        for root in (os.environ["BUCKET"] + "/src", os.path.abspath("local_src")):
            for name, data in files.items():
                storage.write_bytes(storage.join(root, name), data)

        def records(fmt, source, data_dir):
            params = image_text_tfds.source_params(fmt, source, test_fraction=0.0)
            builder = image_text_tfds.make_builder(data_dir, params)
            image_text_tfds.prepare(builder)
            ds = builder.as_dataset(split="train", shuffle_files=False,
                                    decoders={"image": tfds.decode.SkipDecoding()})
            return sorted((ex["id"], ex["captions"].tolist(), ex["image"]) for ex in tfds.as_numpy(ds))

        for fmt, sub in (("image_folder", "folder"), ("img2dataset", "web")):
            remote = records(fmt, os.environ["BUCKET"] + "/src/" + sub, os.path.abspath("d_gs"))
            local = records(fmt, os.path.abspath("local_src/" + sub), os.path.abspath("d_local"))
            assert len(remote) == 6 and remote == local, (fmt, len(remote), len(local))
        print("ok")
    """,
    )
    assert out.strip().splitlines()[-1] == "ok"
