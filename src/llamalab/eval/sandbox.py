"""Run untrusted generated code in a limited subprocess, never in the evaluating process.

Each program runs in a fresh interpreter (``python -I``: no user site, no PYTHON*
environment), in its own temporary folder that is removed afterwards, with an almost
empty environment, no stdin, and its own session (so a timeout kills every process it
started). Kernel limits set with ``resource.setrlimit`` in the child only bound its CPU
time, address space, the size of any file it writes (its captured output included),
and forbid core dumps; a wall-clock timeout catches a program that sleeps or blocks.

This is a guard against accidents (an infinite loop, a memory bomb, a runaway write), as
in the HumanEval paper's harness, not a security boundary: the program runs as the same
user and can reach the network. Run evaluations of untrusted models in a container.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_TAIL_BYTES = 2000  # how much of a program's stderr a result keeps


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # CPU time (RLIMIT_CPU)
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # any single file written (RLIMIT_FSIZE)


@dataclass(frozen=True)
class RunResult:
    """How a program ended: ``status`` is "passed", "failed", "timeout" or "killed"."""

    status: str
    returncode: int | None
    elapsed_s: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        """Whether the program ran to the end and exited with status 0."""
        return self.status == "passed"


# Turns off what generated code has no business calling, before it runs (HumanEval's
# harness does the same): a second line of defence after the kernel limits.
_GUARD = """\
import builtins as _b, os as _os, shutil as _sh, subprocess as _sp
for _name in ("kill", "killpg", "system", "fork", "forkpty", "putenv", "remove", "unlink",
              "removedirs", "rmdir", "rename", "renames", "truncate", "setuid", "chmod"):
    if hasattr(_os, _name):
        setattr(_os, _name, None)
_sh.rmtree = _sh.move = None
_sp.Popen = None
del _b, _os, _sh, _sp, _name
"""


def _apply_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec: the limits bind the program only."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, limits: Limits | None = None, *, guard: bool = True) -> RunResult:
    """Run Python ``source`` in a sandboxed subprocess.

    Passed means it ran to its last line and exited with status 0: a random marker is
    printed after ``source``, so code that exits early (``sys.exit(0)`` before the tests
    run) does not pass.
    """
    limits = limits or Limits()
    marker = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="llamalab-sandbox-") as tmp:
        folder = Path(tmp)
        program = folder / "program.py"
        program.write_text(
            (_GUARD if guard else "") + source + f"\n\nprint({marker!r})\n", encoding="utf-8"
        )
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        start = time.monotonic()
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(program)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _apply_limits(limits),  # noqa: PLW1509 (no threads here)
            )
            try:
                returncode = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Whatever happened, nothing the program started outlives it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                returncode = proc.wait()
        elapsed = time.monotonic() - start
        with open(folder / "stderr", "rb") as f:
            f.seek(max(0, (folder / "stderr").stat().st_size - OUTPUT_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
        with open(folder / "stdout", "rb") as f:
            f.seek(max(0, (folder / "stdout").stat().st_size - 64))
            finished = f.read().rstrip().endswith(marker.encode())
    if timed_out:
        status = "timeout"
    elif returncode == 0:
        status = "passed" if finished else "failed"
    elif returncode < 0:  # a signal: SIGXCPU (CPU limit), SIGXFSZ (file size), SIGKILL
        status = "killed"
    else:
        status = "failed"
    return RunResult(status, returncode, elapsed, tail)
