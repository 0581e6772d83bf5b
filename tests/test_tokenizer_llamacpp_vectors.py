"""llama.cpp's own tokenizer test vectors (tests/test-tokenizer-0) for three vocabularies.

Each string is tokenized as llama.cpp's harness does it: no BOS, special-token text not
parsed. The expected ids were produced by the reference tokenizers (sentencepiece / HF)
and are what llama.cpp itself must reproduce.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamalab import load_tokenizer

VOCAB_DIR = Path(__file__).parent / "fixtures" / "tokenizer" / "llamacpp-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    base = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    # Both files end with a separator / newline: the last element is empty.
    assert texts[-1] == "" and lines[-1] == ""
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines) == 46
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


@pytest.mark.parametrize(
    ("name", "kind", "vocab_size"),
    [("llama-spm", "sentencepiece", 32000), ("llama-bpe", "bpe", 128256), ("gpt-2", "bpe", 50257)],
)
def test_llamacpp_vocab_vectors(name: str, kind: str, vocab_size: int) -> None:
    tok = load_tokenizer(VOCAB_DIR / f"ggml-vocab-{name}.gguf")
    assert tok.kind == kind
    assert tok.vocab_size == vocab_size
    failures = []
    for text, expected in read_vectors(name):
        got = tok.encode(text, add_bos=False, special=False)
        if got != expected:
            failures.append((text, expected, got))
    assert not failures, f"{len(failures)} of 46 vectors differ, first: {failures[0]}"


def test_llamacpp_vectors_round_trip() -> None:
    """Decoding the reference ids gives the text back (SentencePiece: minus nothing, the
    dummy prefix is removed; BPE: byte-exact)."""
    for name in ("llama-spm", "gpt-2"):
        tok = load_tokenizer(VOCAB_DIR / f"ggml-vocab-{name}.gguf")
        for text, expected in read_vectors(name):
            assert tok.decode(expected) == text, (name, text)


def test_model_defaults_follow_llamacpp() -> None:
    spm = load_tokenizer(VOCAB_DIR / "ggml-vocab-llama-spm.gguf")
    assert (spm.bos_id, spm.eos_id, spm.add_bos_default) == (1, 2, True)
    assert spm.encode("Hello")[:1] == [1]
    bpe = load_tokenizer(VOCAB_DIR / "ggml-vocab-llama-bpe.gguf")
    # llama.cpp adds BOS for the llama-bpe pre-tokenizer even though the file does not say.
    assert (bpe.bos_id, bpe.eos_id, bpe.add_bos_default) == (128000, 128001, True)
    assert bpe.stop_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
    gpt2 = load_tokenizer(VOCAB_DIR / "ggml-vocab-gpt-2.gguf")
    assert gpt2.add_bos_default is False
    assert gpt2.encode("Hello world") == [15496, 995]


def test_special_tokens_are_parsed_only_when_asked() -> None:
    tok = load_tokenizer(VOCAB_DIR / "ggml-vocab-llama-spm.gguf")
    # llama.cpp gives the text after a special token its own dummy-prefix space.
    assert tok.encode("<s>Hello</s>", add_bos=False) == [1, 15043, 2]
    plain = tok.encode("<s>Hello", add_bos=False, special=False)
    assert 1 not in plain and tok.decode(plain) == "<s>Hello"
    # SentencePiece's decode drops control tokens; special=True renders them (llama.cpp).
    assert tok.decode([1, 15043, 2], special=False) == "Hello"
    assert tok.decode([1, 15043, 2]) == "<s> Hello</s>"
