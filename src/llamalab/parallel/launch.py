"""Commands on tensor-parallel ranks: ``torchrun --nproc_per_node N -m llamalab generate ...``.

Rank 0 (the leader) runs the command as one process would: it owns the tokenizer, the
sampling, the output and the progress bars. Every other rank (a follower) holds its
slices of the model and does what the leader tells it over a control channel, so that
every rank steps the model in lockstep:

- the leader's model is *mirrored*: each call of its ``forward``, ``setup_cache`` and
  ``clear_cache`` from outside the model first sends the call (tokens, cache view) to the
  followers, which make the same call on their own shards; the collectives inside the
  forward pass (DTensor's all-reduces and the logits' all-gather) then meet;
- objects that touch the KV cache directly (the evaluation's likelihood scorer copies
  cache rows) are *shared*: the followers build their own from the same arguments, and
  each call of their listed methods is sent the same way.

Calls made from inside a mirrored call are not sent again (each rank makes them itself).

The control channel is a gloo group of its own (also beside NCCL on GPUs), used by one
thread on the leader: it sends the calls in order and, when the leader is busy with
something else than a call (tokenizing an evaluation's items), a heartbeat every quarter
of the timeout, so that a follower tells a silent leader from a busy one. During a call
no heartbeat is sent: the followers are busy with the same call, and the collectives in
it carry the timeout.

Faults end the job with one clear error, never a silent hang:

- every rank compares a hash of the model file's identity at start-up (an all-gather):
  ranks holding different files, or one that cannot read it, are named;
- a load error (a degree that does not divide the heads, a GGUF block split) is agreed
  by every rank; rank 0 prints it, the others exit 1 without a word;
- a rank that dies makes its peers' next collective fail (gloo: the connection closes),
  one that hangs makes it time out after ``timeout`` seconds (the process groups' own
  timeout); a watchdog thread ends a rank whose wait on the control channel outlives
  that timeout by :data:`GRACE` seconds, in case a collective does not time out.
  The leader then prints one line and exits 1; a follower that loses the leader does too.

Nothing here imports torch at module level: the CLI imports this module to decide
whether it runs on ranks at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError

DEFAULT_TIMEOUT = 60.0  # seconds a collective or the control channel may wait
GRACE = 15.0  # the watchdog's margin over the process groups' own timeout
MIRRORED = ("forward", "setup_cache", "clear_cache")  # the model calls that are sent
IDENTITY_BYTES = 1 << 20  # bytes of a file's start and end hashed into its identity

_session: Session | None = None


class RanksLost(BaseException):
    """The ranks lost touch (one died or hangs). A BaseException: code that isolates a
    failing request (the generation engine) must not carry on after it."""


def world_size() -> int:
    """The number of ranks the launcher started (``$WORLD_SIZE``; 1 without one)."""
    return _env_int("WORLD_SIZE", 1, minimum=1)


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise LlamalabError(f"{name} must be a whole number, got {value!r}") from None
    if number < minimum:
        if minimum == 0:
            raise LlamalabError(f"{name} must not be negative, got {number}")
        raise LlamalabError(f"{name} must be at least {minimum}, got {number}")
    return number


def current() -> Session | None:
    """The session this process runs in as a tensor-parallel rank (None: one process)."""
    return _session


def start(
    *, timeout: float = DEFAULT_TIMEOUT, device: str | None = None, exact: bool = False
) -> Session:
    """Join the other ranks (``$RANK``, ``$MASTER_ADDR`` ... as torchrun sets them):
    NCCL for the model on GPUs, gloo on CPUs, and a gloo control channel. ``exact``: the
    model is split the exact way (``parallel/tensor.py``)."""
    global _session
    if _session is not None:
        raise LlamalabError("this process already runs as a tensor-parallel rank")
    if not timeout > 0:
        raise LlamalabError(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    _session = Session(timeout, device, exact)
    return _session


def file_identity(path: Path) -> str:
    """A hash of what makes a checkpoint itself, cheap to compute: for each file (a
    folder's, sorted), its name, size and first and last :data:`IDENTITY_BYTES` bytes
    (a GGUF file's header and tensor table, a safetensors header, and weights besides)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(IDENTITY_BYTES))
            if size > IDENTITY_BYTES:
                f.seek(max(IDENTITY_BYTES, size - IDENTITY_BYTES))
                digest.update(f.read(IDENTITY_BYTES))
    return digest.hexdigest()


def _packed_kernels_available() -> bool:
    from llamalab.quant.linear import fp16_kernel_available

    return fp16_kernel_available()


def _short(exc: BaseException) -> str:
    """A communication error in one line: gloo's message without its source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text


def _is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the ranks' communication (a peer gone or timed out)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection", "Timed out", "timed out")
    )


def _portable(value: Any, device=None) -> Any:
    """``value`` with every tensor copied to ``device`` (default: the CPU; a copy, since
    the caller may reuse its buffers before the message leaves), through lists, tuples,
    dicts and dataclasses (cache views); callables (progress callbacks) dropped."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to(device or "cpu", copy=device is None)
    if isinstance(value, list | tuple):
        return type(value)(_portable(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _portable(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _portable(getattr(value, f.name), device)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if callable(value):
        return None
    return value


class _Watchdog:
    """Ends the process when a guarded wait outlives its deadline (a hang that no
    collective's timeout caught)."""

    def __init__(self, seconds: float, report: Callable[[str], None]) -> None:
        self.seconds = seconds
        self.report = report
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._run, name="llamalab-tp-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        self._what, self._deadline = what, time.monotonic() + self.seconds
        try:
            yield
        finally:
            self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.report(f"{self._what}: no answer for {self.seconds:g} s (a rank hangs)")
                os._exit(1)


class Session:
    """This process's place among the tensor-parallel ranks (see the module)."""

    def __init__(self, timeout: float, device: str | None, exact: bool = False) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        self.timeout = timeout
        self.exact = exact
        self.world = world_size()
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", self.rank)
        self.local_world = _env_int("LOCAL_WORLD_SIZE", self.world)
        if not 0 <= self.rank < self.world:
            raise LlamalabError(f"RANK must be 0 to {self.world - 1}, got {self.rank}")
        if device == "cuda" and not torch.cuda.is_available():
            raise LlamalabError("--device cuda: this torch build sees no CUDA device")
        cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        wait = timedelta(seconds=timeout)
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=wait)
            self.control = dist.new_group(backend="gloo", timeout=wait)
        except (RuntimeError, ValueError) as exc:
            raise LlamalabError(
                f"rank {self.rank}: cannot join the other {self.world - 1} ranks: {_short(exc)}"
            ) from None
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.model = None
        self.objects: dict[str, Any] = {}
        self._depth = 0  # > 0 inside a mirrored call: nested calls are not sent again
        self._calls = threading.RLock()
        self._broken: str | None = None
        self._report_lock = threading.Lock()
        self._reported = False
        self.watchdog = _Watchdog(timeout + GRACE, self.report)
        if self.rank == 0:
            self._queue: queue.Queue = queue.Queue()
            self._sender = threading.Thread(
                target=self._send_loop, name="llamalab-tp-send", daemon=True
            )
            self._sender.start()

    # ------------------------------------------------------------------ both sides
    def report(self, message: str) -> None:
        """Print this rank's one error line (followers name themselves): only the first
        call prints. When the ranks lose touch, two threads (a model step and the control
        channel's sender) can each find out at once; the second waits for the first's
        line to be written, then says nothing."""
        who = "" if self.rank == 0 else f"rank {self.rank}: "
        with self._report_lock:
            if self._reported:
                return
            self._reported = True
            with contextlib.suppress(Exception):
                sys.stderr.write(f"llamalab: error: {who}{message}\n")
                sys.stderr.flush()

    def die(self, message: str) -> None:
        """Print ``message`` as this rank's one error line and end the process now: a
        broken process group can wait on the lost rank when it is left or destroyed."""
        self._broken = message
        self.report(message)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(1)

    def lost(self, exc: BaseException, during: str) -> RanksLost:
        """The error for a failed collective: the ranks cannot go on together."""
        self._broken = f"the ranks lost touch {during} ({_short(exc)}); every rank stops"
        return RanksLost(self._broken)

    def _agree(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it fails on any, raise one error on every rank
        (the same message where all failed alike, else the first failing rank's)."""
        import torch.distributed as dist

        result, error = None, None
        try:
            result = fn()
        except (LlamalabError, OSError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 (said on every rank rather than hanging)
            error = f"{type(exc).__name__}: {exc}"
        errors: list[str | None] = [None] * self.world
        try:
            dist.all_gather_object(errors, error)
        except Exception as exc:  # noqa: BLE001 (any failure here is the ranks')
            raise self.lost(exc, what) from None
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            if all(e == failed[0][1] for _, e in failed) and len(failed) == self.world:
                raise LlamalabError(failed[0][1])
            rank, message = failed[0]
            raise LlamalabError(f"rank {rank}: {message}")
        return result

    def _load(self, path: str, dtype: str, threads: int | None) -> Any:
        import torch

        from llamalab.parallel.loading import load_sharded

        def identity() -> str:
            try:
                return file_identity(Path(path))
            except OSError as exc:
                raise LlamalabError(f"cannot read {path}: {exc.strerror or exc}") from None

        # Every rank's hash, compared on every rank: the ranks must hold the same model.
        import torch.distributed as dist

        mine = self._agree("comparing the model files", identity)
        hashes: list[str | None] = [None] * self.world
        dist.all_gather_object(hashes, mine)
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            ranks = ", ".join(str(r) for r in differ)
            raise LlamalabError(
                f"the ranks hold different model files at {path}: rank {ranks} "
                f"{'differs' if len(differ) == 1 else 'differ'} from rank 0 (every rank "
                "must load the same checkpoint)"
            )
        n_threads = threads or max(1, (os.cpu_count() or 1) // self.local_world)
        if self.device.type == "cpu" and torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        if dtype == "float32" or self.device.type == "cpu":
            model_dtype = torch.float32
        else:
            model_dtype = torch.bfloat16
        # As in one process (runtime.py): --dtype auto on CPUs keeps the linear layers
        # packed, GGUF weights in their stored type; --dtype float32 is the float path.
        packed = dtype == "auto" and self.device.type == "cpu" and _packed_kernels_available()

        def load():
            return load_sharded(
                path, self.mesh, dtype=model_dtype, device=self.device, packed=packed,
                exact=self.exact,
            )  # fmt: skip

        self.model = self._agree("loading the model", load)
        self.objects["model"] = self.model
        return self.model

    # ------------------------------------------------------------------ the leader
    def _send_loop(self) -> None:
        import torch.distributed as dist

        beat = self.timeout / 4
        while True:
            try:
                message = self._queue.get(timeout=beat)
            except queue.Empty:
                if self._depth:
                    # Every rank is inside the same call: its collectives show that the
                    # ranks are alive, and a follower does not read this channel then.
                    continue
                message = ("beat",)
            try:
                dist.broadcast_object_list([message], src=0, group=self.control)
            except Exception as exc:  # noqa: BLE001 (a follower is gone)
                # Whatever rank 0 is doing (a server waiting for requests), it cannot go on.
                self.die(f"the ranks lost touch ({_short(exc)}); every rank stops")
            if message[0] == "stop":
                return

    def send(self, *message: Any) -> None:
        """Queue ``message`` for every follower (in order)."""
        if self._broken is not None:
            raise RanksLost(self._broken)
        self._queue.put(_portable(message))

    def load_runtime(self, path: Path, dtype: str, *, threads: int | None = None, announce=False):
        """The leader's ``(model, tokenizer)`` for the checkpoint at ``path``: the tokenizer
        here, the model split across every rank (each loading its slices of the same file)."""
        from llamalab.tokenizer import load_tokenizer

        if self.model is not None:
            raise LlamalabError(
                "tensor parallelism runs one model: a second one (--draft) is not available "
                "under torchrun"
            )
        tokenizer = load_tokenizer(path)
        if announce:
            kind = "NCCL" if self.device.type == "cuda" else "gloo"
            print(f"loading {path} on {self.world} ranks ({kind})", file=sys.stderr)
        self._depth += 1  # the followers load too: no heartbeat meanwhile
        try:
            self.send("load", str(path), dtype, threads)
            model = self._load(str(path), dtype, threads)
        finally:
            self._depth -= 1
        self._mirror(model, "model", MIRRORED)
        return model, tokenizer

    def share(self, obj: Any, factory: str, methods: tuple[str, ...], **kwargs: Any) -> Any:
        """Have every follower build ``factories[factory](model, **kwargs)`` (see
        :meth:`follow`) beside the leader's ``obj``, and send each call of ``methods``."""
        name = f"{factory}{len(self.objects)}"
        self.send("new", name, factory, kwargs)
        self._mirror(obj, name, methods)
        return obj

    def _mirror(self, obj: Any, name: str, methods: tuple[str, ...]) -> None:
        for method in methods:
            original = getattr(obj, method)

            def call(*args, _method=method, _original=original, **kwargs):
                # One call at a time (a server's threads take turns): the followers make
                # them in the order they are sent. Calls nested in one are not sent.
                with self._calls:
                    if self._depth:
                        return _original(*args, **kwargs)
                    self._depth += 1  # before the message leaves: no heartbeat after it
                    try:
                        self.send("call", name, _method, args, kwargs)
                        return _original(*args, **kwargs)
                    except Exception as exc:
                        if _is_comm_error(exc):
                            # From any thread (a server's engine thread): the job ends here.
                            self.die(str(self.lost(exc, "during a model step")))
                        raise
                    finally:
                        self._depth -= 1

            # An instance attribute: nn.Module.__call__ finds it before the class's forward.
            object.__setattr__(obj, method, call)

    def close(self, status: int, *, leave: bool = True) -> None:
        """Tell the followers the command ended (with ``status``) and leave the group
        (``leave=False``: a process about to end at once keeps it, see ``cli/distributed``)."""
        if self._broken is None:
            self._queue.put(("stop", status))
            with self.watchdog.guard("telling the other ranks to stop"):
                self._sender.join()
        if leave:
            self._leave()

    # ------------------------------------------------------------------ a follower
    def follow(self, factories: dict[str, Callable[..., Any]]) -> int:
        """Do what the leader sends until it stops, then end this process with the
        leader's exit status (1 where the ranks lost touch, 130 on an interrupt before
        the first message). Prints nothing but a lost leader's error."""
        import warnings

        import torch
        import torch.distributed as dist

        warnings.filterwarnings("ignore")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the rank's output goes nowhere)
        # torchrun passes SIGTERM and SIGINT to every rank: rank 0 decides (a server
        # drains first) and its stop message ends this loop; a lost rank 0 ends it too.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            box: list[Any] = [None]
            try:
                with self.watchdog.guard("waiting for rank 0"):
                    dist.broadcast_object_list(box, src=0, group=self.control)
            except Exception as exc:  # noqa: BLE001 (the leader is gone)
                self.die(f"lost rank 0 ({_short(exc)})")
            except KeyboardInterrupt:
                return 130
            kind, *rest = _portable(box[0], self.device)
            if kind == "beat":
                continue
            if kind == "stop":
                # Out at once, without leaving the group: gloo can abort a process whose
                # peers close their connections while it tears its own down.
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os._exit(int(rest[0]))
            try:
                with torch.inference_mode():  # the leader's calls all run without autograd
                    self._do(kind, rest, factories)
            except RanksLost:
                return 1
            except Exception as exc:  # noqa: BLE001 (the leader met the same; it reports)
                if _is_comm_error(exc):
                    self.die(str(self.lost(exc, "during a model step")))
            except KeyboardInterrupt:
                return 130

    def _do(self, kind: str, rest: list, factories: dict[str, Callable[..., Any]]) -> None:
        if kind == "load":
            self._load(*rest)
        elif kind == "new":
            name, factory, kwargs = rest
            self.objects[name] = factories[factory](self.model, **kwargs)
        elif kind == "call":
            name, method, args, kwargs = rest
            getattr(self.objects[name], method)(*args, **kwargs)
        else:
            raise LlamalabError(f"unknown message {kind!r} from rank 0")

    def _leave(self) -> None:
        import torch.distributed as dist

        global _session
        _session = None
        if self._broken is None:
            with contextlib.suppress(Exception), self.watchdog.guard("leaving the group"):
                dist.destroy_process_group()
