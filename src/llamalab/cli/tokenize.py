"""``llamalab tokenize``: show the ids and pieces of a text."""

from __future__ import annotations

import argparse
import json
import sys

from llamalab.cli.options import add_model_option, check_text_argument, read_text_stdin

DESCRIPTION = "Tokenize TEXT (or stdin) with a model's tokenizer and print ids and pieces."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "text", nargs="?", default=None, help="the text to tokenize (default: read stdin)"
    )
    add_model_option(p, help="checkpoint or tokenizer file (default: the default model)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and pieces")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    p.add_argument(
        "--no-special", action="store_true", help="treat special-token text as plain text"
    )


def run(args: argparse.Namespace) -> int:
    """Tokenize the text with ``args.model``'s tokenizer (default model if None).

    With ``args.json`` print ``{"ids": [...], "pieces": [...]}``; otherwise a table of
    index, id, piece and the text each token decodes to.
    """
    from llamalab.errors import LlamalabError
    from llamalab.files import refuse_special
    from llamalab.tokenizer.load import load_tokenizer

    if args.text is not None:
        text = check_text_argument(args.text, "text")
    elif sys.stdin.isatty():
        raise LlamalabError("no text: pass it as an argument or on stdin")
    else:
        text = read_text_stdin("text")
    if args.model is not None:
        refuse_special(args.model)  # a FIFO or a device: say so
    tok = load_tokenizer(args.model)
    ids = tok.encode(text, add_bos=False if args.no_bos else None, special=not args.no_special)
    pieces = [tok.id_to_piece(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
        return 0
    print(f"{len(ids)} tokens ({tok.kind}, {tok.source})")
    width = max((len(str(i)) for i in ids), default=1)
    for n, (i, piece) in enumerate(zip(ids, pieces, strict=True)):
        # repr() of the decoded bytes shows spaces, newlines and partial UTF-8 unambiguously.
        shown = tok.token_bytes(i).decode("utf-8", errors="backslashreplace")
        print(f"{n:>5}  {i:>{width}}  {piece!r:<24} {shown!r}")
    return 0
