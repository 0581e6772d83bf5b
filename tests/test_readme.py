"""The README's examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def python_blocks(section: str) -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"## {section}")
    end = readme.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", readme[start : end if end > 0 else None], re.DOTALL)


def test_python_api_example_runs_as_written(smollm2_path, tmp_path):
    (code,) = python_blocks("Python API")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not next to any model file: the example must find the default itself
        env={**os.environ},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 5, result.stdout  # it printed generated text
