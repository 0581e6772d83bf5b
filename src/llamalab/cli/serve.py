"""``llamalab serve``: load a model, start the scheduler, run uvicorn.

Two things here are about uvicorn rather than the API. A connection must send its
request headers within ``--header-timeout`` seconds (uvicorn itself waits forever for a
connection that sends nothing, or sends a byte now and then). And SIGTERM drains before
it stops: new requests get 503, running ones get ``--shutdown-grace`` seconds, and what
is left ends with an error event; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from llamalab.cli.distributed import add_distributed_options
from llamalab.cli.options import (
    add_lookup_options,
    add_runtime_options,
    load_runtime_from_args,
    lookup_from_args,
    positive_int,
)
from llamalab.errors import LlamalabError

log = logging.getLogger("llamalab.serve")

API_KEY_ENV = "LLAMALAB_API_KEY"
MAX_ALIAS_CHARS = 256
DESCRIPTION = (
    "Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI's API, streaming "
    "included) and a chat page at /, batching concurrent requests together."
)


def model_id_for(path: Path) -> str:
    """The name clients use for the model: the file name without ``.gguf``, or the folder name."""
    return path.stem if path.is_file() else path.name


def _served_adapters(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """``[(name, path, scale), ...]`` of ``--lora [NAME=]PATH[:SCALE]``, checked before the load."""
    from llamalab.cli.options import lora_from_args

    out = []
    for text in args.lora:
        name, sep, rest = text.partition("=")
        if not sep or not name or "/" in name or os.path.exists(text):
            name, rest = "", text
        ((path, scale),) = lora_from_args(argparse.Namespace(lora=[rest]))
        if not name:
            where = Path(path).resolve()
            name = where.parent.name if where.stem == "adapter" else where.stem
        if not (0 < len(name) <= 64 and name.isprintable() and " " not in name):
            raise LlamalabError(f"--lora {text}: NAME must be 1 to 64 printable characters")
        out.append((name, path, scale))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_options(p)
    # The defaults of requests that do not set lookup, lookup_ngram or draft_max.
    add_lookup_options(p)
    add_distributed_options(p)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[NAME=]PATH[:SCALE]",
        help="serve this LoRA adapter (a PEFT folder or a GGUF adapter) beside the model, its "
        "update times SCALE; a request picks it with model MODEL:NAME (NAME: the file or "
        "folder name, or out_dir's for a finetune run's adapter); repeatable",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* "
        f"(default: ${API_KEY_ENV}; unset = no key)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="requests decoded together; each holds a KV-cache row (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait for a free batch row; more get 503 (default: %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=4 * 1024 * 1024,
        help="largest request body; larger ones get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send its request headers (default: %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds running requests get to finish (default: %(default)s)",
    )
    p.add_argument(
        "--alias",
        metavar="NAME",
        help="the model's name for clients: /v1/models lists it and requests name it "
        "(default: the model file's name without .gguf)",
    )
    p.add_argument(
        "--grammar-timeout",
        type=float,
        default=10.0,
        help="seconds a grammar or JSON schema may take to compile; longer ones get 400 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--grammar-workers",
        type=int,
        default=2,
        help="processes that compile grammars at once (default: %(default)s)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="without --api-key, also accept this Host header (repeatable; localhost, "
        "127.0.0.1, [::1] and the --host address always work)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default: %(default)s)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (imported by the app; checked here for a clear message)
        import prometheus_client  # noqa: F401  (likewise: the app's /metrics)
        import uvicorn
    except ImportError as exc:
        raise LlamalabError(
            f"`llamalab serve` needs {exc.name}: pip install 'llamalab[serve]'"
        ) from exc

    from llamalab.generation import Engine
    from llamalab.runtime import resolve_model_ref
    from llamalab.serve.app import Limits, create_app
    from llamalab.serve.scheduler import EngineThread, Scheduler

    if args.max_batch < 1:
        raise LlamalabError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise LlamalabError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.grammar_workers < 1:
        raise LlamalabError(f"--grammar-workers must be at least 1, got {args.grammar_workers}")
    alias = args.alias
    if alias is not None and not (0 < len(alias) <= MAX_ALIAS_CHARS and alias.isprintable()):
        raise LlamalabError(
            f"--alias must be 1 to {MAX_ALIAS_CHARS} printable characters, got {alias!r}"
        )
    for name in ("header_timeout", "shutdown_grace", "grammar_timeout"):
        if not getattr(args, name) > 0:
            flag = "--" + name.replace("_", "-")
            raise LlamalabError(f"{flag} must be a positive number, got {getattr(args, name)}")
    if args.ctx < 2:
        raise LlamalabError(f"--ctx must be at least 2, got {args.ctx}")
    lookup = lookup_from_args(args)
    adapters = _served_adapters(args)
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"llamalab serve: warning: listening on {args.host} without --api-key; "
            "anyone who can reach it can use it",
            file=sys.stderr,
        )
    _configure_logging(args.log_level)

    def build() -> Engine:
        model, tokenizer = load_runtime_from_args(args, compile_by_default=True)
        if adapters:
            from llamalab.train.lora import serve_adapters

            serve_adapters(model, adapters)  # chosen per request, in the same batch
        draft = draft_tokenizer = None
        if args.draft is not None:
            from llamalab.runtime import load_runtime

            # Used by requests that speculate while they decode alone (see Engine).
            draft, draft_tokenizer = load_runtime(args.draft, args.dtype, device=args.device)
        engine = Engine(
            model,
            tokenizer,
            max_batch=args.max_batch,
            max_seq_len=args.ctx,
            draft=draft,
            draft_tokenizer=draft_tokenizer,
        )
        if model.decode_path is not None and model.decode_path.compiles:
            print(
                "llamalab serve: compiling the decode step (seconds; later starts reuse the code)",
                file=sys.stderr,
            )
            engine.warm_up()
        return engine

    from llamalab.client import model_identity

    model_path = resolve_model_ref(args.model)
    model_id = alias or model_id_for(model_path)
    # Taken before the load, so that a file changed meanwhile cannot pass for the loaded one.
    # Reported in /health: `llamalab generate` uses this server only for the same model,
    # run the same way.
    try:
        identity = {**model_identity(model_path), "dtype": args.dtype, "device": args.device}
    except LlamalabError:
        identity = None  # the load below names what is wrong with the model

    # Loading, warming up and every step run on one thread (see EngineThread).
    engine_thread = EngineThread()
    engine = engine_thread.call(build)
    engine.grammars.configure(
        timeout=args.grammar_timeout,
        workers=args.grammar_workers,
        # Each worker has a few compiles waiting for it; more get 503.
        max_pending=4 * args.grammar_workers,
    )
    # Without a key, the Host check keeps web pages that rebind their name to this
    # address out; the address the server listens on is one more name for it.
    allowed_hosts = None if args.api_key else [_bracketed(args.host), *args.allow_host]
    app = create_app(
        Scheduler(engine, thread=engine_thread),
        model_id=model_id,
        api_key=args.api_key,
        limits=Limits(max_body_bytes=args.max_body_bytes, max_queue=args.max_queue),
        allowed_hosts=allowed_hosts,
        identity=identity,
        lookup=lookup,
        adapters=[name for name, _, _ in adapters],
    )
    from llamalab.serve.native import router as native_router

    app.include_router(native_router)  # /llamalab/*: what `generate` and `chat` ask a server
    where = f"http://{_bracketed(args.host)}:{args.port}"
    print(
        f"llamalab serve: {model_id} at {where}/v1 "
        f"(chat page at {where}/), context {engine.max_seq_len} tokens, "
        f"{args.max_batch} requests at a time, API key {'required' if args.api_key else 'off'}",
        file=sys.stderr,
    )
    # One process, one event loop: the scheduler thread does the heavy work.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=_header_timeout_protocol(args.header_timeout),
        # Idle keep-alive connections close sooner than a slow client's headers time out.
        timeout_keep_alive=min(5.0, args.header_timeout),
        # After the drain every response has ended; this only bounds the last flush.
        timeout_graceful_shutdown=5,
    )
    _draining_server_class()(config, app=app, grace=args.shutdown_grace).run()
    return 0


def _configure_logging(level: str) -> None:
    """Send the server's own log (one line per request at info) to stderr at ``level``.

    uvicorn configures only its own loggers; without a handler here, Python would print
    ``llamalab.serve``'s warnings and drop everything below them.
    """
    log.setLevel(level.upper())
    if log.handlers:  # run() twice in one process: one handler is enough
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # the handler above already writes it; no second copy


def _bracketed(host: str) -> str:
    """An IPv6 address as a Host header spells it: ``::1`` → ``[::1]``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _header_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection that takes too long to send headers.

    uvicorn times out an idle keep-alive connection only, and resets even that timer on
    every byte, so a client that opens a connection and sends nothing (or a byte now and
    then) would hold it forever. Here a timer runs whenever the connection waits for a
    request: from the connection's start and again after each response. If it fires
    while no request has arrived, the connection closes.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = self.loop.call_later(timeout, self._header_timeout)

        def _header_timeout(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, with a first SIGTERM or SIGINT that drains before stopping."""

        def __init__(self, config: uvicorn.Config, *, app: Any, grace: float) -> None:
            super().__init__(config)
            self.app = app
            self.grace = grace
            self._draining = False
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_task: asyncio.Task[None] | None = None

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._draining or self._loop is None or self.should_exit:
                super().handle_exit(sig, frame)  # a second signal: stop now
                return
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain, sig)

        def _start_drain(self, sig: int) -> None:
            self._drain_task = asyncio.ensure_future(self._drain(sig))

        async def _drain(self, sig: int) -> None:
            from llamalab.serve.app import drain

            log.warning("%s: draining for up to %.0f s", signal.Signals(sig).name, self.grace)
            try:
                await drain(self.app, self.grace)
            except Exception:
                log.exception("draining failed; stopping anyway")
            super().handle_exit(sig, None)

    return DrainingServer
