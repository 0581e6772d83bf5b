"""Generated code cannot get out of the sandbox: each test tries one escape, going around
the Python-level guard (``posix`` instead of ``os``, or no guard at all), and checks on the
host that it failed. Where the kernel refuses namespaces the tests skip, naming why."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from llamalab.eval import sandbox
from llamalab.eval.sandbox import Isolation, Limits, run_program

LIMITS = Limits(timeout_s=8.0, cpu_s=3, memory_bytes=512 << 20, file_bytes=1 << 20, processes=16)


@pytest.fixture
def namespaces():
    """Skip where the kernel refuses the namespaces (user namespaces off, old kernel)."""
    found = sandbox.isolation()
    if not found.namespaces:
        pytest.skip(f"no namespaces on this machine: {found.detail}")


@pytest.fixture
def outside():
    """A world-writable folder outside the sandbox, so that only the boundary (not file
    permissions) can stop a write; /var/tmp because the sandbox has /tmp to itself."""
    folder = Path(tempfile.mkdtemp(prefix="llamalab-outside-", dir="/var/tmp"))
    folder.chmod(0o777)
    yield folder
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def _run(source: str, *, guard: bool = False, limits: Limits = LIMITS):
    return run_program(textwrap.dedent(source), limits, guard=guard)


def _host_pids_with(marker: str) -> list[int]:
    """Processes on the host whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_it_cannot_write_outside_its_folder(namespaces, outside):
    result = _run(f"""
        import errno, os
        for path in ({str(outside / "pwned")!r}, "/etc/llamalab-pwned", "/var/tmp/llamalab-pwned"):
            try:
                open(path, "w").write("x")
            except OSError as exc:
                print(path, errno.errorcode[exc.errno])
            else:
                print(path, "WRITTEN")
        open("mine.txt", "w").write("its own folder is writable")
        print(open("mine.txt").read(), os.getcwd())
    """)
    assert result.passed, result
    assert not (outside / "pwned").exists()
    assert not Path("/etc/llamalab-pwned").exists() and not Path("/var/tmp/llamalab-pwned").exists()


def test_the_rest_of_the_filesystem_is_a_read_only_mount(namespaces, outside):
    # EROFS, not EACCES: the mount refuses the write whatever the file permissions say.
    result = _run(f"""
        import errno, sys
        try:
            open({str(outside / "pwned")!r}, "w")
        except OSError as exc:
            sys.stderr.write(errno.errorcode[exc.errno])
    """)
    assert result.passed and result.stderr_tail == "EROFS", result


def test_it_cannot_unlink_a_file_outside_around_the_guard(namespaces, outside):
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    result = _run(
        f"""
        import posix, sys
        for call in (lambda: posix.unlink({str(victim)!r}),
                     lambda: posix.rename({str(victim)!r}, {str(outside / "moved")!r})):
            try:
                call()
            except OSError as exc:
                sys.stderr.write(f"{{exc.strerror}}\\n")
        """,
        guard=True,
    )
    assert result.passed, result
    assert victim.read_text() == "keep me" and not (outside / "moved").exists()


