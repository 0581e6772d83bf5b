"""``llamalab serve``: load a model, start the scheduler, run uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from llamalab.cli.options import add_runtime_options
from llamalab.errors import LlamalabError

API_KEY_ENV = "LLAMALAB_API_KEY"
DESCRIPTION = (
    "Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI's API, streaming "
    "included) and a chat page at /, batching concurrent requests together."
)


def model_id_for(path: Path) -> str:
    """The name clients use for the model: the file name without ``.gguf``, or the folder name."""
    return path.stem if path.is_file() else path.name


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_options(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; unset = no key)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="requests decoded together; each holds a KV-cache row (default: %(default)s)",
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
        import uvicorn
    except ImportError as exc:
        raise LlamalabError(
            f"`llamalab serve` needs {exc.name}: pip install 'llamalab[serve]'"
        ) from exc

    from llamalab.generation import Engine
    from llamalab.runtime import load_runtime, resolve_model_ref
    from llamalab.serve.app import create_app
    from llamalab.serve.scheduler import Scheduler

    if args.max_batch < 1:
        raise LlamalabError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.ctx < 2:
        raise LlamalabError(f"--ctx must be at least 2, got {args.ctx}")
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"llamalab serve: warning: listening on {args.host} without --api-key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    model, tokenizer = load_runtime(args.model, args.dtype)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_seq_len=args.ctx)
    app = create_app(
        Scheduler(engine),
        model_id=model_id_for(resolve_model_ref(args.model)),
        api_key=args.api_key,
    )
    # One process, one event loop: the scheduler thread does the heavy work.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    return 0
