"""Run untrusted generated code in a sandbox, never in the evaluating process.

Where Linux allows unprivileged namespaces (user namespaces enabled, Linux 5.12+), each
program runs behind a real boundary, built by :mod:`llamalab.eval.sandbox_init`:

* its own user namespace, as an unprivileged user with no capabilities: ``nobody``
  outside when the evaluator is root (so not root over the real filesystem), else the
  evaluator's own user; ``no_new_privs`` and nosuid mounts make setuid programs useless;
* its own mount namespace: every mount is read-only; its folder is a private, size-bounded
  tmpfs on ``/tmp``; ``/proc`` is a fresh one that shows only its own processes;
* its own PID namespace: it cannot see or signal the evaluator or any other process, and
  when it ends every process it started dies with it (a ``setsid`` daemon included);
* its own network namespace (no network), IPC and UTS namespaces;
* resource limits: CPU time, address space, file size, processes (RLIMIT_NPROC, counted
  in its own user namespace), no core dumps; a wall-clock timeout.

Where the kernel refuses namespaces, :func:`isolation` says why, a ``RuntimeWarning`` says
so once, and programs run with the best-effort guards only: a fresh ``python -I``, an
almost empty environment, their own temporary folder and session, the same resource
limits (RLIMIT_NPROC aside), the timeout, and the guard below. That fallback is a guard
against accidents, as in the HumanEval paper's harness, not a security boundary: the
program runs as the evaluator's user and can reach the network and the filesystem.

Either way the program starts with no stdin; its folder is removed afterwards.
"""

from __future__ import annotations

import fcntl
import functools
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from llamalab.errors import LlamalabError

OUTPUT_TAIL_BYTES = 2000  # how much of a program's stderr a result keeps
_INIT = Path(__file__).with_name("sandbox_init.py")
_SETUP_FAILED = 125  # sandbox_init's exit status when it could not build the sandbox
_GRACE_S = 5.0  # how long a timed-out sandbox may take to tear its namespace down


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10  # CPU time (RLIMIT_CPU)
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS)
    file_bytes: int = 16 << 20  # any single file written (RLIMIT_FSIZE); its folder: 4x
    processes: int = 64  # processes at once (RLIMIT_NPROC; with namespaces only)


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


@dataclass(frozen=True)
class Isolation:
    """Whether programs run behind namespaces, and if not, what the kernel said."""

    namespaces: bool
    detail: str


class SandboxError(LlamalabError):
    """The namespaces could not be built for one program, though they had been before."""


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

_FALLBACK_GUARDS = (
    "generated code runs WITHOUT a security boundary: only rlimits (CPU, memory, file "
    "size), its own session and temporary folder, a scrubbed environment and a timeout "
    "guard it; it runs as this user, can reach the network, read and write files, signal "
    "other processes, and leave processes behind. Run untrusted models in a container."
)


@functools.cache
def isolation() -> Isolation:
    """Whether this machine lets programs run behind namespaces (probed once, by running
    an empty program in them); when not, warn once with what is and is not guarded."""
    if sys.platform != "linux":
        result = Isolation(False, f"namespaces need Linux, not {sys.platform}")
    else:
        try:
            probe = _run_isolated("pass\n", Limits(timeout_s=20.0), guard=False)
        except SandboxError as exc:
            result = Isolation(False, str(exc))
        else:
            if probe.passed:
                result = Isolation(True, "user, mount, PID, network, IPC and UTS namespaces")
            else:
                result = Isolation(False, f"a program could not run in them: {probe}")
    if not result.namespaces:
        warnings.warn(
            f"llamalab sandbox: no namespaces ({result.detail}); {_FALLBACK_GUARDS}",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def _apply_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec: the limits bind the program only."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, limits: Limits | None = None, *, guard: bool = True) -> RunResult:
    """Run Python ``source`` in the sandbox (see the module's docstring).

    Passed means it ran to its last line and exited with status 0: a random marker is
    printed after ``source``, so code that exits early (``sys.exit(0)`` before the tests
    run) does not pass. Raises :class:`SandboxError` if the namespaces, available when
    probed, cannot be built for this program (it did not run).
    """
    limits = limits or Limits()
    if isolation().namespaces:
        return _run_isolated(source, limits, guard=guard)
    return _run(source, limits, guard=guard, isolated=False)


def _run_isolated(source: str, limits: Limits, *, guard: bool) -> RunResult:
    return _run(source, limits, guard=guard, isolated=True)


def _run(source: str, limits: Limits, *, guard: bool, isolated: bool) -> RunResult:
    marker = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="llamalab-sandbox-") as tmp:
        folder = Path(tmp)
        program = folder / "program.py"
        program.write_text(
            (_GUARD if guard else "") + source + f"\n\nprint({marker!r})\n", encoding="utf-8"
        )
        home = "/tmp" if isolated else tmp  # inside the namespaces, its folder is /tmp
        env = {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        setup = b""
        start = time.monotonic()
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            if isolated:
                status_r, status_w = os.pipe()
                args = [limits.cpu_s, limits.memory_bytes, limits.file_bytes, limits.processes]
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", "-B", str(_INIT), str(status_w),
                         str(program), *map(str, args)],
                        cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        start_new_session=True, pass_fds=(status_w,),
                    )  # fmt: skip
                finally:
                    os.close(status_w)
            else:
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
                if isolated:  # its first process kills the namespace and waits until empty
                    proc.terminate()
                    try:
                        proc.wait(timeout=_GRACE_S)
                    except subprocess.TimeoutExpired:
                        pass
            finally:
                # Whatever happened, nothing the program started outlives it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                returncode = proc.wait()
                if isolated:
                    fcntl.fcntl(status_r, fcntl.F_SETFL, os.O_NONBLOCK)
                    try:
                        setup = os.read(status_r, 4096)
                    except BlockingIOError:
                        pass
                    os.close(status_r)
        elapsed = time.monotonic() - start
        if setup:
            raise SandboxError(
                f"the sandbox could not be built: {setup.decode('utf-8', 'replace')}"
            )
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