def test_it_cannot_read_the_evaluators_environment(namespaces, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("LLAMALAB_TEST_SECRET", secret)
    result = _run(f"""
        import os, sys
        seen = [bytes(os.environ.get("LLAMALAB_TEST_SECRET", ""), "ascii")]
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        for pid in [str(os.getppid()), {str(os.getpid())!r}, *pids]:
            try:
                seen.append(open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError:
                pass
        sys.stderr.write(repr(seen) + "\\n")
        # A fresh /proc: only the sandbox's own processes (its init and itself) are there.
        assert len(pids) <= 2 and {os.getpid()} not in map(int, pids), pids
    """)
    assert result.passed, result
    assert secret not in result.stderr_tail


def test_a_shell_runs_but_cannot_escape(namespaces, outside, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("LLAMALAB_TEST_SECRET", secret)
    script = (
        f"echo pwned > {outside}/shell; rm -f {outside}/keep;"
        " cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep SECRET;"
        " echo shell ran as $(id -u) >&2"
    )
    (outside / "keep").write_text("keep")
    (outside / "keep").chmod(0o666)
    result = _run(
        f"""
        import posix
        pid = posix.posix_spawn("/bin/sh", ["sh", "-c", {script!r}], {{"PATH": "/bin:/usr/bin"}})
        posix.waitpid(pid, 0)
        """,
        guard=True,
    )
    assert result.passed, result
    assert "shell ran as" in result.stderr_tail  # the shell itself is allowed ...
    assert not (outside / "shell").exists() and (outside / "keep").exists()  # ... not out
    assert secret not in result.stderr_tail


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_it_cannot_stop_or_kill_the_evaluator(namespaces, sig):
    # The evaluator is a separate process here, so that a sandbox that lets the signal
    # through fails this test instead of stopping pytest.
    secret = secrets.token_hex(16)
    evaluator = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from llamalab.eval.sandbox import Limits, run_program
            source = sys.stdin.read()
            result = run_program(source, Limits(timeout_s=8.0, cpu_s=3))
            print(result.status, "evaluator alive", flush=True)
            print(result.stderr_tail, file=sys.stderr)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "LLAMALAB_TEST_SECRET": secret},
    )  # fmt: skip
    program = f"""
import posix
for pid in (posix.getppid(), {evaluator.pid}):
    try:
        posix.kill(pid, {int(sig)})
    except OSError:  # ESRCH: no such process in sight
        pass
for pid in posix.listdir("/proc"):
    try:
        if {secret.encode()!r} in open(f"/proc/{{pid}}/environ", "rb").read():
            posix.kill(int(pid), {int(sig)})
    except (OSError, ValueError):
        pass
"""
    evaluator.stdin.write(program.encode())
    evaluator.stdin.close()
    stopped, deadline = False, time.monotonic() + 60
    while evaluator.poll() is None and time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{evaluator.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state in ("T", "t"):
            stopped = True
            evaluator.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    evaluator.stdin = None  # written and closed above; communicate would flush it
    out, err = evaluator.communicate(timeout=60)
    assert not stopped, "the program stopped its evaluator"
    assert evaluator.returncode == 0, (evaluator.returncode, err.decode()[-2000:])
    assert out.decode().split() == ["passed", "evaluator", "alive"], (out, err)


def test_it_cannot_reach_the_network(namespaces):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = _run(f"""
            import socket, sys
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
            except OSError as exc:
                sys.stderr.write(f"refused: {{exc}}")
        """)
    assert result.passed and "refused" in result.stderr_tail, result


def test_processes_are_bounded_and_none_outlives_the_item(namespaces):
    marker = f"llamalab-sleeper-{secrets.token_hex(8)}"
    started = time.monotonic()
    result = _run(f"""
        import os, sys
        execed_r, execed_w = os.pipe()  # close-on-exec: EOF once every child runs sleep
        forked = 0
        for _ in range(100):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv("/bin/sleep", [{marker!r}, "60"])
            forked += 1
        os.close(execed_w)
        os.read(execed_r, 1)
        sys.stderr.write(f"forked {{forked}}")
    """)
    leftovers = _host_pids_with(marker)
    _kill_all(leftovers)
    assert result.passed, result
    assert int(result.stderr_tail.split()[-1]) < LIMITS.processes
    assert not leftovers
    assert time.monotonic() - started < LIMITS.timeout_s


def test_a_fork_bomb_ends_quickly(namespaces):
    started = time.monotonic()
    result = _run("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed and result.status != "timeout", result
    assert time.monotonic() - started < LIMITS.timeout_s


def test_a_setsid_daemon_does_not_survive_the_item(namespaces):
    marker = f"llamalab-daemon-{secrets.token_hex(8)}"
    result = _run(f"""
        import os
        execed_r, execed_w = os.pipe()  # close-on-exec: EOF once the daemon runs sleep
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", [{marker!r}, "60"])
            os._exit(0)
        os.close(execed_w)
        os.read(execed_r, 1)
        os.wait()
    """)
    leftovers = _host_pids_with(marker)
    _kill_all(leftovers)
    assert result.passed, result
    assert not leftovers, "a daemon outlived its item"


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user the program is that user")
def test_as_root_the_program_is_nobody_with_no_capabilities(namespaces, outside):
    private = outside / "root-only.txt"
    private.write_text("root's")
    private.chmod(0o600)
    result = _run(f"""
        import os
        status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines())
        assert os.getuid() == os.geteuid() == 65534 and os.getgroups() in ([], [65534]), status
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[cap], 16) == 0, (cap, status[cap])
        assert status["NoNewPrivs"] == "1"
        try:
            open({str(private)!r}).read()
        except PermissionError:
            pass
        else:
            raise SystemExit("read a root-only file")
        # Outside, the same process is nobody too (uid_map: inside -> outside).
        assert open("/proc/self/uid_map").read().split()[-3:] == ["65534", "65534", "1"]
    """)
    assert result.passed, result


def test_without_namespaces_it_warns_once_and_keeps_the_old_guards(monkeypatch):
    def refused(*args, **kwargs):
        raise sandbox.SandboxError("the sandbox could not be built: unshare: EPERM")

    sandbox.isolation.cache_clear()
    monkeypatch.setattr(sandbox, "_run_isolated", refused)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reason = "the sandbox could not be built: unshare: EPERM"
            assert sandbox.isolation() == Isolation(False, reason)
            assert run_program("assert 1 + 1 == 2\n", LIMITS).passed
            bomb = run_program("x = bytearray(4 << 30)\n", LIMITS)  # RLIMIT_AS still holds
            assert bomb.status == "failed" and "MemoryError" in bomb.stderr_tail
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert len(messages) == 1 and "WITHOUT a security boundary" in messages[0]
        assert "unshare: EPERM" in messages[0]
    finally:
        sandbox.isolation.cache_clear()


def test_at_the_timeout_the_whole_namespace_is_gone(namespaces):
    marker = f"llamalab-daemon-{secrets.token_hex(8)}"
    limits = Limits(timeout_s=2.0, cpu_s=3, memory_bytes=512 << 20, file_bytes=1 << 20)
    started = time.monotonic()
    result = _run(
        f"""
        import os, time
        execed_r, execed_w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", [{marker!r}, "60"])
            os._exit(0)
        os.close(execed_w)
        os.read(execed_r, 1)
        time.sleep(600)
        """,
        limits=limits,
    )
    leftovers = _host_pids_with(marker)
    _kill_all(leftovers)
    assert result.status == "timeout", result
    assert not leftovers, "a daemon outlived its item's timeout"
    assert time.monotonic() - started < limits.timeout_s + 5
