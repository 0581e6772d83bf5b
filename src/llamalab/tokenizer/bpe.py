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
from itertools import repeat
from operator import add, contains
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llamalab.errors import LlamalabError
from llamalab.tokenizer.base import SpecialTokens, Tokenizer, backend_failure, shown_token
from llamalab.tokenizer.bytelevel import piece_to_bytes, pieces_to_bytes

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
        merges = _usable_merges(merges_raw, vocab, source)
        try:
            self._bpe = HFTokenizer(
                models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
            )
        # The merges are checked above, and load.check_gguf_vocabulary refuses duplicate
        # and empty tokens before this runs: what is known to panic. This
        # keeps a vocabulary built some other way from ending in a Rust panic.
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{source}: tokenizers cannot build this BPE") from None
        self._bpe.pre_tokenizer = make_pre_tokenizer(family)
        self._bpe.decoder = decoders.ByteLevel()

        # Whole-array tests, not one numpy scalar per token: this runs at every start.
        control = np.flatnonzero(types == TOKEN_CONTROL).tolist()
        special_ids = np.flatnonzero(np.isin(types, (TOKEN_CONTROL, TOKEN_UNKNOWN))).tolist()
        special = {tokens[i]: i for i in special_ids}
        always = {tokens[i]: i for i in np.flatnonzero(types == TOKEN_USER_DEFINED).tolist()}
        # Control and user-defined tokens are their text's UTF-8 bytes, not byte-level: they
        # stay out of the one translation of the others (a character of theirs past the
        # byte table would send every piece down the slow path).
        byte_level = np.isin(types, (TOKEN_NORMAL, TOKEN_BYTE, TOKEN_UNUSED))
        token_bytes = pieces_to_bytes([t if b else "" for t, b in zip(tokens, byte_level.tolist())])
        for i in np.flatnonzero(~byte_level).tolist():
            token_bytes[i] = tokens[i].encode("utf-8", "surrogatepass")
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
        try:
            return self._bpe.encode(text, add_special_tokens=False).ids
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{self.source}: tokenizers failed to encode") from None


def _usable_merges(
    raw: Sequence[str], vocab: Mapping[str, int], source: str
) -> list[tuple[str, str]]:
    """The merges `tokenizers` is given: each ``"a b"`` split at its first space after
    position 0, as llama.cpp splits it, keeping those whose parts are both tokens (no
    other can fire; `tokenizers` refuses them).

    Raises:
        LlamalabError: a kept merge makes text that is not a token (`tokenizers` would
            panic on it).
    """
    # At every start, for tens of thousands of merges: whole-list passes first, which
    # settle the usual vocabulary, where each merge holds one space and no newline, and
    # every part and result is a token. Anything else goes through the loop below.
    joined = "\n".join(raw)
    one_space_each = joined.count(" ") == len(raw) and all(map(contains, raw, repeat(" ")))
    if one_space_each and joined.count("\n") == len(raw) - 1:
        parts = joined.replace("\n", " ").split(" ")
        firsts, seconds = parts[0::2], parts[1::2]
        known = vocab.keys()
        if (
            all(firsts)  # "a b" splits after position 0; " b" would not
            and known >= set(firsts)
            and known >= set(seconds)
            and known >= set(map(add, firsts, seconds))
        ):
            return list(zip(firsts, seconds))
    merges: list[tuple[str, str]] = []
    for at, m in enumerate(raw):
        cut = m.find(" ", 1)
        if cut < 0:
            continue
        a, b = m[:cut], m[cut + 1 :]
        if a in vocab and b in vocab:
            # One of two tokens must make a token: `tokenizers` panics on one that
            # does not (it refuses such a merge in a tokenizer.json).
            if a + b not in vocab:
                raise LlamalabError(
                    f"{source}: merge {at} of tokenizer.ggml.merges, {shown_token(m)}, "
                    f"makes {shown_token(a + b)}, which is not in the vocabulary"
                )
            merges.append((a, b))
    return merges


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
        raw = _read_tokenizer_json(path)
        # Encoding never truncates or pads, as transformers' own encode does unless asked:
        # a file's settings would silently cut every prompt (and a bad stride panics).
        raw["truncation"] = None
        raw["padding"] = None
        _check_tokenizer_json(raw, path)
        config = dict(config or {})
        try:
            self._hf = HFTokenizer.from_str(json.dumps(raw))
            # A second copy that treats special-token text as text, for special=False.
            self._hf_plain = HFTokenizer.from_str(self._hf.to_str())
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{path}: not a loadable tokenizer.json") from None
        self._hf_plain.encode_special_tokens = True
        try:
            self._init_tables(path, raw, config, generation_config or {})
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(
                exc, f"{path}: tokenizers cannot use this tokenizer.json"
            ) from None

    def _init_tables(
        self,
        path: Path,
        raw: Mapping[str, Any],
        config: Mapping[str, Any],
        generation_config: Mapping[str, Any],
    ) -> None:
        source = str(path)
        added = self._hf.get_added_tokens_decoder()
        ids = [*self._hf.get_vocab(with_added_tokens=True).values(), *added]
        # Ids with no token in between are allowed (the table gets empty entries), but
        # not so many that one far-off id makes a table of billions.
        n = max(ids, default=-1) + 1
        if n > 2 * len(ids) + _MAX_ID_GAP:
            _far_id(path, self._hf.id_to_token(n - 1) or "", n - 1, len(ids))
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
        gen_eos = generation_config.get("eos_token_id")
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
        try:
            return tok.encode(text, add_special_tokens=False).ids
        except BaseException as exc:  # noqa: BLE001
            raise backend_failure(exc, f"{self.source}: tokenizers failed to encode") from None

    def _encode_text(self, text: str) -> list[int]:
        return self._encode_with_specials(text, False)


