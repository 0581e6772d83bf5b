"""`llamalab <subcommand>`: the console command.

Each subcommand is a small function that imports what it needs when it runs, so
`llamalab --help` and `llamalab tokenize` stay fast and never pull in the layers they
do not use.
"""

from __future__ import annotations

import argparse
import os
import sys

# OpenMP's default spin-wait makes two torch threads crawl whenever another process is
# busy on this kind of machine; passive waiting costs nothing measurable when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cmd_info(args: argparse.Namespace) -> int:
    from llamalab.info import describe, format_report

    report = describe(args.ref)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from llamalab.checkpoint.convert import convert

    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, shards=args.shards)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from llamalab.tokenizer.cli import run_tokenize

    return run_tokenize(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from llamalab.cli_generate import run_generate

    return run_generate(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from llamalab.cli_generate import run_chat

    return run_chat(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from llamalab.serve.main import run_serve

    return run_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamalab", description="Run, convert, train and evaluate LLaMA-family models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="describe a checkpoint or preset",
        description="Describe a checkpoint (GGUF file, Hugging Face folder, Meta folder) or a "
        "preset: format, architecture, parameter count, tensor types, tokenizer, memory needed.",
    )
    p.add_argument("ref", nargs="?", default=None, help="checkpoint path or preset name (default: the default model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats",
        description="Convert a checkpoint to a Hugging Face folder, a GGUF file or a Meta folder, "
        "tensor by tensor.",
    )
    p.add_argument("src", help="source checkpoint")
    p.add_argument("dst", help="destination path (folder for hf/meta, file for gguf)")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "meta"], help="target format")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["f32", "f16", "bf16", "q8_0"],
        help="tensor type to write (default: f32 for quantized sources, else the source's float type; q8_0 is GGUF only)",
    )
    p.add_argument("--shards", type=int, default=1, help="number of model-parallel shards (meta only)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text",
        description="Tokenize TEXT with a model's tokenizer and print ids and pieces.",
    )
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--model", default=None, help="checkpoint or tokenizer file (default: the default model)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and pieces")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument("--no-special", action="store_true", help="treat special-token text as plain text")
    p.set_defaults(func=_cmd_tokenize)

    from llamalab.cli_generate import add_sampling_arguments

    p = sub.add_parser(
        "generate",
        help="continue a prompt",
        description="Generate text from PROMPT (or stdin), streaming it to stdout. Special tokens "
        "written in the prompt are parsed.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop at this text (repeatable; never printed)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K", help="report each token's logprob and K alternatives (with --json)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "chat",
        help="talk with a model",
        description="An interactive multi-turn conversation in the model's chat template. "
        "/reset starts over, /exit leaves, Ctrl-C interrupts a reply.",
    )
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=_cmd_chat)

    from llamalab.serve.main import add_serve_arguments

    p = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API and a chat page",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI's API, "
        "streaming included) and a chat page at /, batching concurrent requests together.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llamalab.errors import LlamalabError

    try:
        return args.func(args)
    except LlamalabError as exc:
        print(f"llamalab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llamalab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llamalab generate ... | head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
