r"""Hyper-parameter sweeps: a sweep file expands into named runs of `--config.a.b=v` overrides.

A sweep file is a Python module with `get_sweep()` returning a list of points; each point is a
dict `{"a.b": value}` of config overrides (a leading `config.` on a key is allowed). Build points
from axes with the helpers here:

  from muse_jax.sweep import axis, product, zipped

  def get_sweep():
      return product(
          axis("base.train.optimizer.learning_rate", [5e-4, 1e-3]),
          zipped(axis("sampling.guidance_scale", [1.0, 3.0]),
                 axis("sampling.guidance_schedule", ["constant", "linear"])),
      )  # 2 x 2 = 4 points.

`expand(path)` gives `[(name, ["--config.a.b=v", ...]), ...]`; names are short, filesystem-safe
and unique (`lr5e-4_gs1_constant`), so `<workdir>/<name>` is each run's own workdir. The CLI
prints one point per line, `name<TAB>overrides` (shell-quoted where a value needs it):

  python -m muse_jax.sweep configs/sweeps/shapes_lr.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from muse_jax import config_files
from muse_jax.errors import UsageError

Point = dict[str, Any]

# Short forms of common key leaves (the last part of a dotted key) for point names.
_ABBREVIATIONS = {
    "learning_rate": "lr",
    "guidance_scale": "gs",
    "guidance_schedule": "gsched",
    "batch_size": "bs",
    "num_steps": "steps",
    "weight_decay": "wd",
    "warmup_steps": "warmup",
    "cond_dropout": "cdrop",
    "label_smoothing": "ls",
    "temperature": "temp",
    "choice_temperature": "ctemp",
    "mask_schedule": "msched",
    "seed": "seed",
}
_MAX_NAME = 100  # Well below the 255-byte limit of most filesystems.


class SweepError(UsageError):
    """A malformed sweep file or sweep definition."""


def _key(key: str) -> str:
    """`--config.a.b`, `config.a.b` or `a.b` -> `a.b`."""
    if not isinstance(key, str):
        raise SweepError(f"override keys must be strings, got {key!r}")
    k = key.removeprefix("--").removeprefix("config.")
    if not k or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k):
        raise SweepError(f"bad override key {key!r}: expected a dotted config path like 'a.b'")
    return k


def _points(axis_: Any, what: str) -> list[Point]:
    """An axis (list of dicts) or a single dict (one point), checked and with normalised keys."""
    if isinstance(axis_, Mapping):
        axis_ = [axis_]
    if isinstance(axis_, str | bytes) or not isinstance(axis_, Iterable):
        raise SweepError(f"{what}: expected a list of override dicts, got {type(axis_).__name__}")
    out = []
    for p in axis_:
        if not isinstance(p, Mapping):
            raise SweepError(f"{what}: each point must be a dict of overrides, got {p!r}")
        out.append({_key(k): v for k, v in p.items()})
    return out


def _merge(points: Sequence[Point]) -> Point:
    merged: Point = {}
    for p in points:
        for k, v in p.items():
            if k in merged and merged[k] != v:
                raise SweepError(f"key {k!r} is set twice in one point ({merged[k]!r} and {v!r})")
            merged[k] = v
    return merged


def axis(key: str, values: Iterable[Any]) -> list[Point]:
    """One swept key: `[{key: v} for v in values]`."""
    values = list(values)
    if not values:
        raise SweepError(f"axis {key!r} has no values")
    k = _key(key)
    return [{k: v} for v in values]


def fixed(**overrides: Any) -> list[Point]:
    """A one-point axis of overrides shared by every point (keys use `__` for dots)."""
    return [{k.replace("__", "."): v for k, v in overrides.items()}]


def product(*axes: Any) -> list[Point]:
    """Every combination of the axes' points (the first axis varies slowest)."""
    lists = [_points(a, f"product axis {i}") for i, a in enumerate(axes)]
    return [_merge(combo) for combo in itertools.product(*lists)]


def zipped(*axes: Any) -> list[Point]:
    """The axes' points side by side; all axes must have the same length."""
    lists = [_points(a, f"zipped axis {i}") for i, a in enumerate(axes)]
    lengths = [len(x) for x in lists]
    if len(set(lengths)) > 1:
        raise SweepError(f"zipped axes have different lengths: {lengths}")
    return [_merge(group) for group in zip(*lists)]


