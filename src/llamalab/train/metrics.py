"""Training metrics: ``metrics.jsonl`` (one JSON object per optimiser step) and its plot.

Each line has at least ``step`` (1-based: the number of updates done), ``loss``, ``lr``,
``tokens`` (seen so far, all ranks), ``tokens_per_s`` and ``grad_norm``; every
``eval_every`` steps it also has ``eval_loss``: the held-out loss per source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
PLOT = "loss.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics file (a torn last line, from a crash, is skipped)."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step``: a resumed run rewrites what came after its checkpoint."""
    records = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one line per step, flushed at once so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def plot_metrics(metrics: Path, png: Path, title: str = "") -> None:
    """Draw training and held-out loss against tokens into ``png`` (replaced atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    if not records:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["tokens"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    sources = sorted({s for r in records for s in r.get("eval_loss", {})})
    for s in sources:
        pts = [(r["tokens"], r["eval_loss"][s]) for r in records if s in r.get("eval_loss", {})]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"held-out {s}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)
