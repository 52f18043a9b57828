"""The precomputed text-embedding table: written in runs that resume and append, read a batch at
a time, keyed by caption hashes whose collisions are caught at write time; local and gs://."""

from __future__ import annotations

import os
import textwrap

import ml_dtypes
import numpy as np
import pytest

from muse_jax import storage
from muse_jax.text import embeddings, precompute
from tests.helpers import child_env, run_python

S, D = 6, 4


def _rows(captions, seed):
    """Deterministic embeddings [N, S, D] and prefix masks [N, S] for `captions`."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(captions), S, D)).astype(np.float32)
    lengths = rng.integers(1, S + 1, len(captions))
    mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
    return emb, mask


def _write(writer, captions, seed, chunk):
    """Appends the captions `missing` reports, `chunk` at a time; returns what was written."""
    written = {}
    todo = writer.missing(captions)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        emb, mask = _rows(part, seed + start)
        writer.append(part, emb, mask)
        written.update(zip(part, zip(emb, mask)))
    return written


def _assert_lookup(table, written, captions):
    emb, mask = table.lookup(captions)
    assert emb.dtype == np.float32 and emb.shape == (len(captions), S, D)
    for c, e, m in zip(captions, emb, mask):
        want = written[c][0].astype(ml_dtypes.bfloat16).astype(np.float32)  # Stored in bf16.
        np.testing.assert_array_equal(e, want)
        np.testing.assert_array_equal(m, written[c][1])


def _writer(directory, **kw):
    # Blocks of 4 keys (slabs of 4 * 256): merges stream several slabs even at this size.
    kw.setdefault("index_block", 4)
    return precompute.TableWriter(str(directory), text_length=S, **kw)


def test_two_runs_append_and_lookups_return_what_was_written(tmp_path):
    first = ["", *(f"a red circle number {i}" for i in range(1500))]
    second = [*first[:700], *(f"a blue square number {i}" for i in range(1800))]
    with _writer(tmp_path, index_every=1000) as w:
        written = _write(w, first + first[:5], seed=0, chunk=400)  # Repeats are embedded once.
    assert len(written) == len(first)
    with _writer(tmp_path, index_every=1000) as w:
        added = _write(w, second, seed=1, chunk=333)
    assert set(added) == set(second) - set(first)  # Only the new captions are encoded.
    written.update(added)

    table = embeddings.EmbeddingTable(str(tmp_path))
    assert len(table) == len(written) and table.dim == D and table.text_length == S
    assert sorted(table.captions()) == sorted(written)
    rng = np.random.default_rng(0)
    everything = sorted(written)
    for _ in range(5):
        batch = [everything[i] for i in rng.integers(0, len(everything), 64)]
        _assert_lookup(table, written, batch + ["", batch[0]])  # Repeats in one batch too.
    assert table.lookup([])[0].shape == (0, S, D)
    # The index is one sorted run of unique keys over every row; old versions are pruned.
    keys = table._index.keys.read().result()
    assert np.all(keys[1:, 0] > keys[:-1, 0]) and sorted(keys[:, 1]) == list(range(len(written)))
    assert len(os.listdir(tmp_path / "index")) <= 2


def test_an_unknown_caption_is_a_one_line_error_naming_it_and_the_fix(tmp_path):
    with _writer(tmp_path) as w:
        _write(w, ["", "a red circle"], seed=0, chunk=8)
    table = embeddings.EmbeddingTable(str(tmp_path))
    with pytest.raises(ValueError) as e:
        table.lookup(["a red circle", "a never embedded\nprompt", "another"])
    message = str(e.value)
    assert isinstance(e.value, embeddings.UnknownCaptionError) and "\n" not in message
    assert "'a never embedded\\nprompt' (and 1 more of 3)" in message
    assert f"--output_dir={tmp_path}" in message and "muse_jax.embed" in message
    assert "a red circle" in table and "another" not in table


def _first_letter(caption: str) -> int:
    """A weak hash, so that collisions are easy to make."""
    return ord(caption[0]) if caption else 0


def test_hash_collisions_are_caught_when_writing(tmp_path):
    with _writer(tmp_path, hash_fn=_first_letter) as w:
        with pytest.raises(embeddings.HashCollisionError, match="'apple' and 'avocado'"):
            w.missing(["apple", "banana", "avocado"])  # Within one input.
        _write(w, ["apple", "banana"], seed=0, chunk=1)
        with pytest.raises(embeddings.HashCollisionError, match="'apple' and 'avocado'"):
            w.missing(["cherry", "avocado"])  # Against a row not yet indexed.
    with _writer(tmp_path, hash_fn=_first_letter) as w:
        with pytest.raises(embeddings.HashCollisionError, match="same 64-bit key"):
            w.missing(["bilberry"])  # Against an indexed row.
        assert w.missing(["apple", "banana", "cherry"]) == ["cherry"]
        # `append` refuses what `missing` would have filtered, before writing anything.
        emb, mask = _rows(["x"], seed=3)
        with pytest.raises(embeddings.HashCollisionError, match="'banana' and 'blueberry'"):
            w.append(["blueberry"], emb, mask)
        with pytest.raises(ValueError, match="'apple' is already in the table"):
            w.append(["apple"], emb, mask)
        assert w.rows_written == 2
    table = embeddings.EmbeddingTable(str(tmp_path), hash_fn=_first_letter)
    assert len(table) == 2
    with pytest.raises(ValueError, match="keyed by _first_letter"):
        embeddings.EmbeddingTable(str(tmp_path))  # The default key would find nothing.


def test_a_stopped_run_resumes_without_re_encoding_its_chunks(tmp_path):
    captions = [f"caption {i}" for i in range(50)]
    with _writer(tmp_path) as w:
        written = _write(w, captions[:10], seed=0, chunk=10)
    stopped = _writer(tmp_path)  # Appends two chunks, then stops before its index merge.
    written.update(_write(stopped, captions[:30], seed=1, chunk=10))
    del stopped
    assert len(embeddings.EmbeddingTable(str(tmp_path))) == 10  # Readers see indexed rows only.

    with _writer(tmp_path) as w:
        assert w.rows_written == 30
        assert w.missing(captions) == captions[30:]
        written.update(_write(w, captions, seed=2, chunk=7))
    table = embeddings.EmbeddingTable(str(tmp_path))
    assert list(table.captions()) == captions
    _assert_lookup(table, written, captions)


def test_a_chunk_written_but_not_committed_is_written_again(tmp_path):
    captions = [f"caption {i}" for i in range(20)]
    with _writer(tmp_path) as w:
        written = _write(w, captions[:8], seed=0, chunk=8)
    meta = (tmp_path / "table.json").read_bytes()
    with _writer(tmp_path) as w:  # Rows, captions and arrays written...
        _write(w, captions[8:], seed=1, chunk=12)
    (tmp_path / "table.json").write_bytes(meta)  # ...but the commit never happened.
    (tmp_path / "index" / "000009").mkdir()  # Nor did a merge that got this far.

    with _writer(tmp_path) as w:
        assert w.missing(captions) == captions[8:]
        written.update(_write(w, captions[8:], seed=2, chunk=5))  # Other values this time.
    assert sorted(os.listdir(tmp_path / "index")) == ["000001", "000002"]
    table = embeddings.EmbeddingTable(str(tmp_path))
    assert list(table.captions()) == captions
    _assert_lookup(table, written, captions)


def test_a_run_with_another_encoder_or_length_is_refused(tmp_path):
    with _writer(tmp_path, encoder={"name": "t5", "preset": "tiny"}) as w:
        _write(w, ["a"], seed=0, chunk=1)
    with pytest.raises(ValueError, match="encoder=.*new --output_dir"):
        _writer(tmp_path, encoder={"name": "t5", "preset": "xxl"})
    with pytest.raises(ValueError, match="text_length=6"):
        precompute.TableWriter(str(tmp_path), text_length=64, encoder={"name": "t5"})


def test_kvstore_specs_for_local_and_gcs_paths(tmp_path):
    assert storage.kvstore_spec("gs://bucket/runs/t5/emb", directory=True) == {
        "driver": "gcs",
        "bucket": "bucket",
        "path": "runs/t5/emb/",
    }
    assert storage.kvstore_spec(str(tmp_path / "emb"), directory=True) == {
        "driver": "file",
        "path": f"{tmp_path}/emb/",
    }
    with pytest.raises(storage.StorageError, match="only local and gs://"):
        storage.kvstore_spec("s3://bucket/emb")


_GCS_ROUND_TRIP = """
import numpy as np
from muse_jax.text import embeddings, precompute

directory = "gs://{bucket}/runs/t5/text_emb"
captions = ["", "a red circle", "a blue square"]
emb = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
mask = np.ones((3, 4), np.int32)
with precompute.TableWriter(directory, text_length=4) as w:
    w.append(w.missing(captions), emb, mask)
table = embeddings.EmbeddingTable(directory)
got, got_mask = table.lookup(["a blue square", ""])
np.testing.assert_array_equal(got, emb[[2, 0]])
assert list(table.captions()) == captions
print("ok")
"""


def test_a_table_on_gcs_is_written_and_read_through_the_emulator(tmp_path):
    gcs_emulator = pytest.importorskip("gcs_emulator")
    with gcs_emulator.gcs_emulator() as gcs:
        script = textwrap.dedent(_GCS_ROUND_TRIP.format(bucket=gcs.bucket))
        run = run_python("-c", script, env=child_env(**gcs.env), cwd=tmp_path, timeout=300)
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
        names = gcs.list("runs/t5/text_emb/")
    assert "runs/t5/text_emb/table.json" in names
    assert any(n.startswith("runs/t5/text_emb/emb/") for n in names)
    assert not os.listdir(tmp_path)  # No local `gs:` folder.
