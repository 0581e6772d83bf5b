"""`llamalab <subcommand>`: the console command.

One module per subcommand (``cli/info.py``, ``cli/generate.py`` ...), each with
``add_arguments(parser)`` and ``run(args)``. Building the parser imports only those
small modules; each ``run`` imports the layers it needs when it runs, so
``llamalab --help`` stays fast and ``tokenize`` never loads the model code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (name, module, one-line help); the module's docstring is the command's description.
COMMANDS = (
    ("info", "info", "describe a checkpoint or preset"),
    ("convert", "convert", "convert a checkpoint between formats"),
    ("verify", "verify", "check a checkpoint's checksums and structure"),
    ("sign", "sign", "sign a checkpoint with a private key (model-signing)"),
    ("tokenize", "tokenize", "show the token ids and pieces of a text"),
    ("generate", "generate", "continue a prompt"),
    ("chat", "chat", "talk with a model"),
    ("serve", "serve", "serve an OpenAI-compatible API and a chat page"),
    ("tokenizer", "tokenizer", "train a SentencePiece tokenizer"),
    ("data", "data", "prepare token shards for training"),
    ("train", "train", "pretrain a model from a TOML config"),
    ("finetune", "finetune", "fine-tune a model (LoRA or full) on instruction data"),
    ("eval", "eval", "evaluate a model on benchmarks or perplexity"),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser; given ``argv``, only its command's options are
    built (each command's module is imported to build them: ``serve`` alone takes 0.1 s)."""
    from llamalab import __version__

    parser = argparse.ArgumentParser(
        prog="llamalab", description="Run, convert, train and evaluate LLaMA-family models."
    )
    parser.add_argument("--version", action="version", version=f"llamalab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The command is the first word that is not an option (no global option takes a value).
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, module_name, summary in COMMANDS:
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=summary)  # listed in --help; never parsed this time
            continue
        module = importlib.import_module(f"llamalab.cli.{module_name}")
        p = sub.add_parser(
            name,
            help=summary,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    from llamalab.errors import LlamalabError

    try:
        from llamalab.cli.distributed import run_command

        return run_command(args)  # args.func(args), on tensor-parallel ranks under torchrun
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
