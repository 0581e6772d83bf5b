"""Llama 3's tokenizer: Meta's tiktoken ``tokenizer.model`` run by `tiktoken`.

The file holds only the 128,000 byte-level BPE ranks, one ``<base64 bytes> <rank>`` line
each; the split pattern and the 256 special tokens that follow them are fixed by Meta's
code, so they are restated here.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import tiktoken

from llamalab.errors import LlamalabError
from llamalab.tokenizer.base import SpecialTokens, Tokenizer, backend_failure, shown_token
from llamalab.tokenizer.bpe import LLAMA3_PATTERN
from llamalab.tokenizer.bytelevel import bytes_to_piece

NUM_RESERVED_SPECIAL_TOKENS = 256
# The named special tokens, in id order from 128000, as Meta's Llama 3.1+ tokenizer
# defines them; the rest of the 256 are <|reserved_special_token_N|>. (Llama 3.0 named
# fewer, but the ids of BOS, EOS, the header tokens and <|eot_id|> are the same.)
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Llama 3's 256 special tokens, numbered after the BPE ranks."""
    names = list(NAMED_SPECIAL_TOKENS)
    names += [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(names))
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def looks_like_tiktoken(head: bytes) -> bool:
    """Whether the start of a file is tiktoken's ``<base64> <rank>`` lines (not a protobuf)."""
    lines = head.split(b"\n")[:-1][:8]  # the last line may be cut off
    if not lines:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            return False
    return True


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file into ``{token bytes: rank}``.

    Refused: a token listed twice, two tokens of one rank, ranks with gaps, and a
    vocabulary without all 256 single bytes (byte-level BPE starts every word from its
    bytes; `tiktoken` panics on a byte it has no rank for).
    """
    ranks: dict[bytes, int] = {}
    line_of: dict[bytes, int] = {}
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise LlamalabError(f"{path}: cannot read tiktoken file: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            encoded, rank_text = line.split()
            token, rank = base64.b64decode(encoded, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise LlamalabError(f"{path}:{lineno}: not a '<base64> <rank>' line") from None
        first = line_of.setdefault(token, lineno)
        if first != lineno:
            raise LlamalabError(
                f"{path}:{lineno}: duplicate token {shown_token(token)} ({encoded}), "
                f"already on line {first} with rank {ranks[token]}"
            )
        ranks[token] = rank
    if not ranks:
        raise LlamalabError(f"{path}: the tiktoken file holds no tokens")
    if len(set(ranks.values())) != len(ranks):
        holders: dict[int, bytes] = {}
        for token, rank in ranks.items():
            other = holders.setdefault(rank, token)
            if other is not token:
                raise LlamalabError(
                    f"{path}: duplicate rank {rank}: tokens {shown_token(other)} (line "
                    f"{line_of[other]}) and {shown_token(token)} (line {line_of[token]})"
                )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamalabError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        listed = ", ".join(f"0x{b:02x}" for b in missing[:8]) + (
            ", ..." if len(missing) > 8 else ""
        )
        raise LlamalabError(
            f"{path}: {len(missing)} of the 256 single bytes are not tokens ({listed}); "
            "a byte-level BPE needs every byte as a token"
        )
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3's tiktoken vocabulary with its pattern and special tokens."""

    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        ranks = read_ranks(path)
        specials = llama3_special_tokens(len(ranks))
        try:
            self._enc = tiktoken.Encoding(
                name=f"llamalab:{path}",
                pat_str=LLAMA3_PATTERN,
                mergeable_ranks=ranks,
                special_tokens=specials,
            )
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{path}: tiktoken rejected the vocabulary") from None
        by_rank = sorted(ranks, key=ranks.__getitem__)
        n = len(ranks) + len(specials)
        token_bytes = by_rank + [name.encode("utf-8") for name in specials]
        # Pieces in the byte-level form Hugging Face and GGUF use for the same vocabulary.
        pieces = [bytes_to_piece(b) for b in by_rank] + list(specials)
        super().__init__(
            source=str(path),
            pieces=pieces,
            token_bytes=token_bytes,
            control_ids=range(len(ranks), n),
            special_tokens=SpecialTokens(special=specials),
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            add_bos=True,
            add_eos=False,
            extra_stop_ids=[specials["<|eom_id|>"], specials["<|eot_id|>"]],
        )
        self.mergeable_ranks = ranks

    @property
    def backend(self) -> tiktoken.Encoding:
        """The `tiktoken` encoding (for benchmarks and debugging)."""
        return self._enc

    def _encode_text(self, text: str) -> list[int]:
        # Meta's wrapper also cuts inputs at 400k characters and runs of 25k (non-)space
        # characters to dodge an old tiktoken stack overflow; current tiktoken needs no
        # such cut (10 MB encodes in one call), and cutting changes the ids at each cut,
        # so llamalab tokenizes the text whole, as llama.cpp and Hugging Face do.
        try:
            return self._enc.encode_ordinary(text)
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{self.source}: tiktoken failed to encode") from None
