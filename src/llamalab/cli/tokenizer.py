"""Train a SentencePiece tokenizer with the LLaMA paper's settings.

    llamalab tokenizer train --input corpus/ --vocab-size 8000 --output tok/

BPE, numbers split into digits, byte fallback for unknown UTF-8, no normalisation,
whitespace kept; <unk> 0, <s> 1, </s> 2. Every line of the input is one training
sentence. The folder gets tokenizer.model (usable wherever llamalab takes a tokenizer,
and carried into GGUF files by `llamalab convert`), tokenizer_config.json and
training.json (settings, inputs and their sha256).
"""

from __future__ import annotations

import argparse

from llamalab.cli.options import positive_int, thread_count

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a tokenizer on text files", description=__doc__)
    t.formatter_class = argparse.RawDescriptionHelpFormatter
    t.add_argument(
        "--input",
        nargs="+",
        action="extend",  # --input a --input b trains on both
        required=True,
        metavar="FILE_OR_DIR",
        help="text files or folders",
    )
    t.add_argument("--vocab-size", type=positive_int, required=True, help="pieces, 260 or more")
    t.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    t.add_argument(
        "--max-sentences",
        type=positive_int,
        default=5_000_000,
        help="lines sampled for training at most (default: %(default)s)",
    )
    t.add_argument(
        "--seed",
        type=int,  # its range is checked where it is used
        default=0,
        help="sampling seed, 0 to 2**32 - 1 (default: %(default)s)",
    )
    t.add_argument(
        "--threads", type=thread_count, default=None, help="at most 4 per CPU (default: every CPU)"
    )
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's log")


def run(args: argparse.Namespace) -> int:
    from llamalab.tokenizer.trainer import train_tokenizer

    path = train_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        max_sentences=args.max_sentences,
        seed=args.seed,
        threads=args.threads,
        verbose=args.verbose,
    )
    print(path)
    return 0