def chain(*sweeps: Any) -> list[Point]:
    """The points of several sweeps, one after the other."""
    return [p for i, s in enumerate(sweeps) for p in _points(s, f"chained sweep {i}")]


def format_value(value: Any) -> str:
    """A value as ml_collections' `--config.a.b=...` flag parser reads it."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return (
            "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    return str(value)


def _short_value(value: Any) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, float):
        s = f"{value:g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
        return s
    if isinstance(value, list | tuple):
        return "-".join(_short_value(v) for v in value)
    s = str(value)
    if "/" in s:  # A path: its last part says most.
        s = s.rstrip("/").rsplit("/", 1)[-1]
    return s


def _safe(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.+=-]+", "-", s).strip("-.")
    return s or "x"


def point_name(point: Point, varying: Sequence[str] | None = None) -> str:
    """A short, filesystem-safe name from the point's varying keys, e.g. `lr0.001_gs3`."""
    keys = [k for k in point if varying is None or k in varying] or list(point)
    parts = []
    for k in keys:
        leaf = k.rsplit(".", 1)[-1]
        parts.append(_safe(_ABBREVIATIONS.get(leaf, leaf) + _short_value(point[k])))
    return "_".join(parts)[:_MAX_NAME] or "point"


def name_points(points: Sequence[Point]) -> list[str]:
    """Unique names for the points: from the keys whose value varies across points (all keys
    for a single point), prefixed with the point's index where two names would collide."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    varying = [k for k in keys if len({repr(p.get(k, "<unset>")) for p in points}) > 1]
    names = [point_name(p, varying or None) if p else "point" for p in points]
    if len(set(names)) < len(names):
        width = len(str(len(points) - 1))
        names = [f"{i:0{width}d}_{n}" for i, n in enumerate(names)]
    return names


def overrides(point: Point) -> list[str]:
    return [f"--config.{k}={format_value(v)}" for k, v in point.items()]


def load(path: str) -> list[Point]:
    """The points of the sweep file at `path` (its `get_sweep()`), checked."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file not found: {path}")
    name = "_muse_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SweepError(f"cannot load sweep file {path} (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise SweepError(f"sweep file {path} defines no get_sweep() function")
    points = _points(get_sweep(), f"get_sweep() of {path}")
    if not points:
        raise SweepError(f"sweep file {path}: get_sweep() returned no points")
    return points


def expand(path: str) -> list[tuple[str, list[str]]]:
    """`[(name, ["--config.a.b=v", ...]), ...]`, one entry per point of the sweep file."""
    points = load(path)
    return list(zip(name_points(points), [overrides(p) for p in points]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m muse_jax.sweep",
        description="Print the points of a sweep file: one 'name<TAB>overrides' line each.",
    )
    parser.add_argument("sweep_file", help="a Python file defining get_sweep()")
    parser.add_argument(
        "--config", help="also check every override key against this config file's get_config()"
    )
    args = parser.parse_args(argv)
    try:
        runs = expand(args.sweep_file)
        if args.config:
            check_keys(args.config, runs)
    except SweepError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    for name, flags in runs:
        sys.stdout.write(f"{name}\t{shlex.join(flags)}\n")
    return 0


def check_keys(config_path: str, runs: Sequence[tuple[str, list[str]]]) -> None:
    """Raises SweepError if an override names a key that the config file does not have."""
    if not os.path.isfile(config_path):
        raise SweepError(f"config file not found: {config_path}")
    config = config_files.load(config_path, "_muse_sweep_config")
    for _, flags in runs:
        for flag in flags:
            key = flag.split("=", 1)[0].removeprefix("--config.")
            node = config
            for part in key.split("."):
                try:
                    node = node[part]
                except (KeyError, TypeError, AttributeError):
                    raise SweepError(f"unknown config key {key!r} in {config_path}") from None


if __name__ == "__main__":
    # Sweep files import `muse_jax.sweep`: run that module's main so that they share one SweepError.
    from muse_jax import sweep as _library

    sys.exit(_library.main())
