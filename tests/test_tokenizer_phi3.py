"""Phi-3's SentencePiece vocabulary, which llama.cpp loads and the library alone refuses.

Phi-3's GGUF types its ``<unk>`` CONTROL, ``</s>`` USER_DEFINED and 53 padding pieces
UNKNOWN; handed to `sentencepiece` as it is, the library stops at "unk is already
defined". llama.cpp's test vectors for it (the same strings and ids as llama-spm's) must
pass exactly, and every id must stay addressable.
"""

from __future__ import annotations

import pytest

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError
from llamalab.tokenizer.spm import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    SentencePieceTokenizer,
    build_model_proto,
    from_gguf_meta,
)
from tests.test_tokenizer_llamacpp_vectors import VOCAB_DIR, read_vectors

PHI3 = VOCAB_DIR / "ggml-vocab-phi-3.gguf"


@pytest.fixture(scope="module")
def phi3() -> SentencePieceTokenizer:
    tok = load_tokenizer(PHI3)
    assert isinstance(tok, SentencePieceTokenizer)
    return tok


def test_phi3_vectors(phi3: SentencePieceTokenizer) -> None:
    assert phi3.kind == "sentencepiece" and phi3.vocab_size == 32064
    failures = [
        (text, expected, got)
        for text, expected in read_vectors("phi-3")
        if (got := phi3.encode(text, add_bos=False, special=False)) != expected
    ]
    assert not failures, f"{len(failures)} of 46 vectors differ, first: {failures[0]}"


def test_phi3_vectors_round_trip(phi3: SentencePieceTokenizer) -> None:
    for text, expected in read_vectors("phi-3"):
        assert phi3.decode(expected) == text


def test_phi3_keeps_the_files_vocabulary(phi3: SentencePieceTokenizer) -> None:
    # The library's copy is adjusted; what llamalab reports (and exports) is the file's.
    types = phi3.token_types
    assert (types[0], types[1], types[2], types[32000], types[32011]) == (
        CONTROL,
        CONTROL,
        USER_DEFINED,
        CONTROL,
        UNKNOWN,
    )
    assert types.count(UNKNOWN) == 53
    assert phi3.id_to_piece(32011) == "[PAD32011]"
    assert (phi3.bos_id, phi3.eos_id, phi3.add_bos_default) == (1, 32000, True)
    # llama.cpp ends a turn on <|end|> as well as on EOS.
    assert {32000, 32007} <= phi3.stop_ids


def test_phi3_special_tokens_as_llamacpp_parses_them(phi3: SentencePieceTokenizer) -> None:
    # Control tokens only with special=True; </s> is USER_DEFINED, so always.
    assert phi3.encode("<|user|>\nHi<|end|>", add_bos=False) == [
        32010,
        *phi3.encode("\nHi", add_bos=False),
        32007,
    ]
    plain = phi3.encode("<|user|>Hi</s>", add_bos=False, special=False)
    assert 32010 not in plain and plain[-1] == 2
    # UNKNOWN-typed padding is special text, parsed only when asked.
    assert phi3.encode("[PAD32011]", add_bos=False) == [32011]
    assert 32011 not in phi3.encode("[PAD32011]", add_bos=False, special=False)
    # llama.cpp decodes control and unknown tokens as their text, or drops them.
    ids = [1, 32010, *phi3.encode("Hi", add_bos=False), 32011, 32007, 0]
    assert phi3.decode(ids) == "<s><|user|> Hi[PAD32011]<|end|><unk>"
    assert phi3.decode(ids, special=False) == "Hi"
    assert all(phi3.is_special(i) for i in (0, 1, 32000, 32011)) and not phi3.is_special(2)


def test_phi3_chat_template(phi3: SentencePieceTokenizer) -> None:
    ids = phi3.encode_chat([{"role": "user", "content": "Hi"}])
    # <s><|user|> … <|assistant|>, then llama.cpp gives the "\n" after a special token
    # its own dummy prefix: "▁", "\n".
    assert ids[:2] == [1, 32010] and ids[-3:] == [32001, 29871, 13]
    assert ids.count(1) == 1


