"""Prepare token shards for training.

    llamalab data prepare --tokenizer tok/ --out data/ books=texts/books code='src/**/*.go'

Each NAME=PATH source (a file, a folder searched recursively, or a glob) becomes
NAME.bin: its tokens as uint16 (uint32 for vocabularies over 65,536), each document
written as BOS, its tokens, EOS. A document is a file; files over --doc-chars
characters are cut at the next blank line. manifest.json records the sources, their
token counts, the tokenizer's sha256 and every input's sha256; the tokenizer itself is
copied into tokenizer/. Files are tokenized in parallel processes.
"""

from __future__ import annotations

import argparse

from llamalab.cli.options import positive_int, thread_count

DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = sub.add_parser("prepare", help="tokenize sources into shards", description=__doc__)
    d.formatter_class = argparse.RawDescriptionHelpFormatter
    d.add_argument("sources", nargs="+", metavar="NAME=PATH", help="named sources")
    d.add_argument("--tokenizer", required=True, metavar="REF", help="tokenizer file or folder")
    d.add_argument("--out", required=True, metavar="DIR", help="output folder")
    d.add_argument(
        "--workers",
        type=thread_count,
        default=None,
        help="processes, at most 4 per CPU (default: every CPU)",
    )
    d.add_argument(
        "--doc-chars",
        type=positive_int,
        default=1 << 20,
        help="cut files longer than this at a blank line (default: %(default)s)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    from llamalab.data import parse_sources, prepare

    manifest = prepare(
        parse_sources(args.sources),
        args.tokenizer,
        args.out,
        workers=args.workers,
        doc_chars=args.doc_chars,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    for name, info in manifest["sources"].items():
        print(f"{name}: {info['tokens']:,} tokens, {info['documents']:,} documents")
    print(f"{args.out}: {manifest['total_tokens']:,} tokens ({manifest['dtype']})")
    return 0
