"""Every command the README shows names a real binary, real flags and real config keys.

The README's ```bash blocks are parsed line by line (continuations joined). For each
`python -m muse_jax.X ...` or `muse-*` command, the binary's own `--helpfull` lists the flags it
takes, and every `--config.a.b=...` override must name a key of the config file the command
loads. Commands that run end to end are run by other tests (the Quick start's by `.ci/run`, the
Python example and the pod command by tests/test_inference.py and tests/test_launch.py); this
test catches a renamed flag, binary or key in any of them.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shlex

import pytest

from muse_jax import config_files
from tests.helpers import ROOT, run_module

README = pathlib.Path(ROOT, "README.md")
SETUP = pathlib.Path(ROOT, "setup.py")
MAX_LINES = 330  # "About 300": the budget for a user's guide.


def bash_commands(text: str) -> list[list[str]]:
    """The words of each command in the text's ```bash blocks (comments and blanks dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line, comments=True))
    return out


def console_scripts() -> dict[str, str]:
    """`muse-x` -> its module, from setup.py's entry points."""
    return dict(re.findall(r'"(muse-[a-z]+)=([\w.]+):\w+"', SETUP.read_text()))


def binary_of(words: list[str]) -> tuple[str | None, list[str]]:
    """(module, its arguments) of a muse command, or (None, []) for anything else."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes.
        words = words[1:]
    if len(words) >= 3 and words[0].startswith("python") and words[1] == "-m":
        module = words[2]
        return (module if module.startswith("muse_jax") else None), words[3:]
    if words and words[0] in console_scripts():
        return console_scripts()[words[0]], words[1:]
    return None, []


@functools.cache
def flags_of(module: str) -> frozenset[str]:
    done = run_module(module, "--helpfull", timeout=300)
    names = re.findall(r"^\s+--(?:\[no\])?([\w.-]+):", done.stdout + done.stderr, flags=re.M)
    assert names, (
        f"{module} --helpfull listed no flags:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return frozenset(names)


def config_of(spec: str):
    return config_files.load(os.path.join(ROOT, spec), "readme_config")


def has_key(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def test_the_parser_reads_commands_flags_and_keys():
    text = "```bash\nMUSE_JAX_HUGEPAGES=0 python -m muse_jax.sample --model=m \\\n  --seed=1\n```"
    assert binary_of(bash_commands(text)[0]) == ("muse_jax.sample", ["--model=m", "--seed=1"])
    assert binary_of(["muse-export", "--workdir=w"]) == ("muse_jax.export", ["--workdir=w"])
    assert binary_of(["pytest", "-n", "2"]) == (None, [])


def test_the_readme_is_a_short_guide_without_commit_hashes():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)


def _readme_binary_commands() -> list[tuple[str, list[str]]]:
    found = [binary_of(words) for words in bash_commands(README.read_text())]
    return [(module, args) for module, args in found if module]


@pytest.mark.parametrize("module", sorted({m for m, _ in _readme_binary_commands()}))
def test_every_readme_command_uses_real_flags_and_config_keys(module):
    flags = flags_of(module)
    for cmd_module, args in _readme_binary_commands():
        if cmd_module != module:
            continue
        config, spec = None, None
        for arg in args:
            if arg.startswith("--config="):
                spec = arg.split("=", 1)[1]
                try:
                    config = config_of(spec)
                except ValueError:  # It needs the user's files (e.g. a converted model).
                    config = None
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg[2:].split("=", 1)[0]
            if name.startswith("config."):
                assert spec is not None, f"{module}: {arg} without --config"
                assert config is None or has_key(config, name[len("config.") :]), (
                    f"{module}: no config key {arg}"
                )
            else:
                assert name in flags or name.removeprefix("no") in flags, (
                    f"{module} has no flag --{name} (README: {' '.join(args)})"
                )