def _meta(tokens: list[str], types: list[int], **extra: object) -> dict[str, object]:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0 if t != NORMAL else -float(i) for i, t in enumerate(types)],
        "tokenizer.ggml.token_type": types,
        **extra,
    }


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def test_vocabularies_the_library_refuses_load() -> None:
    """Duplicates, empty pieces, several unknown pieces, a bad byte piece, odd types."""
    words = ["▁", "a", "b", "▁a", "ab", "▁ab", "c"]
    tokens = ["<unk>", "<s>", "</s>", *BYTES, *words, "a", "", "<0xZZ>", "[PAD]", "[PAD2]"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 6 + [0]
    types += [NORMAL, NORMAL, BYTE, UNKNOWN, UNKNOWN]
    ids = {t: i for i, t in enumerate(tokens)}  # the last id of a text, as in llama.cpp
    meta = _meta(tokens, types, **{"tokenizer.ggml.add_space_prefix": False})
    tok = from_gguf_meta(meta, source="odd.gguf")
    assert tok.vocab_size == len(tokens)
    assert tok.encode("a", add_bos=False) == [ids["a"]]  # the second "a"
    assert tok.encode("ab c", add_bos=False) == [ids["ab"], ids["▁"], ids["c"]]  # c: type 0
    # Characters with no piece fall back to bytes; the bad byte piece is never produced.
    assert tok.encode("é", add_bos=False) == [3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("ab é c"), special=False) == "ab é c"
    assert tok.encode("[PAD2]<unk>", add_bos=False) == [ids["[PAD2]"], 0]


def test_missing_byte_pieces_and_no_unknown_piece() -> None:
    tokens = ["<s>", "</s>", "▁", "a", "▁a", "<0x41>"]
    types = [CONTROL, CONTROL, NORMAL, NORMAL, NORMAL, BYTE]
    # No unknown piece at all and an ordinary piece at llama.cpp's default unknown id 0
    # would be wrong; here id 0 is <s>, a control token, so it is the unknown id.
    tok = from_gguf_meta(_meta(tokens, types), source="tiny.gguf")
    assert tok.encode("a", add_bos=False) == [4]
    assert tok.encode("aé", add_bos=False) == [4, 0]
    # An ordinary piece as the unknown id: the library gets an extra piece, mapped back.
    tok = from_gguf_meta(
        _meta(tokens, types, **{"tokenizer.ggml.unknown_token_id": 3}), source="tiny.gguf"
    )
    assert tok.encode("aé", add_bos=False) == [4, 3]
    assert tok.encode("a", add_bos=False) == [4]


def test_tokenizer_model_files_keep_the_library_rules() -> None:
    proto = build_model_proto(
        ["<unk>", "<s>", "</s>", "▁a"], [0.0, 0.0, 0.0, -1.0], [UNKNOWN, CONTROL, CONTROL, NORMAL]
    )
    tok = SentencePieceTokenizer(proto, source="tokenizer.model")
    assert tok.decode([0], special=False) == " \u2047 "  # sentencepiece's <unk> surface
    with pytest.raises(LlamalabError, match="sentencepiece cannot load"):
        SentencePieceTokenizer(
            build_model_proto(["<unk>", "<unk2>"], [0.0, 0.0], [UNKNOWN, UNKNOWN]), source="x"
        )


def test_phi3_through_the_command_line() -> None:
    """`llamalab tokenize` on llama.cpp's phi-3 vocabulary gives llama.cpp's ids."""
    import json

    from conftest import run_cli

    vectors = [(t, ids) for t, ids in read_vectors("phi-3") if t.strip()][:5]
    for text, expected in vectors:
        result = run_cli(
            "tokenize", "--model", str(PHI3), "--json", "--no-bos", "--no-special", text
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ids"] == expected, text
