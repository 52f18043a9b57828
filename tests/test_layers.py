"""The package's layers point one way, and no module imports itself back.

    shared base (storage, errors, cli, parallel, checkpoints, stages, ...)
      -> data -> models -> text -> sampling -> inference/convert -> train | eval -> binaries

Every import counts, at module level or inside a function: a deferred import is still a
dependency. `train` and `eval` are peers and import nothing of each other. The package's own
`__init__` (the lazy `from muse_jax import MusePipeline`) sits with the binaries.

`python tests/test_layers.py` prints every upward import and every cycle (the counts the
closing notes quote).
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "muse_jax"

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "muse_jax.storage",
            "muse_jax.errors",
            "muse_jax.cli",
            "muse_jax.entry",
            "muse_jax.host_memory",
            "muse_jax.parallel",
            "muse_jax.compilation_cache",
            "muse_jax.checkpoints",
            "muse_jax.stages",
            "muse_jax.config_files",
            "muse_jax.prompt_groups",
            "muse_jax.tpu",
        ),
    ),
    ("data", ("muse_jax.data",)),
    ("models", ("muse_jax.models",)),
    ("text", ("muse_jax.text",)),
    ("sampling", ("muse_jax.sampling",)),
    ("inference", ("muse_jax.inference", "muse_jax.convert")),
    ("train", ("muse_jax.train",)),
    ("eval", ("muse_jax.eval",)),
    (
        "binaries",
        (
            "muse_jax",
            "muse_jax.train.__main__",
            "muse_jax.convert.__main__",
            "muse_jax.eval.convert_inception",
        ),
    ),
)
# Layers of equal rank: neither imports the other.
RANK = {"base": 0, "data": 1, "models": 2, "text": 3, "sampling": 4, "inference": 5}
RANK |= {"train": 6, "eval": 6, "binaries": 7}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its body. `from pkg import mod`
    counts as `pkg.mod` alone (the parent package is imported too, but it is only a namespace)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    out.add(f"{source}.{alias.name}")
                elif source in known:
                    out.add(source)
    out.discard(name)
    return out


def layer(name: str) -> str:
    best, best_len = None, -1
    for layer_name, prefixes in LAYERS:
        for prefix in prefixes:
            matches = name == prefix or (prefix != "muse_jax" and name.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer_name, len(prefix)
    return best or "binaries"  # Top-level modules not listed in a lower layer are binaries.


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits higher, or in a peer layer."""
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            a, b = layer(src), layer(dst)
            if RANK[b] > RANK[a] or (RANK[b] == RANK[a] and a != b):
                bad.append((src, dst))
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_deferred_and_relative_imports(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f():\n    from muse_jax.train import trainer\n    import muse_jax.storage\n"
        "from . import sibling\n"
    )
    known = {"muse_jax.train.trainer", "muse_jax.storage", "muse_jax.data.sibling"}
    got = imports("muse_jax.data.m", tmp_path / "m.py", known)
    assert got == known
    assert upward({"muse_jax.data.m": got}) == [("muse_jax.data.m", "muse_jax.train.trainer")]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    assert layer("muse_jax") == "binaries"
    assert layer("muse_jax.train.__main__") == "binaries"
    assert layer("muse_jax.train.trainer") == "train"
    assert layer("muse_jax.sample") == "binaries"
    assert layer("muse_jax.storage") == "base"


def test_no_upward_import():
    bad = upward(graph())
    assert not bad, "upward or peer imports:\n" + "\n".join(
        f"  {a} ({layer(a)}) -> {b} ({layer(b)})" for a, b in bad
    )


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in found)


if __name__ == "__main__":
    edges = graph()
    bad, loops = upward(edges), cycles(edges)
    for a, b in bad:
        print(f"upward: {a} ({layer(a)}) -> {b} ({layer(b)})")
    for c in loops:
        print("cycle: " + " <-> ".join(c))
    print(f"{len(bad)} upward imports, {len(loops)} cycles, {sum(map(len, edges.values()))} edges")
    sys.exit(1 if bad or loops else 0)
