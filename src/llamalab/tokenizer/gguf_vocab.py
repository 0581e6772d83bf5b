"""Write a checkpoint's tokenizer into a GGUF file being written (for the converter).

The keys are the ones llama.cpp reads (``tokenizer.ggml.*`` and
``tokenizer.chat_template``):

- a GGUF source: its tokenizer keys are copied unchanged, with their original types;
- SentencePiece (``tokenizer.model``): ``model=llama``, pieces, scores and types;
- Llama 3's tiktoken file: ``model=gpt2``, ``pre=llama-bpe``, the tokens in byte-level
  form and the merges recovered from the ranks;
- a byte-level ``tokenizer.json``: ``model=gpt2``, its tokens and merges, and the
  ``pre`` name recognised from the structure of its pre-tokenizer (never from a hash).

Reading a GGUF vocabulary back is ``load_tokenizer``'s (``tokenizer.load``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf

from llamalab.errors import LlamalabError
from llamalab.gguf.header import is_gguf, read_gguf_metadata
from llamalab.tokenizer.base import Tokenizer
from llamalab.tokenizer.bpe import GPT2_PATTERN, LLAMA3_PATTERN, HFJsonTokenizer
from llamalab.tokenizer.bytelevel import bytes_to_piece
from llamalab.tokenizer.chat import BUILTIN_TEMPLATES
from llamalab.tokenizer.load import load_tokenizer
from llamalab.tokenizer.spm import (
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SentencePieceTokenizer,
)
from llamalab.tokenizer.tiktoken_llama3 import TiktokenTokenizer

T = gguf.GGUFValueType


def add_vocab_to_gguf(writer: gguf.GGUFWriter, ref: str | os.PathLike[str]) -> bool:
    """Add the tokenizer of checkpoint ``ref`` to a GGUF file being written.

    Args:
        writer: the open writer (before its header is written).
        ref: a GGUF file, a Hugging Face folder or a Meta folder.

    Returns:
        False when ``ref`` carries no tokenizer (nothing is written), True otherwise.

    Raises:
        LlamalabError: the tokenizer is there but cannot be exported.
    """
    path = Path(ref)
    if path.is_file() and is_gguf(path):
        return _copy_gguf_keys(writer, path)
    if path.is_dir():
        spm_file = path / "tokenizer.model"
        if not (path / "tokenizer.json").is_file() and not spm_file.is_file():
            return False
        tok = load_tokenizer(path)
        if (
            isinstance(tok, HFJsonTokenizer)
            and tok.kind == "bpe"
            and _hf_is_spm_style(tok)
            and spm_file.is_file()
        ):
            # Llama 2's Hugging Face folders carry both; the SentencePiece model has the scores.
            from llamalab.tokenizer.load import attach_chat_template

            template = tok.chat_template
            tok = load_tokenizer(spm_file)
            if template is not None:
                attach_chat_template(tok, template.source, template.name)
    elif path.is_file():
        tok = load_tokenizer(path)
    else:
        raise LlamalabError(f"{path}: no such file or folder")
    write_tokenizer(writer, tok)
    return True


def _copy_gguf_keys(writer: gguf.GGUFWriter, path: Path) -> bool:
    types: dict[str, tuple[int, int | None]] = {}
    meta = read_gguf_metadata(path, types)
    if "tokenizer.ggml.model" not in meta:
        return False
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            continue
        vtype, sub = types[key]
        if vtype == T.ARRAY:
            if sub is None:
                raise LlamalabError(f"{path}: cannot tell the element type of {key}")
            writer.add_key_value(
                key, list(value.tolist() if hasattr(value, "tolist") else value), T.ARRAY, T(sub)
            )
        else:
            writer.add_key_value(key, value, T(vtype))
    return True


def _hf_is_spm_style(tok: HFJsonTokenizer) -> bool:
    return bool(tok._dummy_prefix) or any(
        p.startswith("<0x") and p.endswith(">") for p in tok._pieces[:300]
    )


def write_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer) -> None:
    """Write a loaded tokenizer's vocabulary, special ids and chat template."""
    if isinstance(tok, SentencePieceTokenizer):
        m = tok.model
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(m.pieces)
        writer.add_token_scores(m.scores)
        writer.add_token_types(m.types)
        writer.add_add_space_prefix(m.add_dummy_prefix)
        writer.add_remove_extra_whitespaces(m.remove_extra_whitespaces)
        unk = next((i for i, t in enumerate(m.types) if t == UNKNOWN), None)
        if unk is not None:
            writer.add_unk_token_id(unk)
    elif isinstance(tok, TiktokenTokenizer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tok._pieces)
        writer.add_token_types(
            [CONTROL if tok.is_special(i) else NORMAL for i in range(tok.vocab_size)]
        )
        writer.add_token_merges(tiktoken_merges(tok.mergeable_ranks))
    elif isinstance(tok, HFJsonTokenizer):
        _write_hf_bpe(writer, tok)
    else:
        raise LlamalabError(f"{tok.source}: cannot export a {type(tok).__name__} to GGUF")
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    eot = tok.piece_to_id("<|eot_id|>")
    if eot is not None and tok.is_special(eot):
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(tok.add_bos_default)
    writer.add_add_eos_token(tok.add_eos_default)
    template = tok.chat_template
    if template is not None and template.name not in BUILTIN_TEMPLATES:
        writer.add_chat_template(template.source)


