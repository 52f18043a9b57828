"""Reader of `img2dataset` output: webdataset tar shards, `files` folders, or parquet shards.

Layouts (img2dataset `--output_format`):
  webdataset  `00000.tar` holding `000000000.jpg` + `000000000.txt` and/or `.json` (field
              "caption"); the `00000.parquet` metadata files beside the tars are ignored.
  files       folders `00000/` holding the same `000000000.jpg` + `.txt`/`.json` files.
  parquet     `00000.parquet` with the image bytes in a `jpg` (or png/webp/image) column and a
              `caption` column.
A sample's key is `<shard>/<key>`; a sample goes to 'test' by the hash of that key.
`source_dir` may be local or on `gs://` (read via `muse_jax.storage`; tar members are read in
memory, never extracted).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from typing import IO

from muse_jax import storage
from muse_jax.data.records import RawRecord, in_test_split, read_or_none
from muse_jax.errors import UsageError

LAYOUTS = ("webdataset", "files", "parquet")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")


def _shard_dirs(source_dir: str) -> list[str]:
    return sorted(
        n
        for n in storage.listdir(source_dir)
        if n.isdigit() and storage.isdir(storage.join(source_dir, n))
    )


class _RawReader(io.RawIOBase):
    """A storage client's binary file as a standard raw stream. TensorFlow's GFile (what
    `epath` opens gs:// with) lacks parts of the file protocol, e.g. the `closed` pyarrow asks
    for; wrapped in `io.BufferedReader`, it reads, seeks and closes like a local file."""

    def __init__(self, f: IO[bytes]):
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._f.seek(offset, whence)
        return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()


@contextlib.contextmanager
def _opened(path: str) -> Iterator[str | IO[bytes]]:
    """What tarfile/pyarrow should read: a local path itself (their own native I/O, as before),
    or an open, seekable binary file for gs://, which neither library can open by name. A
    remote client error inside the block (opening or any later read) becomes one
    `StorageError` line, an OSError, so a damaged remote shard is handled like a local one."""
    if not storage.is_remote(path):
        yield path
        return
    with (
        storage.checked("reading", path),
        storage.path(path).open("rb") as f,
        io.BufferedReader(_RawReader(f), buffer_size=1 << 20) as buffered,
    ):
        yield buffered


def _open_tar(source: str | IO[bytes]) -> tarfile.TarFile:
    """Opens a (possibly compressed) tar for random-access reading of its members."""
    if isinstance(source, str):
        return tarfile.open(source, "r:*")
    return tarfile.open(fileobj=source, mode="r:*")


def _parquet_image_column(path: str) -> str | None:
    import pyarrow.parquet as pq

    try:
        with _opened(path) as source:
            names = pq.read_schema(source).names
    except Exception:  # An unreadable file is reported when read, not here.
        return None
    return next((c for c in _IMAGE_COLUMNS if c in names), None)


def detect_layout(source_dir: str, layout: str = "auto") -> str:
    """The layout of `source_dir` (checked when given); ValueError with the path when there is
    no img2dataset output there."""
    if not storage.isdir(source_dir):
        raise UsageError(f"img2dataset source directory {source_dir!r} does not exist.")
    names = storage.listdir(source_dir)
    found = {
        "webdataset": any(n.endswith(".tar") for n in names),
        "files": bool(_shard_dirs(source_dir)),
        "parquet": any(
            n.endswith(".parquet") and _parquet_image_column(storage.join(source_dir, n))
            for n in sorted(names)
        ),
    }
    if layout == "auto":
        layout = next((k for k in LAYOUTS if found[k]), "")
        if not layout:
            raise UsageError(
                f"img2dataset source directory {source_dir!r} holds no shards (*.tar, NNNNN/ "
                "folders, or *.parquet with an image column)."
            )
    elif layout not in LAYOUTS:
        raise UsageError(f"Unknown img2dataset layout {layout!r}; valid: 'auto', {LAYOUTS}.")
    elif not found[layout]:
        raise UsageError(f"img2dataset source directory {source_dir!r} holds no {layout} shards.")
    return layout


def fingerprint(source_dir: str, layout: str) -> list:
    """Names and sizes of the shards: a changed set of shards builds a new dataset."""
    if layout == "files":
        return [
            (d, len(storage.listdir(storage.join(source_dir, d)))) for d in _shard_dirs(source_dir)
        ]
    ext = ".tar" if layout == "webdataset" else ".parquet"
    return [
        (n, storage.size(storage.join(source_dir, n)))
        for n in storage.listdir(source_dir)
        if n.endswith(ext)
    ]


def _sample(key: str, files: dict[str, bytes]) -> RawRecord:
    image = next((files[e] for e in _IMAGE_EXTS if e in files), None)
    if "txt" in files:
        captions: list = [files["txt"]]
    elif "json" in files:
        try:
            caption = json.loads(files["json"]).get("caption")
        except (ValueError, AttributeError):  # Bad JSON (or not an object): no caption.
            caption = None
        captions = [caption] if isinstance(caption, str) else []
    else:
        captions = []
    return RawRecord(key, image, captions)


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000000012.jpg' -> ('dir/000000012', 'jpg'): webdataset keys end at the first dot."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _grouped(members: Iterator[tuple[str, object]], shard: str, want, read) -> Iterator[RawRecord]:
    """Groups consecutive files of one sample (webdataset order) into records of the split."""
    seen: set[str] = set()
    current, files = None, {}
    for name, handle in members:
        key, ext = _split_name(name)
        if key != current:
            if current is not None and files is not None:
                yield _sample(f"{shard}/{current}", files)
            current = key
            full = f"{shard}/{key}"
            if key in seen:
                files = None
                if want(full):
                    yield RawRecord(full, None, [], problem="duplicate_key")
            else:
                seen.add(key)
                files = {} if want(full) else None
        if files is not None:
            files[ext] = read(handle)
    if current is not None and files is not None:
        yield _sample(f"{shard}/{current}", files)


def _webdataset(source_dir: str, want) -> Iterator[RawRecord]:
    for name in (n for n in storage.listdir(source_dir) if n.endswith(".tar")):
        shard = name[: -len(".tar")]
        path = storage.join(source_dir, name)
        try:
            # Members are read into memory one by one (extractfile), never extracted to disk.
            with _opened(path) as source, _open_tar(source) as tar:
                members = ((m.name, m) for m in tar if m.isfile())
                yield from _grouped(members, shard, want, lambda m: tar.extractfile(m).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated or damaged shard: keep what came before, count the rest as lost.
            if want(shard):  # Counted once, in the split the shard's name hashes to.
                yield RawRecord(shard, None, [], problem="corrupt_shard")
            print(f"[data] {name}: unreadable from here on ({e}); skipping the rest", flush=True)


def _files(source_dir: str, want) -> Iterator[RawRecord]:
    for shard in _shard_dirs(source_dir):
        folder = storage.join(source_dir, shard)
        names = storage.listdir(folder)
        # An unreadable file gives None: the record is skipped as missing.
        members = ((n, storage.join(folder, n)) for n in names)
        yield from _grouped(members, shard, want, read_or_none)


def _parquet(source_dir: str, want) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in (n for n in storage.listdir(source_dir) if n.endswith(".parquet")):
        path = storage.join(source_dir, name)
        shard = name[: -len(".parquet")]
        image_col = _parquet_image_column(path)
        if image_col is None:
            continue  # img2dataset's per-shard metadata files have no image column.
        try:
            with _opened(path) as source:
                pf = pq.ParquetFile(source)
                names = pf.schema_arrow.names
                caption_col = (
                    "caption" if "caption" in names else "text" if "text" in names else None
                )
                cols = [c for c in ("key", caption_col, image_col) if c]
                row = 0
                for batch in pf.iter_batches(batch_size=256, columns=cols):
                    keys = batch.column("key").to_pylist() if "key" in names else None
                    images = batch.column(image_col).to_pylist()
                    # Read captions as bytes: UTF-8 is checked per record, not by pyarrow.
                    caps = (
                        batch.column(caption_col).cast(pa.binary()).to_pylist()
                        if caption_col
                        else [None] * len(images)
                    )
                    for i, (image, caption) in enumerate(zip(images, caps)):
                        key = f"{shard}/{keys[i] if keys and keys[i] is not None else row + i}"
                        if want(key):
                            yield RawRecord(key, image, [caption])
                    row += len(images)
        except (OSError, pa.ArrowException) as e:
            if want(shard):  # Counted once, in the split the shard's name hashes to.
                yield RawRecord(shard, None, [], problem="corrupt_shard")
            print(f"[data] {name}: unreadable from here on ({e}); skipping the rest", flush=True)


def iter_records(
    source_dir: str, layout: str, split: str, test_fraction: float
) -> Iterator[RawRecord]:
    """The split's raw records in a deterministic order (shards sorted, samples in file order)."""

    def want(key: str) -> bool:
        return in_test_split(key, test_fraction) == (split == "test")

    reader = {"webdataset": _webdataset, "files": _files, "parquet": _parquet}[layout]
    return reader(source_dir, want)
