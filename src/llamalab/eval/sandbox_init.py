"""The first process of a sandboxed program: it builds the namespaces, then runs the program.

:mod:`llamalab.eval.sandbox` starts it as ``python -I -S sandbox_init.py STATUS_FD PROGRAM
CPU_S MEMORY_BYTES FILE_BYTES PROCESSES``. It runs without site-packages, so it imports
the standard library only. Three processes take part:

* this one (outside): it forks a helper that stays in the evaluator's namespaces to write
  the id maps (a process inside a new user namespace may not map other ids), then unshares
  user, mount, PID, network, IPC, UTS and cgroup namespaces. It waits for the namespace's
  first process and exits the way the program did; on SIGTERM (the evaluator's timeout) it
  kills that first process, which takes the whole namespace down with it.
* the namespace's init (PID 1): it makes every mount private and read-only, mounts a fresh
  ``/proc`` (only this namespace's processes) and a private tmpfs on ``/tmp``, and starts
  the program. When the program ends, init exits and the kernel kills every process left
  in the PID namespace: a ``setsid`` or double-forked daemon does not outlive its item.
* the program: it drops to an unprivileged user with no capabilities (``nobody`` when the
  evaluator is root; else the evaluator's own user), sets ``no_new_privs`` and the
  resource limits, and execs ``python -I -B /tmp/program.py``.

Any failure before the program starts is written to ``STATUS_FD`` (and nothing else is),
so the evaluator can tell a sandbox that could not be built from a program that failed.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
) | CLONE_NEWCGROUP

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture since Linux 5.12

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 28, 38, 47, 4
# Root inside the namespace gets no capabilities back at exec, and this cannot be undone.
SECURE_NOROOT = 0x1 | 0x2 | 0x4 | 0x8  # NOROOT, NOROOT_LOCKED, NO_SETUID_FIXUP(_LOCKED)
CAPABILITY_VERSION_3 = 0x20080522

NOBODY = 65534  # the kernel's overflow uid/gid, "nobody"/"nogroup" on Debian
SETUP_FAILED = 125  # exit status when the sandbox could not be built (the reason is on STATUS_FD)
WORK = "/tmp"  # the program's folder inside the sandbox: its own tmpfs

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A step of building the sandbox failed: the message names the step."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> None:
    ulong = ctypes.c_ulong
    _check(_libc.prctl(option, ulong(arg), ulong(0), ulong(0), ulong(0)), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = ""):
    enc = lambda s: None if s is None else s.encode()
    result = _libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags),
                         enc(data) if data else None)  # fmt: skip
    _check(result, f"mount {fstype or source} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]


def _read_only_everywhere() -> None:
    """Every mount below / becomes read-only and nosuid (mount_setattr(2), Linux 5.12+)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    result = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), b"/",
                           ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)))  # fmt: skip
    _check(result, "mount_setattr / read-only (Linux 5.12+)")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_id_maps(pid: int, root: bool) -> None:
    """Runs in the helper, outside the new user namespace (only there may root map ids).

    Root maps itself (to do the mounts) and ``nobody`` (for the program): outside, the
    program is then ``nobody``, not root over the real filesystem. Another user may map
    only itself, as root of the namespace; the program then drops its capabilities.
    """
    if root:
        ids = f"0 0 1\n{NOBODY} {NOBODY} 1\n"
        _write(f"/proc/{pid}/uid_map", ids)
        _write(f"/proc/{pid}/gid_map", ids)
    else:
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", f"0 {os.geteuid()} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 {os.getegid()} 1\n")


