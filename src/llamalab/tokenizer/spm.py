"""SentencePiece (LLaMA 1 and 2) on the `sentencepiece` library.

Both sources end up in the library:

- a ``tokenizer.model`` file is loaded as it is;
- a GGUF ``llama`` vocabulary (tokens, scores, token types) is turned back into the
  SentencePiece model it was converted from: a BPE model whose pieces carry the GGUF
  scores and types, with byte fallback when the vocabulary has byte pieces. SentencePiece
  BPE merges the adjacent pair whose concatenation is a piece with the highest score,
  which is exactly what those three arrays describe, and it is what llama.cpp's own
  ``llm_tokenizer_spm`` reimplements.

A GGUF vocabulary is whatever llama.cpp accepts, which is more than the library does:
Phi-3's has 53 pieces typed UNKNOWN (``[PAD32011]``…) while its ``<unk>`` is typed
CONTROL and ``</s>`` USER_DEFINED, and the library wants exactly one unknown piece,
unique non-empty pieces and either all 256 byte pieces or none. So the GGUF's own
tokens, scores and types stay the tokenizer's vocabulary (ids, decoding, special-token
parsing, export), and the library gets a copy adjusted where it would refuse it (see
`library_model_proto`), with every id kept in place so its output needs no translation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sentencepiece as spm

from llamalab.errors import LlamalabError
from llamalab.tokenizer import _protobuf as pb
from llamalab.tokenizer.base import SpecialTokens, Tokenizer

# SentencePiece piece types; GGUF token types use the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's visible space
UNK_SURFACE = " \u2047 "  # what sentencepiece decodes <unk> to


@dataclass(frozen=True)
class SpmModel:
    """The parts of a SentencePiece ``ModelProto`` that llamalab reads."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool


def parse_model_proto(data: bytes, source: str) -> SpmModel:
    """Read a serialized SentencePiece model. Raises LlamalabError if it is not one."""
    try:
        fields = pb.parse(data)
        pieces, scores, types = [], [], []
        for f in fields:
            if f.number != pb.MODEL_PIECES:
                continue
            if not isinstance(f.value, bytes):
                raise ValueError("piece is not a message")  # noqa: TRY004 (malformed file, not a caller bug)
            sub = pb.parse(f.value)
            text, score, kind = (
                pb.get(sub, pb.PIECE_TEXT),
                pb.get(sub, pb.PIECE_SCORE),
                pb.get(sub, pb.PIECE_TYPE),
            )
            if text is None or not isinstance(text.value, bytes):
                raise ValueError("piece without text")
            pieces.append(text.value.decode("utf-8"))
            scores.append(pb.as_float(score) if score is not None else 0.0)
            types.append(int(kind.value) if kind is not None else NORMAL)  # type: ignore[arg-type]
        trainer = _submessage(fields, pb.MODEL_TRAINER_SPEC)
        normalizer = _submessage(fields, pb.MODEL_NORMALIZER_SPEC)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LlamalabError(f"{source}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise LlamalabError(f"{source}: not a SentencePiece model (no pieces)")

    def flag(fields: list[pb.Field], number: int, default: bool) -> bool:
        f = pb.get(fields, number)
        return default if f is None else bool(f.value)

    model_type = pb.get(trainer, pb.TRAINER_MODEL_TYPE)
    return SpmModel(
        pieces=pieces,
        scores=scores,
        types=types,
        model_type=int(model_type.value) if model_type else pb.TRAINER_MODEL_TYPE_UNIGRAM,  # type: ignore[arg-type]
        byte_fallback=flag(trainer, pb.TRAINER_BYTE_FALLBACK, False),
        add_dummy_prefix=flag(normalizer, pb.NORM_ADD_DUMMY_PREFIX, True),
        remove_extra_whitespaces=flag(normalizer, pb.NORM_REMOVE_EXTRA_WS, True),
    )


def _submessage(fields: list[pb.Field], number: int) -> list[pb.Field]:
    f = pb.get(fields, number)
    return pb.parse(f.value) if f is not None and isinstance(f.value, bytes) else []


def build_model_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
) -> bytes:
    """A SentencePiece BPE model from a vocabulary (the inverse of GGUF export).

    The normalizer is the identity (LLaMA's): no Unicode normalization, whitespace
    escaped to ``▁``.
    """
    fields = [
        pb.message(
            pb.MODEL_PIECES,
            [
                pb.string(pb.PIECE_TEXT, p),
                pb.float32(pb.PIECE_SCORE, s),
                pb.varint(pb.PIECE_TYPE, t),
            ],
        )
        for p, s, t in zip(pieces, scores, types, strict=True)
    ]
    fields.append(
        pb.message(
            pb.MODEL_TRAINER_SPEC,
            [
                pb.varint(pb.TRAINER_MODEL_TYPE, pb.TRAINER_MODEL_TYPE_BPE),
                pb.varint(pb.TRAINER_BYTE_FALLBACK, any(t == BYTE for t in types)),
            ],
        )
    )
    fields.append(
        pb.message(
            pb.MODEL_NORMALIZER_SPEC,
            [
                pb.string(pb.NORM_NAME, "identity"),
                pb.varint(pb.NORM_ADD_DUMMY_PREFIX, add_dummy_prefix),
                pb.varint(pb.NORM_REMOVE_EXTRA_WS, remove_extra_whitespaces),
                pb.varint(pb.NORM_ESCAPE_WS, True),
            ],
        )
    )
    return pb.serialize(fields)


