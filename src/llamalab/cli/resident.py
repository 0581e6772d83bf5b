"""When ``generate`` and ``chat`` hand their work to a running ``llamalab serve``.

As with ``ollama run``, a model held by a server answers a command at once: the command
then loads nothing, imports no torch, and streams the server's reply. The rules:

* ``--server URL`` uses that server, or fails with one error that says why (nothing
  answers, another model, other settings).
* Otherwise a server at ``$LLAMALAB_SERVER`` (default ``http://127.0.0.1:8000``) is used
  only if it holds the same model file (by content fingerprint), runs it with the same
  ``--dtype`` and ``--device``, and its context holds the command's ``--ctx``; if not,
  or if nothing answers within 0.1 s, the command runs the model itself.
* ``--no-server`` or ``LLAMALAB_NO_SERVER=1`` never looks for one.
* ``--threads`` and ``--compile`` are a server's own settings: given, they mean "run it
  here", so no server is looked for; with ``--server`` they are an error.

Replies are the same as the command's own: the server runs the same engine with the
same sampling, seed, stop strings, grammar and context (see ``llamalab.serve.native``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from llamalab.client import (
    API_KEY_ENV,
    DEFAULT_SERVER,
    NO_SERVER_ENV,
    SERVER_ENV,
    Address,
    Server,
    ServerUnreachable,
    probe,
    same_model,
)
from llamalab.errors import LlamalabError


def add_server_options(p: argparse.ArgumentParser) -> None:
    """``--server URL`` and ``--no-server``."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="generate with the `llamalab serve` at URL (it must hold the same model); "
        f"default: use the one at ${SERVER_ENV} or {DEFAULT_SERVER} if it holds the same "
        "model, else run the model here",
    )
    group.add_argument(
        "--no-server",
        action="store_true",
        help=f"always run the model in this process; never look for a server "
        f"({NO_SERVER_ENV}=1 does the same)",
    )


def _opted_out() -> bool:
    return os.environ.get(NO_SERVER_ENV, "") not in ("", "0")


def find_server(args: argparse.Namespace) -> Server | None:
    """The server to hand this command to, or None to run the model in this process.

    With ``--server`` every reason it cannot be used is a :class:`LlamalabError`;
    without, the same reasons quietly mean "run here".
    """
    if args.no_server:
        return None
    explicit = args.server is not None
    if not explicit and _opted_out():
        return None
    url = args.server if explicit else (os.environ.get(SERVER_ENV) or DEFAULT_SERVER)
    address = Address.parse(url)

    def refuse(reason: str) -> None:
        if explicit:
            raise LlamalabError(f"--server {address.url}: {reason}")

    given = (("--threads", args.threads), ("--compile", args.compile))
    local = [flag for flag, value in given if value is not None]
    if local:
        # Checked before probing: a command that asks for its own run never waits on one.
        return refuse(
            f"{' and '.join(local)} {'is' if len(local) == 1 else 'are'} set when the server "
            "starts; leave it out, or use --no-server to run the model here"
        )
    if getattr(args, "draft", None) is not None:
        # A draft model is loaded by the process that decodes: a server drafts with its
        # own --draft. Prompt lookup's options travel with the request (request_body).
        return refuse("--draft is not sent to a server; leave it out, or use --no-server")
    if getattr(args, "lora", None):
        # The adapters are put on the model this process loads; a server runs its own.
        return refuse("--lora is not sent to a server; leave it out, or use --no-server")
    try:
        report = probe(address.url)
    except ServerUnreachable as exc:
        if explicit:
            raise LlamalabError(str(exc)) from None
        return None
    info: dict[str, Any] = report["llamalab"]
    from llamalab.runtime import resolve_model_ref

    try:
        path = resolve_model_ref(args.model)
        same = same_model(info, path)
    except LlamalabError:
        if explicit:
            raise
        return None  # running here will say what is wrong with the model
    if not same:
        return refuse(
            f"it serves {info.get('model_path')!r} ({report.get('model')}), "
            f"not the model {str(path)!r}"
        )
    for option in ("dtype", "device"):
        if info.get(option) != getattr(args, option):
            return refuse(
                f"it runs the model with --{option} {info.get(option)}, "
                f"not --{option} {getattr(args, option)}"
            )
    context = min(args.ctx, int(info.get("model_context") or args.ctx))
    if context > int(info.get("context") or 0):
        return refuse(f"its context holds {info.get('context')} tokens, fewer than --ctx {context}")
    if info.get("api_key") and not os.environ.get(API_KEY_ENV):
        return refuse(f"it needs an API key: set {API_KEY_ENV}")
    return Server(address.url, info)


