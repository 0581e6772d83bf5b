"""The training package's modules import one another one way only (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parent.parent / "src" / "llamalab" / "train"


def imports_of(path: Path) -> set[str]:
    """Every ``llamalab.train.X`` a module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            is_train = parts[:2] == ["llamalab", "train"] and len(parts) > 2
            if is_train and (TRAIN / f"{parts[2]}.py").is_file():
                found.add(parts[2])
    return found - {path.stem}


def test_no_import_cycle_among_train_modules():
    graph = {p.stem: imports_of(p) for p in TRAIN.glob("*.py") if p.stem != "__init__"}
    assert "export" in graph["loop"]  # the loop exports at its end: that edge stays

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    return [*path, nxt]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not cycles, " → ".join(cycles[0])
