"""Byte-level BPE (GPT-2, Llama 3 as stored in GGUF, SmolLM2) on Hugging Face `tokenizers`.

Two sources:

- a GGUF ``gpt2`` vocabulary: tokens, merges, token types and the pre-tokenizer named
  by ``tokenizer.ggml.pre``. The pre-tokenizer decides how text is cut into words before
  the merges run, so it is rebuilt here from llama.cpp's definition of each name
  (``llama-vocab.cpp``) with `tokenizers` building blocks; the merges themselves run in
  `tokenizers`' BPE model.
- a Hugging Face ``tokenizer.json`` (any model `tokenizers` can load, including Llama 2's
  SentencePiece-style BPE), used as it is: it *is* the reference for that format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamalab.errors import LlamalabError
from llamalab.tokenizer.base import SpecialTokens, Tokenizer
from llamalab.tokenizer.bytelevel import piece_to_bytes

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)

# The word-splitting regexes of llama.cpp's pre-tokenizer types.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre → (pre-tokenizer family, whether whole-word vocabulary hits skip the
# merges). Only names whose llama.cpp definition is exactly one of these families are
# listed; anything else is refused rather than tokenized subtly wrong.
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": ("default", False),
    "gpt-2": ("gpt2", False),
    "phi-2": ("gpt2", False),
    "mpt": ("gpt2", False),
    "olmo": ("gpt2", False),
    "llama-bpe": ("llama3", True),
    "llama3": ("llama3", True),
    "llama-v3": ("llama3", True),
    "smollm": ("digits", False),
    "starcoder": ("digits", False),
    "refact": ("digits", False),
    "codeshell": ("digits", False),
}
# llama.cpp adds BOS by default for these families when the GGUF does not say.
_ADD_BOS_BY_DEFAULT = {"llama3"}


def make_pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equivalent to one llama.cpp pre-tokenizer family.

    llama.cpp applies a list of regexes in turn, each splitting the pieces the previous
    left ("isolated": matches and the text between them both become pieces), then maps
    bytes to the printable byte-level alphabet; this is the same pipeline.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    isolated = [
        Regex(r)
        for r in {
            "gpt2": [GPT2_PATTERN],
            "llama3": [LLAMA3_PATTERN],
            # Every digit on its own, then GPT-2's split (SmolLM2, StarCoder).
            "digits": [r"\p{N}", GPT2_PATTERN],
            # llama.cpp's fallback for "default": punctuation runs, GPT-2, digit runs, then
            # groups of three ASCII digits.
            "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"],
        }[family]
    ]
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(r, behavior="isolated") for r in isolated] + [byte_level]
    )


class ByteLevelBPETokenizer(Tokenizer):
    """A GGUF ``gpt2`` vocabulary: our special-token handling around `tokenizers`' BPE."""

    kind = "bpe"

    def __init__(self, meta: Mapping[str, Any], *, source: str) -> None:
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        n = len(tokens)
        types = np.asarray(
            meta.get("tokenizer.ggml.token_type", np.full(n, TOKEN_NORMAL)), dtype=np.int64
        )
        if len(types) != n:
            raise LlamalabError(f"{source}: {n} tokens but {len(types)} token types")
        pre_name = str(meta.get("tokenizer.ggml.pre", "default"))
        if pre_name not in PRE_TOKENIZERS:
            raise LlamalabError(
                f"{source}: unsupported pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); "
                f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        self.pre_tokenizer = pre_name
        family, ignore_merges = PRE_TOKENIZERS[pre_name]
        merges_raw = meta.get("tokenizer.ggml.merges")
        if merges_raw is None:
            raise LlamalabError(f"{source}: a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges")

        # llama.cpp's token_to_id map: the last of duplicate texts wins.
        vocab = {t: i for i, t in enumerate(tokens)}
        merges: list[tuple[str, str]] = []
        for m in merges_raw:
            # Split at the first space after position 0, as llama.cpp does.
            cut = m.find(" ", 1)
            if cut < 0:
                continue
            a, b = m[:cut], m[cut + 1 :]
            # A merge whose parts are not tokens can never fire; tokenizers refuses them.
            if a in vocab and b in vocab:
                merges.append((a, b))
        self._bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        self._bpe.pre_tokenizer = make_pre_tokenizer(family)
        self._bpe.decoder = decoders.ByteLevel()

        control = [i for i in range(n) if types[i] == TOKEN_CONTROL]
        special = {tokens[i]: i for i in range(n) if types[i] in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
        always = {tokens[i]: i for i in range(n) if types[i] == TOKEN_USER_DEFINED}
        token_bytes = [
            piece_to_bytes(t)
            if types[i] in (TOKEN_NORMAL, TOKEN_BYTE, TOKEN_UNUSED)
            else t.encode("utf-8")
            for i, t in enumerate(tokens)
        ]
        bos, eos = _gguf_id(meta, "bos", n), _gguf_id(meta, "eos", n)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", family in _ADD_BOS_BY_DEFAULT)
        super().__init__(
            source=source,
            pieces=tokens,
            token_bytes=token_bytes,
            control_ids=control,
            special_tokens=SpecialTokens(always=always, special=special),
            bos_id=bos,
            eos_id=eos,
            add_bos=bool(add_bos),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            extra_stop_ids=[
                i for i in (_gguf_id(meta, "eot", n), _gguf_id(meta, "eom", n)) if i is not None
            ],
        )

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` object doing the merges (for benchmarks and debugging)."""
        return self._bpe

    def _encode_text(self, text: str) -> list[int]:
        return self._bpe.encode(text, add_special_tokens=False).ids


def _gguf_id(meta: Mapping[str, Any], name: str, n: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    if value is None:
        return None
    value = int(value)
    # Some converters write -1 or a huge value for "none".
    return value if 0 <= value < n else None


class HFJsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``, run by `tokenizers` as transformers would.

    Special tokens are split off by `tokenizers` itself (its added-token rules, with
    their lstrip/rstrip/normalized flags, are part of the reference behaviour).
    """

    kind = "bpe"

    def __init__(
        self,
        path: Path,
        *,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        source = str(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self._hf = HFTokenizer.from_str(json.dumps(raw))
        # tokenizers reports a bad file with a plain Exception, so nothing narrower works.
        except Exception as exc:  # noqa: BLE001
            raise LlamalabError(f"{path}: not a loadable tokenizer.json: {exc}") from None
        config = dict(config or {})
        # A second copy that treats special-token text as text, for special=False.
        self._hf_plain = HFTokenizer.from_str(self._hf.to_str())
        self._hf_plain.encode_special_tokens = True

        n = self._hf.get_vocab_size(with_added_tokens=True)
        added = self._hf.get_added_tokens_decoder()
        n = max([n, *(i + 1 for i in added)])
        pieces = [self._hf.id_to_token(i) or "" for i in range(n)]
        control = [i for i, t in added.items() if t.special]
        token_bytes = _hf_token_bytes(raw.get("decoder"), pieces, added, path)
        dummy_prefix = _hf_dummy_prefix_ids(raw.get("decoder"), pieces, added)

        def token_id(value: Any) -> int | None:
            text = value.get("content") if isinstance(value, Mapping) else value
            return self._hf.token_to_id(text) if isinstance(text, str) else None

        bos = token_id(config.get("bos_token"))
        eos = token_id(config.get("eos_token"))
        probe = self._hf.encode("a", add_special_tokens=True).ids
        if bos is None and probe and probe[0] in added and len(probe) > 1:
            bos = probe[0]  # the post-processor prepends it: that is the BOS
        if eos is None:
            eos = next(
                (
                    self._hf.token_to_id(t)
                    for t in ("<|end_of_text|>", "</s>", "<|endoftext|>")
                    if self._hf.token_to_id(t) is not None
                ),
                None,
            )
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bool(probe) and probe[0] == bos
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = bool(probe) and probe[-1] == eos and len(probe) > 1
        gen_eos = (generation_config or {}).get("eos_token_id")
        extra_stops = (
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        )
        super().__init__(
            source=source,
            pieces=pieces,
            token_bytes=token_bytes,
            control_ids=control,
            special_tokens=SpecialTokens(
                always={t.content: i for i, t in added.items() if not t.special},
                special={t.content: i for i, t in added.items() if t.special},
            ),
            bos_id=bos,
            eos_id=eos,
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            dummy_prefix_ids=dummy_prefix,
            extra_stop_ids=[int(i) for i in extra_stops],
        )

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` object (for benchmarks and debugging)."""
        return self._hf

    def _encode_with_specials(self, text: str, special: bool) -> list[int]:
        tok = self._hf if special else self._hf_plain
        return tok.encode(text, add_special_tokens=False).ids

    def _encode_text(self, text: str) -> list[int]:
        return self._hf_plain.encode(text, add_special_tokens=False).ids


def _decoder_steps(decoder: Any) -> list[Mapping[str, Any]]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _decoder_steps(d)]
    return [decoder]


def _is_spm_style(decoder: Any) -> bool:
    types = {s.get("type") for s in _decoder_steps(decoder)}
    return "Metaspace" in types or "ByteFallback" in types


def _hf_token_bytes(
    decoder: Any, pieces: Sequence[str], added: Mapping[int, Any], path: Path
) -> list[bytes]:
    """Bytes of each token under the two decoder families LLaMA-family tokenizer.json files use."""
    types = {s.get("type") for s in _decoder_steps(decoder)}
    out: list[bytes] = []
    if "ByteLevel" in types:
        for i, p in enumerate(pieces):
            out.append(added[i].content.encode("utf-8") if i in added else piece_to_bytes(p))
        return out
    if _is_spm_style(decoder):
        for i, p in enumerate(pieces):
            if i in added:
                out.append(added[i].content.encode("utf-8"))
            elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                out.append(bytes([int(p[3:5], 16)]))  # byte-fallback piece
            else:
                out.append(p.replace("\u2581", " ").encode("utf-8"))
        return out
    raise LlamalabError(
        f"{path}: unsupported decoder {sorted(t for t in types if t)} (expected ByteLevel or Metaspace/ByteFallback)"
    )


def _hf_dummy_prefix_ids(
    decoder: Any, pieces: Sequence[str], added: Mapping[int, Any]
) -> list[int]:
    """Ids whose leading space the decoder drops at the start of the text (SentencePiece style)."""
    strips = False
    for step in _decoder_steps(decoder):
        if step.get("type") == "Strip" and step.get("content") == " " and step.get("start", 0) >= 1:
            strips = True
        if (
            step.get("type") == "Metaspace"
            and step.get("prepend_scheme", "always") != "never"
            and step.get("add_prefix_space", True)
        ):
            strips = True
    if not strips:
        return []
    return [i for i, p in enumerate(pieces) if i not in added and p.startswith("\u2581")]