# How many ids past twice the number of tokens a vocabulary may leave without a token.
_MAX_ID_GAP = 1024


def _far_id(path: Path, token: str, token_id: int, count: int) -> NoReturn:
    raise LlamalabError(
        f"{path}: token {shown_token(token)} has id {token_id}, far outside the vocabulary of "
        f"{count} tokens (the ids between would be tokens without text)"
    )


def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    """The JSON object of a tokenizer.json, refusing a key given twice in one object.

    JSON parsers (Python's and `tokenizers`' alike) keep the last of two equal keys, so
    a token listed twice in ``model.vocab`` would silently lose one of its ids.
    """
    duplicates: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) != len(pairs) and not duplicates:
            seen: set[str] = set()
            duplicates.append(next(k for k, _ in pairs if k in seen or seen.add(k)))
        return value

    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=pairs_hook)
    except (OSError, ValueError) as exc:
        raise LlamalabError(f"{path}: not a loadable tokenizer.json: {exc}") from None
    if not isinstance(raw, dict):
        raise LlamalabError(f"{path}: not a loadable tokenizer.json: not a JSON object")
    if duplicates:
        key = duplicates[0]
        model = raw.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict) and key in vocab:
            raise LlamalabError(
                f"{path}: duplicate tokens in model.vocab: {shown_token(key)} is listed twice"
            )
        raise LlamalabError(f"{path}: the key {shown_token(key)} appears twice in one JSON object")
    return raw