def library_model_proto(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    unk_id: int,
    add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = False,
) -> bytes:
    """A model the `sentencepiece` library accepts that encodes as llama.cpp does.

    llama.cpp loads any list of tokens; the library refuses several things a GGUF file
    can hold. Each is adjusted so that the pieces the library can *produce* while
    encoding are the ones llama.cpp's ``llm_tokenizer_spm`` can produce, at the same ids:

    - one UNKNOWN piece, at ``unk_id`` (the file's ``unknown_token_id``): the other
      UNKNOWN-typed pieces become CONTROL. Neither kind is ever a merge result in the
      library, and llama.cpp only reaches them through special-token parsing, which
      llamalab does itself, by text, before the library sees the text. If ``unk_id``
      is an ordinary piece (a vocabulary with no unknown token), a placeholder UNKNOWN
      piece is appended after the last id; `SentencePieceTokenizer` maps it back.
    - unique, non-empty pieces: llama.cpp looks text up in a map where the last id of
      a text wins, so earlier duplicates (and empty pieces, which llama.cpp renames)
      get a placeholder text no input can produce and become CONTROL.
    - byte fallback only with all 256 ``<0xXX>`` pieces; a BYTE-typed piece that is
      not one, or a partial set, becomes CONTROL (llama.cpp's byte lookup fails on
      a missing byte too).
    - token types SentencePiece does not define (0, GGUF's "undefined") become NORMAL:
      llama.cpp merges into them like any other token.
    """
    n = len(pieces)
    texts = list(pieces)
    kinds = [t if NORMAL <= t <= BYTE else NORMAL for t in types]
    taken = set(texts)

    def placeholder(i: int) -> str:
        # Private-use characters and the id make a text no vocabulary holds by accident;
        # the loop makes sure this one does not.
        text = f"\ue000llamalab-unreachable-{i}\ue000"
        while text in taken:
            text += "\ue000"
        taken.add(text)
        return text

    last = {t: i for i, t in enumerate(texts)}
    for i, t in enumerate(texts):
        if not t or last[t] != i:
            texts[i], kinds[i] = placeholder(i), CONTROL
    byte_ids = [i for i, t in enumerate(kinds) if t == BYTE]
    valid_bytes = {texts[i] for i in byte_ids if _byte_piece_value(texts[i]) is not None}
    byte_fallback = len(valid_bytes) == 256
    for i in byte_ids:
        if not byte_fallback or _byte_piece_value(texts[i]) is None:
            kinds[i] = CONTROL
    appended = not (0 <= unk_id < n and kinds[unk_id] in (UNKNOWN, CONTROL, UNUSED))
    kinds = [CONTROL if t == UNKNOWN else t for t in kinds]
    if appended:
        texts.append(placeholder(n))
        kinds.append(UNKNOWN)
        scores = [*scores, 0.0]
    else:
        kinds[unk_id] = UNKNOWN
    return build_model_proto(
        texts,
        scores,
        kinds,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_whitespaces,
    )


