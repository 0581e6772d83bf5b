"""The one `Tokenizer` interface that every backend fills in.

A backend (SentencePiece, byte-level BPE, tiktoken) only has to say how a run of plain
text becomes ids and what bytes each id stands for. Everything the rest of llamalab relies
on is written once, here:

- special tokens in the text (``<|eot_id|>``, ``<s>``) are split off first, the way
  llama.cpp does it, so every backend agrees on what ``special=True`` means;
- BOS/EOS follow the model's own defaults unless the caller overrides them;
- decoding is a concatenation of per-token bytes, so the one-shot decoder and the
  streaming decoder cannot disagree (see `StreamDecoder`).

The round trip, as the references define it
-------------------------------------------
``decode(encode(text, add_bos=False)) == text`` for every string, on every backend. For
SentencePiece this holds because encoding prepends one "dummy prefix" space and decoding
removes the leading space of the first piece again, exactly as the ``sentencepiece``
library does (its ``decode`` drops the ``▁`` of the first non-control piece). The same
rule makes ``decode(encode(text), special=False) == text`` with the BOS that LLaMA 1/2
add by default, while ``special=True`` renders it: ``"<s> Hello"``, as llama.cpp shows it.
Byte-level BPE and tiktoken are lossless byte mappings and need no rule. Decoding never
applies the "clean up tokenization spaces" heuristic (llama.cpp's ``clean_spaces``),
which would break the round trip.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError

if TYPE_CHECKING:
    from llamalab.tokenizer.chat import ChatTemplate

# Names of end-of-turn tokens in LLaMA-family vocabularies. Generation stops on any of
# them (as llama.cpp's end-of-generation set does), not only on the EOS id: Llama 3 chat
# ends a turn with <|eot_id|>, ChatML models with <|im_end|>, Phi-3 with <|end|> (which
# llama.cpp also counts as end of turn).
STOP_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
)


@dataclass(frozen=True)
class SpecialTokens:
    """Which tokens are parsed out of text before the backend sees it.

    ``always`` holds user-defined tokens, which llama.cpp (like Hugging Face
    `tokenizers`) splits off even when special-token parsing is off; ``special`` holds
    the control and unknown tokens that are parsed only with ``special=True``.
    """

    always: Mapping[str, int] = field(default_factory=dict)
    special: Mapping[str, int] = field(default_factory=dict)


def backend_failure(exc: BaseException, what: str) -> BaseException:
    """The exception to raise for one that came out of a backend library's call.

    `tokenizers` reports a bad file with a plain ``Exception``; it and `tiktoken` (both
    Rust, through pyo3) raise a Rust panic as ``pyo3_runtime.PanicException``, which
    derives from ``BaseException`` so that ``except Exception`` misses it. Both become
    one `LlamalabError` saying ``what`` failed; ours, and the interpreter's own
    (``KeyboardInterrupt``, ``SystemExit``), pass through unchanged.
    """
    if isinstance(exc, LlamalabError):
        return exc
    if isinstance(exc, Exception) or type(exc).__name__ == "PanicException":
        detail = str(exc).strip().splitlines()
        return LlamalabError(f"{what}: {detail[0] if detail else type(exc).__name__}")
    return exc


def shown_token(token: str | bytes) -> str:
    """A token from a file we may not trust, quoted and cut short for an error message."""
    return repr(token) if len(token) <= 40 else repr(token[:37]) + "..."


def _partition_regex(tokens: Mapping[str, int]) -> re.Pattern[str] | None:
    texts = [t for t in tokens if t]
    if not texts:
        return None
    # Longest first: at one position the longest special token wins, as in llama.cpp,
    # which tries special tokens in order of decreasing length.
    texts.sort(key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts)))


class Tokenizer:
    """A LLaMA-family tokenizer: text ↔ ids, special tokens, streaming and chat templates.

    Build one with :func:`llamalab.load_tokenizer`; the backends subclass this and fill in
    the tables below and `_encode_text`.

    Attributes:
        kind: the backend, ``"sentencepiece"``, ``"bpe"`` or ``"tiktoken"``.
        source: the file the tokenizer was read from (for error messages).
        bos_id, eos_id: beginning/end-of-sequence ids (``None`` if the model has none).
        stop_ids: every id that ends generation (EOS and end-of-turn tokens).
        add_bos_default, add_eos_default: what ``encode(add_bos=None)`` does, from the model.
        chat_template: the model's chat template, or a built-in one, or ``None``.
    """

    kind: str = "?"

    def __init__(
        self,
        *,
        source: str,
        pieces: Sequence[str],
        token_bytes: Sequence[bytes],
        control_ids: Iterable[int],
        special_tokens: SpecialTokens,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool,
        dummy_prefix_ids: Iterable[int] = (),
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.source = source
        self._pieces = list(pieces)
        n = len(self._pieces)
        # The first of duplicate texts wins: filled from the end, so earlier ids overwrite.
        self._piece_to_id: dict[str, int] = dict(zip(reversed(self._pieces), range(n - 1, -1, -1)))
        self._control = frozenset(control_ids)
        # Two byte tables, one per value of ``special``, so decoding is a single join.
        self._bytes_special = list(token_bytes)
        self._bytes_plain = list(self._bytes_special)
        for i in self._control:
            if 0 <= i < len(self._bytes_plain):
                self._bytes_plain[i] = b""
        if len(self._bytes_special) != n:
            raise LlamalabError(f"{source}: {n} pieces but {len(self._bytes_special)} byte strings")
        # Ids whose leading space is SentencePiece's dummy prefix (normal pieces "▁…").
        self._dummy_prefix = frozenset(dummy_prefix_ids)
        self._special = special_tokens
        self._re_always = _partition_regex(special_tokens.always)
        self._re_special = _partition_regex({**special_tokens.always, **special_tokens.special})
        for name, tid in (("BOS", bos_id), ("EOS", eos_id)):
            if tid is not None and not 0 <= tid < n:
                raise LlamalabError(f"{source}: {name} id {tid} is outside the vocabulary of {n}")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos_default = bool(add_bos and bos_id is not None)
        self.add_eos_default = bool(add_eos and eos_id is not None)
        stops = {eos_id} if eos_id is not None else set()
        stops.update(i for i in extra_stop_ids if 0 <= i < n)
        for text in STOP_TOKEN_TEXTS:
            tid = self._piece_to_id.get(text)
            if tid is not None and tid in self._control:
                stops.add(tid)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.chat_template: ChatTemplate | None = None

    # ----------------------------------------------------------------- backend hook
    def _encode_text(self, text: str) -> list[int]:
        """Encode text that holds no special tokens (a backend's whole job)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self._pieces)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id, as the model stores it (``"Ġhello"``, ``"▁Hello"``)."""
        self._check_id(token_id)
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or ``None`` if there is none."""
        return self._piece_to_id.get(piece)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for when decoded on its own (special tokens: their text)."""
        self._check_id(token_id)
        return self._bytes_special[token_id]

    def token_text(self, token_id: int) -> str:
        """What one token reads as on its own; part of a UTF-8 character shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def is_special(self, token_id: int) -> bool:
        """Whether an id is a control token (BOS, EOS, ``<|eot_id|>``…), dropped by ``decode(special=False)``."""
        return token_id in self._control

    @property
    def added_tokens(self) -> SpecialTokens:
        """The tokens parsed out of text, by kind (see :class:`SpecialTokens`)."""
        return self._special

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every token that ``encode(special=True)`` parses out of text, by its text."""
        return {**self._special.always, **self._special.special}

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._pieces):
            raise LlamalabError(
                f"token id {token_id} is outside the vocabulary of {len(self._pieces)} ({self.source})"
            )

    # ----------------------------------------------------------------- encoding
    def encode(
        self, text: str, *, add_bos: bool | None = None, add_eos: bool = False, special: bool = True
    ) -> list[int]:
        """Turn text into ids.

        Args:
            text: the text.
            add_bos: prepend BOS; ``None`` means the model's own default (LLaMA 1/2 and
                Llama 3 add it; SmolLM2 does not).
            add_eos: append EOS.
            special: parse special-token text (``"<|eot_id|>"``) into its id. With
                ``False`` such text is tokenized as ordinary characters; user-defined
                tokens are still parsed (as llama.cpp and Hugging Face do).
        """
        if not isinstance(text, str):
            raise LlamalabError(f"encode() needs a str, got {type(text).__name__}")
        ids: list[int] = []
        if add_bos if add_bos is not None else self.add_bos_default:
            if self.bos_id is None:
                raise LlamalabError(
                    f"{self.source}: add_bos was asked for but the model has no BOS token"
                )
            ids.append(self.bos_id)
        ids.extend(self._encode_with_specials(text, special))
        if add_eos:
            if self.eos_id is None:
                raise LlamalabError(
                    f"{self.source}: add_eos was asked for but the model has no EOS token"
                )
            ids.append(self.eos_id)
        return ids

    def _encode_with_specials(self, text: str, special: bool) -> list[int]:
        table = (
            {**self._special.always, **self._special.special} if special else self._special.always
        )
        pattern = self._re_special if special else self._re_always
        if pattern is None:
            return self._encode_text(text) if text else []
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids.extend(self._encode_text(text[pos : m.start()]))
            ids.append(table[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._encode_text(text[pos:]))
        return ids

    # ----------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], *, special: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: token ids.
            special: render control tokens as their text (llama.cpp's and Meta's Llama 3
                behaviour); with ``False`` they are dropped (``sentencepiece``'s, and
                Hugging Face's ``skip_special_tokens=True``).

        Bytes that are not valid UTF-8 (a sequence cut mid-character) become U+FFFD.
        """
        dec = StreamDecoder(self, special=special)
        return dec.feed_many(ids) + dec.flush()

    def stream_decoder(self, *, special: bool = True) -> StreamDecoder:
        """An incremental decoder for generation: feed ids one at a time, print what it returns."""
        return StreamDecoder(self, special=special)

    # ----------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the model's chat template (see `ChatTemplate.render`)."""
        if self.chat_template is None:
            raise LlamalabError(f"{self.source}: the model has no chat template")
        return self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Render a conversation and tokenize it, special tokens parsed.

        BOS is added when the model adds one by default, unless the rendered template
        already starts with it: a prompt never begins with two BOS tokens.
        """
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        ids = self.encode(text, add_bos=False, special=True)
        if self.add_bos_default and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]  # add_bos_default implies a BOS
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the text that is now complete.

    It never emits half a UTF-8 character (the tail of a multi-byte character split
    across tokens is held back until the rest arrives) and it applies SentencePiece's
    leading-space rule once, at the start of the stream, so the concatenation of
    everything it returns, plus `flush`, equals ``Tokenizer.decode`` of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = True) -> None:
        self._tok = tokenizer
        self._table = tokenizer._bytes_special if special else tokenizer._bytes_plain
        # "replace" in an incremental decoder makes the same substitutions as a one-shot
        # bytes.decode("utf-8", "replace") of the whole stream.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Until the first token that produces output, a SentencePiece "▁word" piece loses
        # its leading space (the dummy prefix added at encoding).
        self._at_start = bool(tokenizer._dummy_prefix)

    def _bytes(self, token_id: int) -> bytes:
        try:
            if token_id < 0:
                raise IndexError
            b = self._table[token_id]
        except (IndexError, TypeError):
            raise LlamalabError(
                f"token id {token_id!r} is outside the vocabulary of {len(self._table)} ({self._tok.source})"
            ) from None
        if self._at_start:
            if token_id in self._tok._control and not b:
                return b  # an invisible BOS does not end the start of the text
            self._at_start = False
            if token_id in self._tok._dummy_prefix:
                return b[1:]
        return b

    def feed(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        return self._utf8.decode(self._bytes(token_id))

    def feed_many(self, ids: Iterable[int]) -> str:
        """Add several ids at once."""
        ids = list(ids)
        parts: list[bytes] = []
        k = 0
        while self._at_start and k < len(ids):
            parts.append(self._bytes(ids[k]))
            k += 1
        rest = ids[k:]
        if rest:
            try:
                if min(rest) < 0:  # a negative index would silently wrap around
                    raise IndexError
                parts.append(b"".join([self._table[i] for i in rest]))
            except (IndexError, TypeError):
                bad = next(
                    (i for i in rest if not (isinstance(i, int) and 0 <= i < len(self._table))),
                    rest[0],
                )
                raise LlamalabError(
                    f"token id {bad!r} is outside the vocabulary of {len(self._table)} ({self._tok.source})"
                ) from None
        return self._utf8.decode(b"".join(parts))

    def flush(self) -> str:
        """End of stream: return what is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