def _reachable(paths: list[str]) -> None:
    """Make the interpreter reachable for ``nobody`` when a folder above it is not (pyenv
    under /root, 0700): a tmpfs covers that folder (hiding all of it) and the interpreter's
    own folder is bound back in at the same path."""
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in paths]
    covered: set[str] = set()
    for path, fd in held:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            above = "/" + "/".join(parts[:depth])
            if any(above == c or above.startswith(c + "/") for c in covered):
                continue
            if not os.stat(above).st_mode & stat.S_IXOTH:
                _mount("tmpfs", above, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
                covered.add(above)
                os.makedirs(path, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                break
        os.close(fd)


def _drop_privileges(root: bool) -> None:
    """The program keeps no capability, in the namespace or outside, and gains none by exec."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, what="no_new_privs")
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clear ambient capabilities")
    if root:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # from uid 0: the kernel clears every capability
    else:
        _prctl(PR_SET_SECUREBITS, SECURE_NOROOT, what="securebits")

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]

        _check(_libc.capset(ctypes.byref(Header(CAPABILITY_VERSION_3, 0)), (Data * 2)()),
               "capset")  # fmt: skip


def _program(source: bytes, limits: list[int], root: bool) -> None:
    """The program's process: privileges and limits, its file, then exec."""
    cpu_s, memory_bytes, file_bytes, processes = limits
    _drop_privileges(root)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))
    os.chdir(WORK)
    fd = os.open("program.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, source)
    os.close(fd)
    py = sys.executable
    os.execve(py, [py, "-I", "-B", f"{WORK}/program.py"], dict(os.environ))


def _init(source: bytes, limits: list[int], root: bool, report: int, status_fd: int) -> None:
    """PID 1 of the namespace: the mounts, then the program; its exit ends the namespace."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, what="parent-death signal")
    _prctl(PR_SET_DUMPABLE, 0, what="not dumpable")  # the program may not ptrace init
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if root:
        _reachable(sorted({os.path.realpath(sys.base_prefix),
                           os.path.dirname(os.path.abspath(sys.executable))}))  # fmt: skip
    _read_only_everywhere()
    owner = NOBODY if root else 0
    # Bounded: tmpfs pages are memory that RLIMIT_AS does not count.
    size = max(4 * limits[2], 1 << 20)
    _mount("tmpfs", WORK, "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=0700,uid={owner},gid={owner},size={size},nr_inodes=1024")  # fmt: skip
    pid = os.fork()
    if pid == 0:
        os.close(report)
        try:
            _program(source, limits, root)
        except (OSError, SetupError) as exc:
            os.write(status_fd, f"starting the program: {exc}".encode())
        os._exit(SETUP_FAILED)
    os.close(status_fd)
    _, status = os.waitpid(pid, 0)
    os.write(report, str(status).encode())


def _main(argv: list[str]) -> int:
    status_fd = int(argv[1])
    os.set_inheritable(status_fd, False)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_DUMPABLE, 0, what="not dumpable")
    with open(argv[2], "rb") as f:
        source = f.read()
    limits = [int(a) for a in argv[3:7]]
    root = os.geteuid() == 0

    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        if os.read(ready_r, 1) != b"1":
            os._exit(1)  # the unshare failed; the parent reports it
        try:
            _write_id_maps(os.getppid(), root)
        except OSError as exc:
            os.write(status_fd, f"writing the user namespace's id maps: {exc}".encode())
            os._exit(1)
        os._exit(0)
    os.close(ready_r)
    try:
        _check(_libc.unshare(ctypes.c_int(NAMESPACES)), "unshare(user, mount, pid, net)")
    except SetupError:
        os.close(ready_w)  # the helper reads EOF and leaves
        os.waitpid(helper, 0)
        raise
    os.write(ready_w, b"1")
    os.close(ready_w)
    if os.waitpid(helper, 0)[1] != 0:
        return SETUP_FAILED

    report_r, report_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    init = os.fork()  # PID 1 of the new PID namespace
    if init == 0:
        os.close(report_r)
        try:
            _init(source, limits, root, report_w, status_fd)
        except (OSError, SetupError) as exc:
            os.write(status_fd, f"building the sandbox: {exc}".encode())
            os._exit(SETUP_FAILED)
        os._exit(0)
    os.close(report_w)
    os.close(status_fd)
    # The evaluator's timeout: killing init kills every process in the namespace, and
    # waitpid below returns only once they are all gone.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    _, init_status = os.waitpid(init, 0)
    reported = os.read(report_r, 64)
    if not reported:  # init was killed, or could not build the sandbox
        if os.waitstatus_to_exitcode(init_status) == SETUP_FAILED:
            return SETUP_FAILED
        os.kill(os.getpid(), signal.SIGKILL)
    status = int(reported)
    if os.WIFSIGNALED(status):  # end the way the program did: SIGXCPU reads as "killed"
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    """Build the sandbox and run the program; see the module's docstring."""
    try:
        code = _main(sys.argv)
    except (OSError, SetupError, ValueError, IndexError) as exc:
        try:
            os.write(int(sys.argv[1]), f"building the sandbox: {exc}".encode())
        except (OSError, ValueError, IndexError):
            pass
        code = SETUP_FAILED
    os._exit(code)


if __name__ == "__main__":
    main()
