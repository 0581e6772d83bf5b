"""Converted checkpoints carry their tokenizer and run: GGUF → HF → Meta → GGUF.

At every stop the token ids, the chat template and the greedy text equal the source's,
and transformers' ``AutoTokenizer`` reads the Hugging Face folder to the same ids.
"""

from __future__ import annotations

import json
import stat

import pytest
from conftest import FIXTURES, run_cli
from test_cli_hostile import tiny_model_with_template

from llamalab import load_tokenizer
from llamalab.checkpoint.convert import convert

TEXTS = [
    "Hello, llamas of the Andes! 12345 + 678 = 13023",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ünïcödé: 日本語のテキスト, emoji 🦙🙂 and ÿ",
    "<|im_start|>user\nHi<|im_end|>",
    "</s><s> [INST] a <<SYS>>",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a llama?"},
]


def same_tokenizer(a, b) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert a.encode(text, special=special) == b.encode(text, special=special), text
    assert (a.bos_id, a.eos_id, a.stop_ids) == (b.bos_id, b.eos_id, b.stop_ids)
    assert a.encode_chat(MESSAGES) == b.encode_chat(MESSAGES)


def greedy_ids(model) -> list[int]:
    result = run_cli(
        "generate", "--model", str(model), "--chat", "-p", "Name a colour.", "-n", "8",
        "--temperature", "0", "--dtype", "float32", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["ids"]


def test_smollm2_round_trip_keeps_the_tokenizer(smollm2_path, tmp_path):
    source = load_tokenizer(smollm2_path)
    hf = convert(smollm2_path, tmp_path / "hf", to="hf")
    meta = convert(hf, tmp_path / "meta", to="meta")
    back = convert(meta, tmp_path / "back.gguf", to="gguf")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in hf.iterdir()}
    for stop in (hf, meta, back):
        same_tokenizer(source, load_tokenizer(stop))
    for path in [*hf.iterdir(), *meta.iterdir(), back]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # readable by others

    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert auto(text, add_special_tokens=False).input_ids == source.encode(text), text
    rendered = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == source.apply_chat_template(MESSAGES)

    expected = greedy_ids(smollm2_path)
    for stop in (hf, meta, back):
        assert greedy_ids(stop) == expected, stop


def test_sentencepiece_vocabulary_round_trip(tmp_path):
    vocab = FIXTURES / "tokenizer" / "llamacpp-vocab" / "ggml-vocab-llama-spm.gguf"
    model = tiny_model_with_template(
        tmp_path / "spm.gguf", vocab, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    source = load_tokenizer(model)
    hf = convert(model, tmp_path / "hf", to="hf")
    assert (hf / "tokenizer.model").is_file()
    meta = convert(hf, tmp_path / "meta", to="meta")
    back = convert(meta, tmp_path / "back.gguf", to="gguf")
    for stop in (hf, meta, back):
        same_tokenizer(source, load_tokenizer(stop))
    expected = greedy_ids(model)
    for stop in (hf, meta, back):
        assert greedy_ids(stop) == expected, stop


@pytest.mark.parametrize("name", ["tiktoken", "llama-bpe", "gpt-2"])
def test_every_backend_writes_files_that_load_back_the_same(tmp_path, name):
    from llamalab.tokenizer.export import write_tokenizer_files

    vocab = FIXTURES / "tokenizer" / "llamacpp-vocab"
    if name == "tiktoken":
        from test_tokenizer_llama3 import META_MODEL

        if META_MODEL is None:
            pytest.skip("llama-models is not installed")
        source = load_tokenizer(META_MODEL)
    else:
        source = load_tokenizer(vocab / f"ggml-vocab-{name}.gguf")
    folder = tmp_path / name
    folder.mkdir()
    written = write_tokenizer_files(source, folder, context_length=4096)
    assert (folder / "tokenizer_config.json").is_file() and len(written) == 2
    reloaded = load_tokenizer(folder)
    for text in TEXTS:
        for special in (True, False):
            assert reloaded.encode(text, special=special) == source.encode(text, special=special)
