"""Format detection from contents, bad input, the `tokenize` CLI and GGUF export of GGUFs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import write_vocab_gguf

from llamalab import load_tokenizer
from llamalab.cli import main
from llamalab.errors import LlamalabError
from llamalab.tokenizer import detect_file_format
from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

VOCAB_DIR = Path(__file__).parent / "fixtures" / "tokenizer" / "llamacpp-vocab"
GPT2 = VOCAB_DIR / "ggml-vocab-gpt-2.gguf"
SPM = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"


def test_detection_ignores_names(tmp_path: Path) -> None:
    odd = tmp_path / "tokenizer.model"  # a GGUF under a SentencePiece name
    shutil.copy(GPT2, odd)
    assert detect_file_format(odd) == "gguf"
    assert load_tokenizer(odd).encode("Hello world") == [15496, 995]
    trained = tmp_path / "vocab.json"  # a SentencePiece model under a JSON name
    sp_tok = load_tokenizer(SPM)
    from llamalab.tokenizer.spm import build_model_proto

    trained.write_bytes(build_model_proto(sp_tok._pieces, sp_tok.scores, sp_tok.token_types))  # type: ignore[attr-defined]
    assert detect_file_format(trained) == "sentencepiece"
    assert load_tokenizer(trained).encode("Hello world") == sp_tok.encode("Hello world")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a tokenizer file"),
        (b"\x00\x01garbage", "not a tokenizer file"),
        (b"GGUF\x03\x00\x00\x00", "truncated"),
        (b"{not json", "not a loadable tokenizer.json"),
        (b"aGVsbG8= 0\naGk= 2\n", "ranks are not"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "tok"
    path.write_bytes(content)
    with pytest.raises(LlamalabError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_missing_and_tokenizerless(tmp_path: Path) -> None:
    with pytest.raises(LlamalabError, match="no such file"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(LlamalabError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bare = write_vocab_gguf(tmp_path / "weights.gguf")
    with pytest.raises(LlamalabError, match="carries no tokenizer"):
        load_tokenizer(bare)
    out = gguf.GGUFWriter(tmp_path / "out.gguf", "llama")
    assert add_vocab_to_gguf(out, bare) is False
    assert add_vocab_to_gguf(out, tmp_path) is False


def test_gguf_to_gguf_copy_keeps_tokenization(tmp_path: Path) -> None:
    out = write_vocab_gguf(tmp_path / "copy.gguf", SPM)
    a, b = load_tokenizer(SPM), load_tokenizer(out)
    text = "Hello wörld 12345 🙂 <s>"
    assert a.encode(text) == b.encode(text) and b.add_bos_default


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(GPT2), "--json", "Hello world<|endoftext|>"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ids": [15496, 995, 50256], "pieces": ["Hello", "Ġworld", "<|endoftext|>"]}
    assert main(["tokenize", "--model", str(GPT2), "--json", "--no-special", "<|endoftext|>"]) == 0
    assert 50256 not in json.loads(capsys.readouterr().out)["ids"]


def test_cli_table_and_bos(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "--model", str(SPM), "Hi"]) == 0
    table = capsys.readouterr().out
    assert "<s>" in table and "▁Hi" in table
    assert main(["tokenize", "--model", str(SPM), "--json", "--no-bos", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"][0] != 1


def test_cli_bad_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["tokenize", "--model", str(tmp_path / "nope"), "x"]) == 1
    assert "no such file" in capsys.readouterr().err
