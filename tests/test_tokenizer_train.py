"""`llamalab tokenizer train`: the paper's SentencePiece settings, and ids identical everywhere."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from llamalab.errors import LlamalabError
from llamalab.tokenizer import load_tokenizer
from llamalab.tokenizer.spm import BYTE, CONTROL, UNKNOWN, parse_model_proto
from llamalab.tokenizer.trainer import train_tokenizer

VOCAB = 600

# Text that exercises what the settings are about: digits, scripts, whitespace runs,
# characters too rare to get a piece (byte fallback), text that NFKC would change.
VARIED = [
    "Hello world",
    "The year 1984 had 365 days; pi is 3.14159 and 1,000,000 is a million.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\tnew\nlines\n\n\nand    runs     of   spaces",
    "naïve café résumé — “quotes” ‘single’ … ellipsis",
    "Привет, мир! Γειά σου κόσμε. 東京は日本の首都です。",
    "ｆｕｌｌｗｉｄｔｈ ① ﬁ ligature x²",  # identity normalisation keeps these
    "emoji 🦙🦙 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # byte fallback
    "def f(x):\n    return x ** 2  # comment",
    "</s> <s> <unk> are text here",
    "",
    " ",
    "a",
]


def write_corpus(folder: Path) -> Path:
    """A few hundred KB of real text: Python's own standard library sources."""
    folder.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:25]
    (folder / "code.txt").write_text(
        "".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8"
    )
    (folder / "extra.txt").write_text("\n".join(VARIED * 20), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(base / "corpus")
    model = train_tokenizer([corpus], VOCAB, base / "out", threads=2)
    assert model == base / "out" / "tokenizer.model"
    return base / "out"


def test_settings_are_llamas(trained):
    m = parse_model_proto((trained / "tokenizer.model").read_bytes(), "trained")
    assert len(m.pieces) == VOCAB
    assert m.model_type == 2  # BPE
    assert m.byte_fallback
    assert m.add_dummy_prefix and not m.remove_extra_whitespaces
    assert m.pieces[:3] == ["<unk>", "<s>", "</s>"]
    assert m.types[:3] == [UNKNOWN, CONTROL, CONTROL]
    assert m.pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(m.types[3:259]) == {BYTE}
    # split_digits: no piece holds two digits.
    normal = [
        p for p, t in zip(m.pieces, m.types, strict=True) if t not in (BYTE, CONTROL, UNKNOWN)
    ]
    assert any(p.strip("\u2581").isdigit() for p in normal)
    assert not [p for p in normal if sum(c.isdigit() for c in p) > 1]
    record = json.loads((trained / "training.json").read_text())
    assert record["settings"]["normalization_rule_name"] == "identity"
    assert record["inputs"] and all(len(i["sha256"]) == 64 for i in record["inputs"])


def test_llamalab_and_sentencepiece_give_the_same_ids(trained):
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    tok = load_tokenizer(trained)
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (1, 2, True)
    for text in VARIED:
        ids = tok.encode(text, add_bos=False, special=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.encode(text, special=False) == [1, *ids]
    # Digits one by one, whitespace and unnormalised characters kept, rare ones as bytes.
    digits = [tok.id_to_piece(i) for i in tok.encode("12345", add_bos=False)]
    assert "".join(digits).replace("\u2581", "") == "12345" and len(digits) >= 5
    for text in VARIED[2:8]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    rare = tok.encode("\ua66e", add_bos=False)  # in no training text: three byte pieces
    assert [tok.id_to_piece(i) for i in rare][-3:] == ["<0xEA>", "<0x99>", "<0xAE>"]
    assert tok.decode(rare) == "\ua66e" == sp.decode(rare)


def test_same_inputs_and_seed_give_the_same_model(trained, tmp_path):
    again = train_tokenizer([trained.parent / "corpus"], VOCAB, tmp_path / "again", threads=2)
    # Not byte for byte: the trainer spec records its (temporary) output path.
    a = parse_model_proto(again.read_bytes(), "again")
    b = parse_model_proto((trained / "tokenizer.model").read_bytes(), "first")
    assert (a.pieces, a.scores, a.types) == (b.pieces, b.scores, b.types)


def test_lines_are_read_with_a_bound(tmp_path):
    from llamalab.tokenizer.trainer import iter_sentences

    f = tmp_path / "t.txt"
    f.write_text("short\r\n" + "x" * 100 + "\nkept\n" + "y" * 30 + "\nend")
    assert list(iter_sentences([f], 40)) == ["short", "kept", "y" * 30, "end"]


def test_output_folder_is_protected(trained, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LlamalabError, match="not empty"):
        train_tokenizer([trained.parent / "corpus"], VOCAB, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(LlamalabError, match="vocab-size"):
        train_tokenizer([trained.parent / "corpus"], 100, tmp_path / "small")
    with pytest.raises(LlamalabError, match="no such file"):
        train_tokenizer([tmp_path / "missing"], VOCAB, tmp_path / "x")


def test_cli_reruns_into_its_own_output(trained, tmp_path, capsys):
    from llamalab.cli import main

    out = tmp_path / "cli"
    corpus = str(trained.parent / "corpus" / "extra.txt")
    args = ["tokenizer", "train", "--input", corpus, "--vocab-size", "400", "--output", str(out)]
    assert main(args) == 0
    assert main(args) == 0  # a previous output of the same kind is replaced
    assert load_tokenizer(out).vocab_size == 400
    assert (
        main(["tokenizer", "train", "--input", corpus, "--vocab-size", "3", "--output", str(out)])
        == 1
    )
    assert "vocab-size" in capsys.readouterr().err


def test_trained_vocabulary_travels_into_gguf_and_llama_cpp_agrees(trained, tmp_path):
    import torch

    from llamalab.checkpoint.convert import convert
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer
    from llamalab.train.export import export_meta

    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB, ffn_hidden_dim=64)
    torch.manual_seed(0)
    model = Transformer(config)
    model.reset_parameters()
    folder = tmp_path / "run"
    folder.mkdir()
    meta = export_meta(model.state_dict(), config, trained, folder)
    gguf_file = convert(meta, tmp_path / "model.gguf", to="gguf", dtype="f32")
    ours = load_tokenizer(trained)
    from_gguf = load_tokenizer(gguf_file)
    for text in VARIED:
        assert from_gguf.encode(text) == ours.encode(text), text

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    for text in VARIED:
        if not text:
            continue
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert theirs == ours.encode(text, add_bos=False, special=False), text
