"""Reader of a plain folder of images with a captions table (`file,caption` rows).

The table is `<source_dir>/captions.csv` (comma-separated, standard CSV quoting) or
`captions.tsv` (tab-separated, no quoting), or any file named by `captions_file`. File paths are
relative to `source_dir` (absolute paths work too). A header row is optional: a first row whose
first field is file/filename/image/path and whose second is caption/text is skipped. Several
rows for the same file give that image several captions. Only listed files are read.
The folder, the table and the images may be local or on `gs://` (read via `muse_jax.storage`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator

from muse_jax import storage
from muse_jax.data.records import RawRecord, in_test_split, read_or_none
from muse_jax.errors import UsageError

_HEADER = ({"file", "filename", "file_name", "image", "path"}, {"caption", "text"})
DEFAULT_NAMES = ("captions.csv", "captions.tsv")


def _isabs(path: str) -> bool:
    """Whether `path` names a file by itself (absolute or gs://) rather than inside the folder."""
    return storage.is_remote(path) or os.path.isabs(path)


def captions_path(source_dir: str, captions_file: str = "") -> str:
    """The captions table to read; ValueError with the path when the folder or table is absent."""
    if not storage.isdir(source_dir):
        raise UsageError(f"Image folder {source_dir!r} does not exist.")
    if captions_file:
        path = captions_file if _isabs(captions_file) else storage.join(source_dir, captions_file)
        if not storage.isfile(path):
            raise UsageError(f"Captions file {path!r} does not exist.")
        return path
    for name in DEFAULT_NAMES:
        if storage.isfile(storage.join(source_dir, name)):
            return storage.join(source_dir, name)
    raise UsageError(
        f"Image folder {source_dir!r} has no {' or '.join(DEFAULT_NAMES)}; "
        "set config.data.captions_file."
    )


def read_table(path: str) -> dict[str, list[str]]:
    """{file: [captions]} in order of first appearance; a missing caption field is ''."""
    tsv = path.endswith(".tsv")
    # surrogateescape: a non-UTF-8 caption skips its record, not the whole table. Read whole
    # (local or gs://) and parsed with newline="" as csv wants, like open(..., newline="").
    text = storage.read_bytes(path).decode("utf-8", errors="surrogateescape")
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        table: dict[str, list[str]] = {}
        for i, row in enumerate(reader):
            if not row or not row[0].strip():
                continue
            if i == 0 and len(row) >= 2:
                if row[0].strip().lower() in _HEADER[0] and row[1].strip().lower() in _HEADER[1]:
                    continue
            table.setdefault(row[0].strip(), []).append(row[1] if len(row) > 1 else "")
    if not table:
        raise UsageError(f"Captions file {path!r} lists no images.")
    return table


def fingerprint(path: str) -> list:
    return [(os.path.basename(path), storage.size(path))]


def iter_records(
    source_dir: str, captions_file: str, split: str, test_fraction: float
) -> Iterator[RawRecord]:
    for name, captions in read_table(captions_file).items():
        if in_test_split(name, test_fraction) != (split == "test"):
            continue
        path = name if _isabs(name) else storage.join(source_dir, name)
        yield RawRecord(name, read_or_none(path), list(captions))
