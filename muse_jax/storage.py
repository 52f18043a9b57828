"""The one path layer for every file the project reads or writes, local or `gs://`.

Everything goes through `etils.epath`, the path type orbax, TFDS and CLU already use, so a
workdir, a data_dir, an embedding table or a sample folder on `gs://bucket/run` behaves exactly
like one on local disk. Plain `os.path`/`open` would silently turn `gs://b/run` into a local
folder `./gs:/b/run` on every host of a pod; nothing in the package calls them on user paths.

Remote failures (no credentials, no bucket, no network) surface as one `StorageError` line
naming the path and the operation, not as a client library's traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath

PathLike = str | os.PathLike

_REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


class StorageError(OSError):
    """A file operation that failed on a path the user gave; `str()` is one line."""


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object store (gs://, s3://, ...) rather than a local path."""
    return os.fspath(p).startswith(_REMOTE_SCHEMES)


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path`: local paths made absolute (with `~` expanded), remote ones as
    given. Never `os.path.abspath` a remote path: that is how `gs:/b` folders appear locally."""
    s = os.fspath(p)
    if is_remote(s):
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def join(p: PathLike, *parts: str) -> str:
    """`os.path.join` that keeps `gs://` intact; returns a string for configs and messages."""
    return os.fspath(epath.Path(os.fspath(p)).joinpath(*parts)) if parts else os.fspath(p)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def checked(operation: str, p: PathLike) -> Iterator[None]:
    """Re-raises any failure of the storage client inside the block as one `StorageError`
    line: '<operation> <path> failed: <reason>'. FileNotFoundError keeps its type."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{operation} {os.fspath(p)} failed: {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 -- tf.errors, google.auth, aiohttp, OSError, ...
        if not is_remote(p) and not isinstance(e, OSError):
            raise
        raise StorageError(f"{operation} {os.fspath(p)} failed: {_one_line(e)}") from e


@functools.lru_cache(maxsize=16)
def _bucket_exists(bucket: str) -> bool | None:
    """True/False, or None when these credentials may not look the bucket up (403)."""
    from google.api_core import exceptions
    from google.cloud import storage as gcs

    client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "_")
    try:
        return client.bucket(bucket).exists(timeout=30, retry=None)
    except exceptions.Forbidden:
        return None


def check_reachable(p: PathLike, operation: str) -> None:
    """Fails fast, in one line, when a gs:// path's bucket cannot be reached (no credentials, no
    such bucket, no network), before a command does any work or writes anything. Local paths
    and other schemes pass through (their first real operation reports)."""
    s = os.fspath(p)
    if not s.startswith("gs://"):
        return
    bucket = s[len("gs://") :].split("/", 1)[0]
    try:
        found = _bucket_exists(bucket)
    except Exception as e:  # noqa: BLE001 -- google.auth, api_core, requests: one line each.
        raise StorageError(
            f"{operation} {s} failed: cannot reach gs://{bucket}: {_one_line(e)}"
        ) from e
    if found is False:
        raise StorageError(
            f"{operation} {s} failed: bucket gs://{bucket} does not exist (or is not visible to "
            "these credentials)."
        )


def exists(p: PathLike) -> bool:
    with checked("checking", p):
        return path(p).exists()


def isdir(p: PathLike) -> bool:
    with checked("checking", p):
        return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    with checked("checking", p):
        return path(p).is_file()


def size(p: PathLike) -> int:
    """Bytes in a file (`os.path.getsize`, for local and remote files alike)."""
    with checked("checking", p):
        return int(path(p).stat().length)


def makedirs(p: PathLike) -> epath.Path:
    with checked("creating directory", p):
        d = path(p)
        d.mkdir(parents=True, exist_ok=True)
        return d


def listdir(p: PathLike) -> list[str]:
    """Entry names (not paths) in `p`, sorted; [] when `p` does not exist."""
    with checked("listing", p):
        d = path(p)
        if not d.exists():
            return []
        return sorted(child.name for child in d.iterdir())


def read_bytes(p: PathLike) -> bytes:
    with checked("reading", p):
        return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    with checked("reading", p):
        return path(p).read_text()


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` so that readers see the old file or the whole new one, never a part.

    Local: a temporary sibling then an atomic rename. Remote: one object upload, which object
    stores make visible all at once.
    """
    target = path(p)
    with checked("writing", p):
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(p):
            target.write_bytes(data)
            return
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(target)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Strict JSON (NaN/Infinity become null, so every JSON reader can parse it)."""
    write_text(p, json.dumps(_finite(obj), indent=indent, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def save_png(image: Any, p: PathLike) -> None:
    """A uint8 [H, W, C] array as a PNG at `p` (local or remote), written atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(p, buffer.getvalue())


def kvstore_spec(p: PathLike, *, directory: bool = False) -> dict[str, str]:
    """A TensorStore kvstore for `p`: `gcs` for gs://bucket/key, `file` for a local path.

    `directory` appends the "/" TensorStore expects of a key prefix that names a folder.
    """
    s = os.fspath(path(p)).rstrip("/")
    suffix = "/" if directory else ""
    if s.startswith("gs://"):
        bucket, _, key = s[len("gs://") :].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key + suffix if key else ""}
    if is_remote(s):
        raise StorageError(
            f"TensorStore cannot open {s}: only local and gs:// paths are supported."
        )
    return {"driver": "file", "path": s + suffix}


def remove_tree(p: PathLike) -> None:
    with checked("removing", p):
        d = path(p)
        if d.exists():
            d.rmtree()