def _check_tokenizer_json(raw: Mapping[str, Any], path: Path) -> None:
    """Refuse a tokenizer.json that `tokenizers` would panic on, or load ambiguously.

    Checked: duplicate tokens and duplicate ids in ``model.vocab``; an ``unk_token`` that
    is not a token (`tokenizers` fails on the first unknown character, not at load); each
    BPE merge; the special tokens a ``TemplateProcessing`` post-processor uses. Whatever
    else is wrong, `tokenizers` reports itself with an ordinary error.
    """
    model = raw.get("model")
    if not isinstance(model, dict):
        return
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: {token: id}
        by_id: dict[int, str] = {}
        added = raw.get("added_tokens")
        limit = 2 * (len(vocab) + (len(added) if isinstance(added, list) else 0)) + _MAX_ID_GAP
        for token, token_id in vocab.items():
            if isinstance(token_id, int) and not isinstance(token_id, bool):
                first = by_id.setdefault(token_id, token)
                if first is not token:
                    raise LlamalabError(
                        f"{path}: duplicate ids in model.vocab: {shown_token(first)} and "
                        f"{shown_token(token)} are both id {token_id}"
                    )
                if token_id >= limit:
                    _far_id(path, token, token_id, len(vocab))
        unk = model.get("unk_token")
        if isinstance(unk, str) and unk not in vocab:
            raise LlamalabError(f"{path}: model.unk_token {shown_token(unk)} is not in model.vocab")
        if model.get("type", "BPE") == "BPE" and isinstance(model.get("merges"), list):
            _check_merges(model["merges"], vocab, model.get("continuing_subword_prefix"), path)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        # SentencePiece refuses a model that defines a piece twice.
        first_entry: dict[str, int] = {}
        for i, entry in enumerate(vocab):
            if isinstance(entry, list) and entry and isinstance(entry[0], str):
                first = first_entry.setdefault(entry[0], i)
                if first != i:
                    raise LlamalabError(
                        f"{path}: duplicate tokens in model.vocab: {shown_token(entry[0])} is "
                        f"entry {first} and entry {i}"
                    )
    _check_template_processing(raw.get("post_processor"), path)


def _check_merges(merges: list[Any], vocab: Mapping[str, Any], prefix: Any, path: Path) -> None:
    """Each merge is two tokens whose joined text is a token, as `tokenizers` builds it.

    `tokenizers` joins the first part with the second minus the bytes of
    ``continuing_subword_prefix``; a result that is no token panics (or, cut inside a
    UTF-8 character, aborts the process), so it is refused here first.
    """
    cut = len(prefix.encode("utf-8")) if isinstance(prefix, str) else 0
    rank = 0
    for merge in merges:
        if isinstance(merge, str):
            if merge.startswith("#version"):  # a merges.txt header, skipped by tokenizers
                continue
            parts = merge.split(" ")
        elif isinstance(merge, list) and all(isinstance(p, str) for p in merge):
            parts = merge
        else:
            parts = []
        if len(parts) != 2:
            _bad_merge(merge, rank, path, 'is not two tokens (\'a b\' or ["a", "b"])')
        a, b = parts
        for part in (a, b):
            if part not in vocab:
                _bad_merge(
                    merge, rank, path, f"uses {shown_token(part)}, which is not in the vocabulary"
                )
        if cut:
            tail = b.encode("utf-8")[cut:]
            try:
                made = a + tail.decode("utf-8")
            except UnicodeDecodeError:
                made = ""
            if not tail or made == "":
                _bad_merge(
                    merge,
                    rank,
                    path,
                    f"has a second part that cannot lose the {cut} bytes of "
                    f"continuing_subword_prefix {shown_token(prefix)}",
                )
        else:
            made = a + b
        if made not in vocab:
            _bad_merge(
                merge, rank, path, f"makes {shown_token(made)}, which is not in the vocabulary"
            )
        rank += 1


def _bad_merge(merge: Any, rank: int, path: Path, problem: str) -> NoReturn:
    text = merge if isinstance(merge, str) else " ".join(map(str, merge))
    raise LlamalabError(f"{path}: merge {rank} of model.merges, {shown_token(text)}, {problem}")


def _check_template_processing(processor: Any, path: Path) -> None:
    """A ``TemplateProcessing`` post-processor defines each special token it inserts
    (`tokenizers` panics at the first encode otherwise)."""
    if not isinstance(processor, dict):
        return
    if processor.get("type") == "Sequence":
        for step in processor.get("processors") or []:
            _check_template_processing(step, path)
        return
    if processor.get("type") != "TemplateProcessing":
        return
    defined = processor.get("special_tokens")
    defined = defined if isinstance(defined, dict) else {}
    for name in ("single", "pair"):
        for piece in processor.get(name) or []:
            special = piece.get("SpecialToken") if isinstance(piece, dict) else None
            token = special.get("id") if isinstance(special, dict) else None
            if isinstance(token, str) and token not in defined:
                raise LlamalabError(
                    f"{path}: post_processor.{name} inserts {shown_token(token)}, which "
                    "post_processor.special_tokens does not define"
                )


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
