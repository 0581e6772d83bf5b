"""Llama 3's tiktoken tokenizer against Meta's own tests and llama.cpp's Llama 3 vocabulary.

The tokenizer.model is the one Meta ships in the `llama-models` package, located at run
time; the expected ids are copied from Meta's test (llama_models/llama3/tests/api/
test_tokenizer.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import write_vocab_gguf

from llamalab import load_tokenizer
from llamalab.gguf.header import read_gguf_metadata
from llamalab.tokenizer import Tokenizer
from llamalab.tokenizer.gguf_vocab import tiktoken_merges

LLAMA_BPE_GGUF = (
    Path(__file__).parent
    / "fixtures"
    / "tokenizer"
    / "llamacpp-vocab"
    / "ggml-vocab-llama-bpe.gguf"
)


def _meta_tokenizer_model() -> Path | None:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


META_MODEL = _meta_tokenizer_model()
pytestmark = pytest.mark.skipif(META_MODEL is None, reason="llama-models is not installed")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(META_MODEL)


def test_meta_special_tokens(tok: Tokenizer) -> None:
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == 128256
    assert tok.special_tokens["<|begin_of_text|>"] == 128000
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    # Meta's stop tokens: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
    assert tok.stop_ids == {128001, 128008, 128009}


def test_meta_encode_decode(tok: Tokenizer) -> None:
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("This is a test sentence.", add_bos=True, add_eos=True) == ids
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tok.encode("This is a test sentence.") == ids[:-1]  # BOS by default, as Meta generates


def test_meta_encode_message(tok: Tokenizer) -> None:
    # ChatFormat.encode_message(user "This is a test sentence."): header, content, <|eot_id|>.
    text = tok.apply_chat_template(
        [{"role": "user", "content": "This is a test sentence."}], add_generation_prompt=False
    )
    assert text.startswith("<|begin_of_text|>")
    ids = tok.encode(text[len("<|begin_of_text|>") :], add_bos=False)
    assert ids == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]


def test_meta_encode_dialog(tok: Tokenizer) -> None:
    """ChatFormat.encode_dialog_prompt: the built-in Llama 3 template, encoded, with one BOS."""
    assert tok.chat_template is not None and tok.chat_template.name == "llama3"
    messages = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    expected = [
        128000,
        128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip
    assert tok.encode_chat(messages) == expected  # never two BOS: the template starts with one


def test_merges_recovered_from_ranks_equal_llamacpp_vocabulary(tok: Tokenizer) -> None:
    """Meta's ranks → tokens and merges, exactly as llama.cpp's ggml-vocab-llama-bpe.gguf holds them."""
    ref = read_gguf_metadata(LLAMA_BPE_GGUF)
    assert tiktoken_merges(tok.mergeable_ranks) == ref["tokenizer.ggml.merges"]  # type: ignore[attr-defined]
    assert [tok.id_to_piece(i) for i in range(128000)] == ref["tokenizer.ggml.tokens"][:128000]


def test_export_to_gguf_tokenizes_like_tiktoken(tok: Tokenizer, tmp_path: Path) -> None:
    """Meta folder → add_vocab_to_gguf → our GGUF BPE path gives tiktoken's ids."""
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(META_MODEL.read_bytes())  # type: ignore[union-attr]
    (folder / "params.json").write_text('{"dim": 64}')
    out = write_vocab_gguf(tmp_path / "vocab.gguf", folder)
    exported = load_tokenizer(out)
    assert exported.kind == "bpe" and exported.vocab_size == 128256
    assert (exported.bos_id, exported.eos_id, exported.add_bos_default) == (128000, 128001, True)
    texts = [
        "This is a test sentence.",
        "  leading spaces, trailing\t\n\n",
        "Café crème, naïve — 日本語も少し。 🌞🎉 don't I'M we'LL 12345678",
        "def f(x):\n    return x**2  # square\r\n",
        "<|eot_id|> in text <|start_header_id|>",
    ]
    enc = tok.backend  # type: ignore[attr-defined]  # the tiktoken.Encoding itself: the reference
    for text in texts:
        assert exported.encode(text, add_bos=False) == enc.encode(text, allowed_special="all"), text
        assert exported.encode(text, add_bos=False, special=False) == enc.encode_ordinary(text), (
            text
        )
        assert tok.encode(text, add_bos=False) == enc.encode(text, allowed_special="all"), text
