"""``llamalab chat``: an interactive conversation in the model's chat template."""

from __future__ import annotations

import argparse
import sys

from llamalab.cli.options import add_runtime_options, add_sampling_options, sampling_from_args
from llamalab.errors import LlamalabError

DESCRIPTION = (
    "An interactive multi-turn conversation in the model's chat template. /reset starts over, "
    "/exit leaves, Ctrl-C interrupts a reply."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_options(p)
    add_sampling_options(p)
    p.add_argument("--system", default=None, help="system message")


CHAT_HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply."


def run(args: argparse.Namespace) -> int:
    from llamalab.generation import Engine, Request
    from llamalab.runtime import load_runtime

    sampling = sampling_from_args(args)
    model, tokenizer = load_runtime(args.model, args.dtype)
    if tokenizer.chat_template is None:
        raise LlamalabError("this model has no chat template; use `llamalab generate` instead")
    # One cache row, kept between turns: each turn prefills only the new messages.
    engine = Engine(model, tokenizer, max_seq_len=args.ctx, progress=sys.stderr.isatty())
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = tokenizer.encode_chat(system + history)
            request = Request(prompt_ids, max_tokens=args.max_tokens, sampling=sampling)
            reply = _stream_reply(engine, request)
        except LlamalabError as exc:
            history.pop()
            print(f"llamalab: error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _stream_reply(engine, request) -> str:
    seq = None
    try:
        seq, event = engine.submit(request)
        sys.stdout.write(event.text)
        sys.stdout.flush()
        while not seq.finished:
            for _, event in engine.step():
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    finally:
        if seq is not None:
            engine.cancel(seq)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return seq.text if seq is not None else ""