def _write_hf_bpe(writer: gguf.GGUFWriter, tok: HFJsonTokenizer) -> None:
    raw = json.loads(tok.backend.to_str())
    model = raw.get("model", {})
    if model.get("type") != "BPE" or _hf_is_spm_style(tok):
        raise LlamalabError(
            f"{tok.source}: only byte-level BPE tokenizer.json files export to GGUF "
            "(for SentencePiece-style ones, keep tokenizer.model next to it)"
        )
    added = tok.backend.get_added_tokens_decoder()
    pieces, types = [], []
    for i, p in enumerate(tok._pieces):
        if i in added:
            types.append(CONTROL if added[i].special else USER_DEFINED)
            pieces.append(p)
        elif p:
            types.append(NORMAL)
            pieces.append(p)
        else:  # a hole in the id range: llama.cpp's converters fill it the same way
            types.append(UNUSED)
            pieces.append(f"[PAD{i}]")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(hf_pre_tokenizer_name(raw.get("pre_tokenizer"), tok.source))
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _pre_tokenizer_steps(pre: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """A tokenizer.json pre_tokenizer as (kind, what matters) steps."""
    steps: list[tuple[str, Any]] = []
    for step in (pre or {}).get("pretokenizers", [pre] if pre else []):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            steps.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif kind == "ByteLevel":
            steps.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            steps.append(("Digits", bool(step.get("individual_digits", False))))
        else:
            steps.append((kind, None))
    return steps


def hf_pre_tokenizer_name(pre: Mapping[str, Any] | None, source: str) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name of a tokenizer.json pre-tokenizer, by structure."""
    steps = _pre_tokenizer_steps(pre)
    if steps == [("Split", LLAMA3_PATTERN), ("ByteLevel", False)]:
        return "llama-bpe"
    if steps == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    if steps in ([("ByteLevel", True)], [("Split", GPT2_PATTERN), ("ByteLevel", False)]):
        return "gpt-2"
    # The pipelines llamalab itself writes (a GGUF converted to a folder) spell each
    # llama.cpp family as its regex splits.
    for family, name in _FAMILY_NAMES.items():
        if steps == _pre_tokenizer_steps(_family_pre_tokenizer_json(family)):
            return name
    raise LlamalabError(
        f"{source}: no llama.cpp pre-tokenizer matches this tokenizer.json's pre_tokenizer {steps}"
    )


# llama.cpp's name for each pre-tokenizer family (any name of a family tokenizes alike).
_FAMILY_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "digits": "smollm", "default": "default"}


def _family_pre_tokenizer_json(family: str) -> dict[str, Any]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from llamalab.tokenizer.bpe import make_pre_tokenizer

    probe = HFTokenizer(models.BPE())
    probe.pre_tokenizer = make_pre_tokenizer(family)
    return json.loads(probe.to_str())["pre_tokenizer"]


def tiktoken_merges(ranks: Mapping[bytes, int]) -> list[str]:
    """The BPE merge list of a tiktoken rank table, as Llama 3's tokenizer.json has it.

    tiktoken ranks tokens, not pairs, and merges whichever adjacent pair forms the
    lowest-ranked token. A merge list with the same effect lists, for every token, each
    way of cutting it into two tokens, ordered by the token's rank and then by the ranks
    of the two halves. That is how Meta's Llama 3 vocabulary was published for Hugging
    Face and llama.cpp (280,147 merges for 128,000 tokens), and a ranked pair-merge BPE
    with this list reproduces tiktoken's ids.
    """
    merges: list[tuple[int, int, int, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            rank_l, rank_r = ranks.get(left), ranks.get(right)
            if rank_l is not None and rank_r is not None:
                merges.append(
                    (rank, rank_l, rank_r, f"{bytes_to_piece(left)} {bytes_to_piece(right)}")
                )
    merges.sort()
    return [m[3] for m in merges]
