"""`llamalab data prepare`: shards equal direct tokenization, EOS between documents, manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from llamalab.data import TokenShards, parse_sources, prepare, token_dtype
from llamalab.data.prepare import iter_documents
from llamalab.errors import LlamalabError
from llamalab.tokenizer import load_tokenizer
from llamalab.tokenizer.trainer import train_tokenizer

BOOKS = {
    "a.txt": "It was the best of times, it was the worst of times.\n\nChapter 2\nNo 42.\n",
    "sub/b.txt": "Call me Ishmael. Some years ago — never mind how long precisely —\n",
}
CODE = {
    "x.py": "def f(x):\n    return x + 1  # </s> here is text, not EOS\n",
    "y.py": "print('héllo wörld', 12345)\n\n\n",
}


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tok")
    text = "\n".join([*BOOKS.values(), *CODE.values()] * 30)
    text += "\n" + " ".join(f"word{i} number {i * 7}" for i in range(2000))
    (base / "corpus.txt").write_text(text, encoding="utf-8")
    train_tokenizer([base / "corpus.txt"], 400, base / "tok", threads=2)
    return base / "tok"


def test_shards_equal_direct_tokenization(tokenizer, tmp_path):
    books = write(tmp_path / "books", BOOKS)
    code = write(tmp_path / "code", CODE)
    out = tmp_path / "data"
    sources = parse_sources([f"books={books}", f"code={code}/*.py"])
    manifest = prepare(sources, tokenizer, out, workers=1, progress=False)

    tok = load_tokenizer(tokenizer)
    shards = TokenShards(out)
    for name, files in (("books", ["a.txt", "sub/b.txt"]), ("code", ["x.py", "y.py"])):
        texts = [(BOOKS | CODE)[f] for f in files]
        expected = [t for text in texts for t in tok.encode(text, add_eos=True, special=False)]
        got = shards.sources[name].tokens
        assert got.dtype == np.uint16
        assert got.tolist() == expected
        # Documents: each starts with BOS and ends with EOS, EOS only there.
        eos = [i for i, t in enumerate(got.tolist()) if t == tok.eos_id]
        assert len(eos) == len(files) and eos[-1] == len(got) - 1
        info = manifest["sources"][name]
        assert info["tokens"] == len(expected) and info["documents"] == len(files)
        assert [Path(i["path"]).name for i in info["inputs"]] == [Path(f).name for f in files]
        for entry in info["inputs"]:
            data = Path(entry["path"]).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["bytes"] == len(data)
    # "</s>" inside a file is text: no control token but the final EOS.
    assert shards.sources["code"].tokens.tolist().count(tok.eos_id) == 2

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["dtype"] == "uint16" and on_disk["total_tokens"] == sum(shards.sizes().values())
    tok_file = out / "tokenizer" / "tokenizer.model"
    assert on_disk["tokenizer"]["sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert on_disk["tokenizer"]["vocab_size"] == 400
    assert load_tokenizer(out / "tokenizer").encode("Call me") == tok.encode("Call me")


def test_workers_do_not_change_the_result(tokenizer, tmp_path):
    books = write(tmp_path / "books", BOOKS)
    code = write(tmp_path / "code", CODE)
    specs = [f"books={books}", f"code={code}"]
    one = prepare(parse_sources(specs), tokenizer, tmp_path / "one", workers=1, progress=False)
    two = prepare(parse_sources(specs), tokenizer, tmp_path / "two", workers=2, progress=False)
    assert one["sources"] == two["sources"]
    for name in ("books", "code"):
        assert (tmp_path / "one" / f"{name}.bin").read_bytes() == (
            tmp_path / "two" / f"{name}.bin"
        ).read_bytes()


def test_big_files_are_cut_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i} " + "text " * 20 + "\n" for i in range(10)]
    f = tmp_path / "big.txt"
    f.write_text("\n".join(paragraphs), encoding="utf-8")
    docs = list(iter_documents(f, doc_chars=200))
    assert "".join(docs) == f.read_text()
    assert len(docs) > 3
    assert all(d.endswith("\n\n") for d in docs[:-1])  # cut right after a blank line
    long_line = tmp_path / "one_line.txt"
    long_line.write_text("x" * 3000)
    assert [len(d) for d in iter_documents(long_line, doc_chars=300)] == [1200, 1200, 600]


def test_output_folder_rules(tokenizer, tmp_path):
    books = write(tmp_path / "books", BOOKS)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(LlamalabError, match="not empty"):
        prepare(parse_sources([f"b={books}"]), tokenizer, busy, workers=1, progress=False)
    assert (busy / "mine.txt").read_text() == "keep"
    out = tmp_path / "data"
    prepare(parse_sources([f"b={books}"]), tokenizer, out, workers=1, progress=False)
    prepare(parse_sources([f"c={books}"]), tokenizer, out, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["c.bin", "manifest.json", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_bad_sources_are_clear_errors(tmp_path):
    for spec, match in (
        ("nameonly", "NAME=PATH"),
        ("../x=foo", "source name"),
        (f"a={tmp_path}/missing", "no such file"),
        (f"a={tmp_path}/*.nothing", "names no files"),
    ):
        with pytest.raises(LlamalabError, match=match):
            parse_sources([spec])
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(LlamalabError, match="twice"):
        parse_sources([f"a={tmp_path}/f.txt", f"a={tmp_path}/f.txt"])


def test_token_type_follows_the_vocabulary():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.uint32


def test_cli_prepare(tokenizer, tmp_path, capsys):
    from llamalab.cli import main

    books = write(tmp_path / "books", BOOKS)
    out = tmp_path / "data"
    args = ["data", "prepare", "--tokenizer", str(tokenizer), "--out", str(out), f"books={books}"]
    assert main([*args, "--workers", "1"]) == 0
    assert "books:" in capsys.readouterr().out
    assert TokenShards(out).sizes()["books"] > 0
    assert main(["data", "prepare", "--tokenizer", str(tokenizer), "--out", str(out), "bad"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NAME=PATH" in err[0]