def request_body(
    args: argparse.Namespace, sampling: Any, grammar: Any, stops: Sequence[str] = ()
) -> dict[str, Any]:
    """The generation options of a command, as ``/llamalab/generate`` takes them."""
    body: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "ctx": args.ctx,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "logit_bias": {str(i): b for i, b in sampling.logit_bias_pairs},
        "seed": sampling.seed,
        "stop": list(stops),
    }
    if grammar is not None:
        body["json_schema" if grammar.kind == "json_schema" else "grammar"] = grammar.text
    # Prompt lookup as the command says; what it leaves out is the server's default. The
    # reply is the same either way, only its speed differs.
    lookup = getattr(args, "lookup", None)
    if lookup is not None:
        body["lookup"] = lookup
    for option in ("lookup_ngram", "draft_max"):
        if getattr(args, option, None) is not None:
            body[option] = getattr(args, option)
    return body


def read_grammar(args: argparse.Namespace) -> Any:
    """The grammar file of ``--json-schema`` or ``--grammar``, read and parsed but not
    compiled: the server compiles it (and says what is wrong with it)."""
    from llamalab.generation.grammar import Grammar

    if args.json_schema is not None:
        return Grammar.from_file(args.json_schema, "json_schema")
    if args.grammar is not None:
        return Grammar.from_file(args.grammar, "grammar")
    return None


def grammar_error(exc: LlamalabError, args: argparse.Namespace) -> LlamalabError:
    """The server's "grammar: ..." as the command's own "FILE: ..."."""
    message = str(exc)
    for field in ("json_schema: ", "grammar: "):
        if message.startswith(field):
            return LlamalabError(f"{args.json_schema or args.grammar}: {message[len(field) :]}")
    return exc


class Stream:
    """One streamed reply: its events, and what the command prints from them."""

    def __init__(self, server: Server, body: Mapping[str, Any]) -> None:
        self.server = server
        self.prompt_ids: list[int] = []
        self.events: list[dict[str, Any]] = []  # the token events, as the engine made them
        self.final: dict[str, Any] | None = None
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.last_token_at: float | None = None
        self._events = server.generate(body)

    def __iter__(self):
        """Yield each piece of text as it comes."""
        for event in self._events:
            if "prompt_ids" in event:
                self.prompt_ids = list(event["prompt_ids"])
            elif event.get("done"):
                self.final = event
            else:
                if event.get("token_id") is not None:
                    now = time.perf_counter()
                    if self.first_token_s is None:
                        self.first_token_s = now - self.started
                    self.last_token_at = now
                self.events.append(event)
                yield event.get("text", "")

    def close(self) -> None:
        """Stop listening: the server cancels the generation."""
        self._events.close()

    @property
    def tokens(self) -> int:
        return sum(1 for e in self.events if e.get("token_id") is not None)

    def timing(self) -> dict[str, Any]:
        """The engine's timing, with the time to the first token as this command saw it
        (request sent to token received: prefill plus the round trip)."""
        timing = dict(self.final["timing"]) if self.final else {}
        if self.first_token_s is not None:
            timing["time_to_first_token_s"] = self.first_token_s
        if "isa" in self.server.info:
            timing["isa"] = self.server.info["isa"]  # the server's kernels ran the reply
        return timing

    def logprobs(self) -> list[dict[str, Any]]:
        """``--json``'s logprobs: one entry per sampled token, as the command builds them."""
        return [
            {
                "id": e["token_id"],
                "token": e.get("token", ""),
                "logprob": e.get("logprob"),
                "top_logprobs": e.get("top_logprobs", []),
            }
            for e in self.events
            if e.get("token_id") is not None
        ]
