"""GPT-2's byte ↔ printable-character table, used by every byte-level BPE vocabulary.

Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) store each token's bytes as a
string of printable characters: the 188 printable Latin-1 bytes stand for themselves and
the other 68 bytes (controls, space, ...) are mapped, in byte order, to U+0100 onwards. So
a space is ``Ġ`` (U+0120) and a newline ``Ċ`` (U+010A).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from itertools import accumulate


@cache
def byte_to_char() -> tuple[str, ...]:
    """The character that stands for each byte value 0..255."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    )
    table: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return tuple(table)


@cache
def char_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_char`."""
    return {c: b for b, c in enumerate(byte_to_char())}


def bytes_to_piece(data: bytes) -> str:
    """Bytes → the printable form a byte-level vocabulary stores."""
    table = byte_to_char()
    return "".join(table[b] for b in data)


@cache
def _latin1_table() -> dict[int, str]:
    """``str.translate`` table: each character of the byte table → the Latin-1 character
    of its byte, and each other character below U+0100 → its own UTF-8 bytes as Latin-1
    characters, so that ``piece.translate(t).encode("latin-1")`` is :func:`piece_to_bytes`
    for every piece whose characters are all below U+0144 (the table's last)."""
    out = {ord(c): chr(b) for b, c in enumerate(byte_to_char())}
    for code in range(256):
        if code not in out:
            out[code] = chr(code).encode("utf-8").decode("latin-1")
    return out


def pieces_to_bytes(pieces: Sequence[str]) -> list[bytes]:
    """:func:`piece_to_bytes` of every piece: one translation of them all, cut back into
    pieces (a vocabulary at every start), where each character stands for one byte."""
    table = _latin1_table()
    joined = "".join(pieces)
    try:
        data = joined.translate(table).encode("latin-1")
    except UnicodeEncodeError:  # a character past the table: piece by piece
        return [piece_to_bytes(p) for p in pieces]
    if len(data) != len(joined):  # a character that stands for two bytes: piece by piece
        return [piece_to_bytes(p) for p in pieces]
    ends = list(accumulate(map(len, pieces)))
    return list(map(data.__getitem__, map(slice, [0, *ends[:-1]], ends)))


def piece_to_bytes(piece: str) -> bytes:
    """A byte-level vocabulary entry → its bytes.

    A character outside the table (a malformed vocabulary) stands for its own UTF-8
    bytes rather than failing (a lone surrogate, which JSON can spell, for the bytes
    Python's ``surrogatepass`` gives it): decoding must not crash on one odd entry.
    """
    # One C-level pass for the usual piece (a whole vocabulary at start-up: 49k of them).
    try:
        return piece.translate(_latin1_table()).encode("latin-1")
    except UnicodeEncodeError:  # a character past the table: its UTF-8 bytes, below
        pass
    table = char_to_byte()
    out = bytearray()
    for ch in piece:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8", "surrogatepass")
        else:
            out.append(b)
    return bytes(out)
