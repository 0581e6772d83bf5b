"""The layering of llamalab's packages, read from the source (every import, lazy ones too).

Dependencies point one way: cli → serve/train/eval → generation/data →
model/checkpoint/tokenizer/quant → gguf → errors. A cycle, or an import against that
direction, would make the lower package impossible to use (or test) on its own. Imports
inside functions count as much as those at the top: deferring an import changes when
a module loads, not what it depends on. Nothing is imported here; the files are parsed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "llamalab"

# The core: what running a model needs. It never reaches the applications built on it.
CORE = {
    "model", "config", "kv_cache", "checkpoint", "tokenizer", "gguf", "quant", "kernels",
    "generation", "parallel",
}  # fmt: skip
APPLICATIONS = {"serve", "train", "eval", "cli"}

# What gguf/ may use of llamalab: it is the file format alone, like gguf-py.
GGUF_MAY_IMPORT = {"llamalab.errors"}

# Module cycles tolerated for now, each with the reason (none: keep it that way).
ALLOWED_MODULE_CYCLES: list[set[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The llamalab modules ``name`` imports anywhere in its file, with their line numbers.

    ``from llamalab.x import y`` names module ``llamalab.x.y`` when that is a module, else
    ``llamalab.x`` (y is then a name defined in it).
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), node.lineno


def _graph() -> dict[str, dict[str, int]]:
    """Module → {imported llamalab module: first line of the import}."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(name, path, known):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def package_of(module: str) -> str:
    """``llamalab.gguf.header`` → ``gguf``; top-level modules are their own package."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    if parts[1] == "__main__":
        return "cli"
    return parts[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, str]]:
    """Package → {imported package: one import that makes the edge, as ``module:line``}."""
    packages: dict[str, dict[str, str]] = {}
    for module, edges in graph.items():
        src = package_of(module)
        out = packages.setdefault(src, {})
        for target, line in edges.items():
            dst = package_of(target)
            # The package root (llamalab/__init__.py) and errors sit below everything.
            if dst != src and target not in (ROOT, f"{ROOT}.errors"):
                out.setdefault(dst, f"{module}:{line} → {target}")
    return packages


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return _graph()


def test_the_parse_sees_the_imports_we_know_of(graph: dict[str, dict[str, int]]) -> None:
    """A check on the checker: a top-level import and a lazy one, both found."""
    assert "llamalab.errors" in graph["llamalab.gguf.header"]
    assert "llamalab.gguf.header" in graph["llamalab.checkpoint.load"]  # inside a function
    assert len(graph) > 50


def test_no_cycles_between_packages(graph: dict[str, dict[str, int]]) -> None:
    packages = _package_graph(graph)
    cycles = _cycles({p: set(edges) for p, edges in packages.items()})
    shown = [
        [f"{a} → {b} ({packages[a][b]})" for a in cycle for b in cycle if b in packages[a]]
        for cycle in cycles
    ]
    assert not cycles, f"package cycles: {shown}"


def test_no_cycles_between_modules(graph: dict[str, dict[str, int]]) -> None:
    cycles = [
        c
        for c in _cycles({m: set(edges) for m, edges in graph.items()})
        if set(c) not in ALLOWED_MODULE_CYCLES
    ]
    shown = [
        [f"{a}:{graph[a][b]} → {b}" for a in cycle for b in cycle if b in graph[a]]
        for cycle in cycles
    ]
    assert not cycles, f"module cycles: {shown}"


def test_gguf_is_a_leaf(graph: dict[str, dict[str, int]]) -> None:
    """gguf/ is the file format alone: it may use llamalab.errors and nothing else above it."""
    upward = [
        f"{module}:{line} → {target}"
        for module, edges in graph.items()
        if package_of(module) == "gguf"
        for target, line in edges.items()
        if package_of(target) != "gguf" and target not in GGUF_MAY_IMPORT
    ]
    assert not upward, upward


def test_the_core_never_imports_the_applications(graph: dict[str, dict[str, int]]) -> None:
    upward = [
        f"{module}:{line} → {target}"
        for module, edges in graph.items()
        if package_of(module) in CORE
        for target, line in edges.items()
        if package_of(target) in APPLICATIONS
    ]
    assert not upward, upward
