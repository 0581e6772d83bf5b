"""SentencePiece: a model trained here with LLaMA's settings gives the same ids through
the `sentencepiece` library and through our GGUF ``llama`` vocabulary path."""

from __future__ import annotations

import io
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from conftest import write_vocab_gguf
from hypothesis import example, given, settings
from hypothesis import strategies as st

from llamalab import load_tokenizer

TRAINING_TEXT = [
    "LLaMA is a collection of foundation language models ranging from 7B to 65B parameters.",
    "We train our models on trillions of tokens, and show that it is possible to train",
    "state-of-the-art models using publicly available datasets exclusively.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Café crème, naïve façade, jalapeño — São Paulo. Zürich über alles.",
    "日本語も少し。 你好，世界！ Ωμέγα ß ñ",
    "    indented code(x) -> y  # comment",
] * 4

SAMPLES = [
    "",
    "Hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "digits 3.14159 and 1,000,000",
    "unseen characters: 🙂👍🏽 ∮ ⌘ \x00 \x7f",
    "new\nlines\n\n\tand tabs",
    "Café crème 日本語",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SentencePiece model with LLaMA's settings, its Meta folder and exported GGUF."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT),
        model_writer=buf,
        model_type="bpe",
        vocab_size=400,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        num_threads=1,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("meta")
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "params.json").write_text('{"dim": 64, "vocab_size": 400}')
    out = write_vocab_gguf(folder.parent / "trained-vocab.gguf", folder)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp, load_tokenizer(folder), load_tokenizer(out)


def test_trained_model_has_llama_settings(trained) -> None:
    sp, from_file, from_gguf = trained
    assert sp.vocab_size() == from_file.vocab_size == from_gguf.vocab_size == 400
    assert from_gguf.kind == from_file.kind == "sentencepiece"
    pieces = [sp.id_to_piece(i) for i in sp.encode("1234567890")]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)  # split_digits
    assert "∮" not in "".join(TRAINING_TEXT)
    assert [sp.is_byte(i) for i in sp.encode("∮")] == [
        False,
        True,
        True,
        True,
    ]  # "▁", then byte fallback


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_path_equals_sentencepiece(trained, text: str) -> None:
    sp, from_file, from_gguf = trained
    expected = [sp.bos_id(), *sp.encode(text)]
    assert from_file.encode(text) == expected
    assert from_gguf.encode(text) == expected
    assert from_gguf.decode(expected, special=False) == sp.decode(expected)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
@example("</s>")
def test_gguf_path_equals_sentencepiece_random(trained, text: str) -> None:
    sp, _, from_gguf = trained
    ids = sp.encode(text)
    # The library never parses special-token text ("</s>"): compare with that parsing off.
    assert from_gguf.encode(text, add_bos=False, special=False) == ids
    assert from_gguf.decode(ids) == sp.decode(ids)


def test_gguf_keys_are_what_llamacpp_reads(trained, tmp_path: Path) -> None:
    sp, from_file, _ = trained
    path = write_vocab_gguf(tmp_path / "v.gguf", from_file.source)
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == sp.bos_id()
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == sp.eos_id()
    assert int(fields["tokenizer.ggml.unknown_token_id"].parts[-1][0]) == sp.unk_id()
    scores = [
        float(fields["tokenizer.ggml.scores"].parts[i][0])
        for i in fields["tokenizer.ggml.scores"].data
    ]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.vocab_size())])
