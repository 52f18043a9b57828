"""Loading a config file named as `path[:arg]`, the way `--config=` names it, without flags.

For tools that read a config outside absl's flag parsing (the sweep checker, the README test,
the pictures script, the benchmarks). Standard library only, so light callers stay light.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def load(spec: str, module_name: str = "_muse_config_file") -> Any:
    """`path[:arg]` -> the file's `get_config(arg)` (`get_config()` when there is no arg)."""
    path, _, arg = spec.partition(":")
    loader = importlib.util.spec_from_file_location(module_name, os.fspath(path))
    if loader is None or loader.loader is None:
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
