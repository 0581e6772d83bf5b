"""``llamalab tokenize``: show the ids and pieces of a text."""

from __future__ import annotations

import argparse
import json

from llamalab.tokenizer.load import load_tokenizer


def run_tokenize(args: argparse.Namespace) -> int:
    """Tokenize ``args.text`` with ``args.model``'s tokenizer (default model if None).

    With ``args.json`` print ``{"ids": [...], "pieces": [...]}``; otherwise a table of
    index, id, piece and the text each token decodes to. Returns the exit code.
    """
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, add_bos=False if args.no_bos else None, special=not args.no_special)
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