def _byte_piece_value(piece: str) -> int | None:
    """The byte of a ``<0xXX>`` piece (upper-case hex, as SentencePiece writes it)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        digits = piece[3:5]
        if all(c in "0123456789ABCDEF" for c in digits):
            return int(digits, 16)
    return None


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece, from a ``tokenizer.model`` or a GGUF ``llama`` vocabulary."""

    kind = "sentencepiece"

    def __init__(
        self,
        model_proto: bytes,
        *,
        source: str,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        llamacpp_rules: bool = False,
        vocabulary: SpmModel | None = None,
        unk_id: int | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        """Args:
        model_proto: a serialized SentencePiece model, handed to the library.
        source: where it came from, for messages.
        bos_id, eos_id: override the model's own (``None``: the pieces typed control
            named ``<s>``/``</s>``, else SentencePiece's defaults).
        add_bos, add_eos: the model's defaults for `encode`.
        llamacpp_rules: follow llama.cpp, the reference for GGUF vocabularies: split
            user-defined pieces off before SentencePiece sees the text (each remaining
            fragment then gets its own dummy prefix), and treat UNKNOWN-typed pieces
            like control ones (parsed from text only with ``special=True``, decoded as
            their text, dropped by ``decode(special=False)``). Off for
            ``tokenizer.model`` files, where the library is the reference: it matches
            user-defined pieces itself and decodes ``<unk>`` as ``" ⁇ "``.
        vocabulary: the vocabulary as the file declares it, when ``model_proto`` is an
            adjusted copy (`library_model_proto`); ``None``: the proto's own pieces.
        unk_id: the id that a placeholder unknown piece appended by
            `library_model_proto` stands for.
        """
        self.model = (
            vocabulary if vocabulary is not None else parse_model_proto(model_proto, source)
        )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise LlamalabError(f"{source}: sentencepiece cannot load this model: {exc}") from None
        m = self.model
        n = len(m.pieces)
        # The library's ids beyond the vocabulary: only an appended placeholder <unk>.
        self._unk_alias: int | None = None
        if self._sp.get_piece_size() != n:
            if self._sp.get_piece_size() != n + 1 or unk_id is None or not 0 <= unk_id < n:
                raise LlamalabError(
                    f"{source}: the SentencePiece model has {self._sp.get_piece_size()} "
                    f"pieces for a vocabulary of {n}"
                )
            self._unk_alias = unk_id
        unknown_kind = CONTROL if llamacpp_rules else UNKNOWN
        kinds = [unknown_kind if t == UNKNOWN else t for t in m.types]
        token_bytes: list[bytes] = []
        for p, t in zip(m.pieces, kinds, strict=True):
            if t == BYTE and _byte_piece_value(p) is not None:
                token_bytes.append(bytes([int(p[3:5], 16)]))
            elif t == CONTROL:
                token_bytes.append(p.encode("utf-8"))
            elif t == UNKNOWN:
                token_bytes.append(UNK_SURFACE.encode("utf-8"))
            else:
                token_bytes.append(p.replace(SPACE, " ").encode("utf-8"))
        # sentencepiece strips the dummy-prefix space when decoding if either option adds
        # or removes leading whitespace.
        strips = m.add_dummy_prefix or m.remove_extra_whitespaces
        dummy = [
            i
            for i, (p, t) in enumerate(zip(m.pieces, kinds, strict=True))
            if strips and t in (NORMAL, USER_DEFINED) and p.startswith(SPACE)
        ]

        def default_id(given: int | None, name: str, lib: int) -> int | None:
            if given is not None:
                return given if 0 <= given < n else None
            for i, (p, t) in enumerate(zip(m.pieces, m.types, strict=True)):
                if p == name and t == CONTROL:
                    return i
            return lib if 0 <= lib < n else None

        always = (
            {
                p: i
                for i, (p, t) in enumerate(zip(m.pieces, kinds, strict=True))
                if t == USER_DEFINED
            }
            if llamacpp_rules
            else {}
        )
        special = {
            p: i
            for i, (p, t) in enumerate(zip(m.pieces, kinds, strict=True))
            if t in (CONTROL, UNKNOWN)
        }
        super().__init__(
            source=source,
            pieces=m.pieces,
            token_bytes=token_bytes,
            control_ids=[i for i, t in enumerate(kinds) if t == CONTROL],
            special_tokens=SpecialTokens(always=always, special=special),
            bos_id=default_id(bos_id, "<s>", self._sp.bos_id()),
            eos_id=default_id(eos_id, "</s>", self._sp.eos_id()),
            add_bos=add_bos,
            add_eos=add_eos,
            dummy_prefix_ids=dummy,
            extra_stop_ids=extra_stop_ids,
        )

    def library_proto(self) -> bytes:
        """The serialized model the `sentencepiece` library runs (a ``tokenizer.model``)."""
        return self._sp.serialized_model_proto()

    @property
    def backend(self) -> spm.SentencePieceProcessor:
        """The `sentencepiece` processor (for benchmarks and debugging)."""
        return self._sp

    @property
    def scores(self) -> list[float]:
        """Each piece's score (its merge priority)."""
        return list(self.model.scores)

    @property
    def token_types(self) -> list[int]:
        """Each piece's SentencePiece/GGUF type (1 normal … 6 byte)."""
        return list(self.model.types)

    def _encode_text(self, text: str) -> list[int]:
        # The library adds the dummy-prefix space to each fragment; llama.cpp adds one to
        # the text at the start and after every special token, which is the same thing.
        ids: list[int] = self._sp.encode(text)
        if self._unk_alias is not None:
            n, unk = len(self.model.pieces), self._unk_alias
            ids = [unk if i >= n else i for i in ids]
        return ids


def from_gguf_meta(meta: Mapping[str, Any], *, source: str) -> SentencePieceTokenizer:
    """A SentencePiece tokenizer from a GGUF ``llama`` vocabulary's metadata.

    Anything llama.cpp loads loads here: the file's tokens, scores and types are kept as
    they are, and the library gets an adjusted copy (`library_model_proto`).
    """
    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    n = len(tokens)
    scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(n)), dtype=np.float32)
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int64)
    if len(scores) != n or len(types) != n:
        raise LlamalabError(
            f"{source}: {n} tokens but {len(scores)} scores and {len(types)} token types"
        )
    if n == 0:
        raise LlamalabError(f"{source}: the SentencePiece vocabulary is empty")
    score_list = [float(s) for s in scores]
    type_list = [int(t) for t in types]
    add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    remove_extra_ws = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))

    def key_id(name: str, default: int | None) -> int | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return int(v) if v is not None else default

    # llama.cpp's unknown id: the file's, else 0 (its SentencePiece default).
    unk_id = key_id("unknown", 0)
    if unk_id is None or not 0 <= unk_id < n:
        unk_id = 0
    proto = library_model_proto(
        tokens,
        score_list,
        type_list,
        unk_id=unk_id,
        # llama.cpp's defaults for SentencePiece vocabularies, unless the file says otherwise.
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_ws,
    )
    vocabulary = SpmModel(
        pieces=tokens,
        scores=score_list,
        types=type_list,
        model_type=pb.TRAINER_MODEL_TYPE_BPE,
        byte_fallback=any(t == BYTE for t in type_list),
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=remove_extra_ws,
    )
    return SentencePieceTokenizer(
        proto,
        source=source,
        bos_id=key_id("bos", 1),
        eos_id=key_id("eos", 2),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        llamacpp_rules=True,
        vocabulary=vocabulary,
        unk_id=unk_id,
        extra_stop_ids=[i for i in (key_id("eot", None), key_id("eom", None)) if i is not None],
    )
