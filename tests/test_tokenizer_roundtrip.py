"""decode(encode(x)) == x and streaming decode == decode, on random Unicode, per backend.

The round trip is the one the references define: ``decode(encode(text, add_bos=False))``
gives the text back. SentencePiece adds one dummy-prefix space when encoding and
``decode`` removes it again (as the `sentencepiece` library does); its one exception,
shared with the library, is the character ``▁`` (U+2581), which SentencePiece uses for a
space and so decodes to a space.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError
from llamalab.tokenizer import Tokenizer
from llamalab.tokenizer.bytelevel import byte_to_char

VOCAB_DIR = Path(__file__).parent / "fixtures" / "tokenizer" / "llamacpp-vocab"


def _sources() -> dict[str, Path]:
    sources = {
        name: VOCAB_DIR / f"ggml-vocab-{name}.gguf" for name in ("llama-spm", "gpt-2", "llama-bpe")
    }
    spec = importlib.util.find_spec("llama_models")
    if spec and spec.submodule_search_locations:
        sources["tiktoken"] = (
            Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
        )
    try:
        from llamalab.default_model import default_model_path

        sources["smollm2"] = default_model_path()
    except LlamalabError:
        pass
    return sources


SOURCES = _sources()
_CACHE: dict[str, Tokenizer] = {}


def tokenizer(name: str) -> Tokenizer:
    if name not in _CACHE:
        _CACHE[name] = load_tokenizer(SOURCES[name])
    return _CACHE[name]


# Text with spaces, newlines, digits, accents, CJK, emoji (multi-byte, byte fallback) and
# special-token look-alikes, mixed with arbitrary code points.
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n\r  a1é日🙂<|>▁'sS")),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=48,
)


def representable(tok: Tokenizer, text: str) -> str:
    """The text without characters the vocabulary cannot spell.

    SmolLM2's byte-level vocabulary lacks 21 of the 256 byte tokens (six ASCII controls
    such as U+0006, and lead bytes 0xF1/0xF2 of code points U+40000..U+BFFFF); `tokenizers`
    and llama.cpp both drop such bytes, so no tokenizer of that vocabulary can round-trip
    them. Every other vocabulary here covers all bytes.
    """
    if tok.kind != "bpe":
        return text
    table = byte_to_char()
    return "".join(
        c for c in text if all(tok.piece_to_id(table[b]) is not None for b in c.encode("utf-8"))
    )


def stream(tok: Tokenizer, ids: list[int], special: bool = True) -> list[str]:
    dec = tok.stream_decoder(special=special)
    return [dec.feed(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("name", sorted(SOURCES))
@settings(max_examples=120, deadline=None)
@given(text=TEXT)
def test_round_trip_and_streaming(name: str, text: str) -> None:
    tok = tokenizer(name)
    text = representable(tok, text)
    ids = tok.encode(text, add_bos=False, special=False)
    expected = text.replace("\u2581", " ") if tok.kind == "sentencepiece" else text
    assert tok.decode(ids) == expected
    chunks = stream(tok, ids)
    assert "".join(chunks) == expected
    assert not any("\ufffd" in c for c in chunks) or "\ufffd" in text  # never half a character
    # With the model's BOS and special tokens dropped, the text is the same.
    with_bos = tok.encode(text, special=False)
    assert tok.decode(with_bos, special=False) == expected
    assert "".join(stream(tok, with_bos, special=False)) == expected


@pytest.mark.parametrize("name", sorted(SOURCES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_streaming_equals_decode_on_any_ids(name: str, data: st.DataObject) -> None:
    """Arbitrary id sequences (cut UTF-8, stray bytes, special tokens): same text either way."""
    tok = tokenizer(name)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=24))
    for special in (True, False):
        assert "".join(stream(tok, ids, special)) == tok.decode(ids, special=special)


def test_streaming_holds_back_partial_characters() -> None:
    tok = tokenizer("gpt-2")
    ids = tok.encode("🙂", add_bos=False)
    assert len(ids) > 1  # the emoji is split across tokens
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "🙂"


def test_sentencepiece_leading_space_streams_once() -> None:
    tok = tokenizer("llama-spm")
    ids = tok.encode("  Hello world")  # BOS, "▁", "▁", "▁Hello"...
    dec = tok.stream_decoder(special=False)
    assert "".join(dec.feed(i) for i in ids) == "  Hello world"
    assert tok.decode(tok.encode("Hello", add_bos=False)) == "Hello"


def test_bad_ids_are_clear_errors() -> None:
    tok = tokenizer("gpt-2")
    for bad in ([-1], [tok.vocab_size], [0, 10**9]):
        with pytest.raises(LlamalabError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(LlamalabError):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(LlamalabError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(byte_to_char()) | st.characters(), max_size=12))
def test_a_byte_level_piece_is_gpt2s_bytes_and_any_other_character_its_utf8(piece: str) -> None:
    """``piece_to_bytes`` against GPT-2's own table (transformers' ``bytes_to_unicode``);
    a character outside it (a malformed vocabulary) stands for its UTF-8 bytes, a lone
    surrogate for those of Python's ``surrogatepass``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from llamalab.tokenizer.bytelevel import piece_to_bytes

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    expected = b"".join(
        bytes([decoder[c]]) if c in decoder else c.encode("utf-8", "surrogatepass") for c in piece
    )
    assert piece_to_bytes(piece) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from(byte_to_char()) | st.characters(), max_size=6),
        max_size=8,
    )
)
def test_a_vocabulary_converted_at_once_equals_each_piece_converted(pieces: list[str]) -> None:
    from llamalab.tokenizer.bytelevel import piece_to_bytes, pieces_to_bytes

    assert pieces_to_bytes(pieces) == [piece_to_bytes(p) for p in pieces]
