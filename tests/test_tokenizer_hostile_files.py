"""Hostile tokenizer.json and tiktoken files: one clear error each, never a Rust panic.

`tokenizers` and `tiktoken` are Rust libraries; a panic in them surfaces as
``pyo3_runtime.PanicException``, a ``BaseException`` that ``except Exception`` misses,
and some panics abort the whole process. Each file here once panicked, aborted, raised
a bare ``Exception`` or gave a misleading message.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llamalab.errors import LlamalabError
from llamalab.tokenizer import load_tokenizer

# A minimal byte-level BPE tokenizer.json, in the shape `tokenizers` writes.
BASE: dict[str, Any] = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    },
    "post_processor": None,
    "decoder": {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    },
    "model": {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {"a": 0, "b": 1, "ab": 2},
        "merges": ["a b"],
    },
}


def _model(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw["model"].update(changes)
    return raw


def _special(token: str) -> dict[str, Any]:
    return {"SpecialToken": {"id": token, "type_id": 0}}


HOSTILE_JSON = {
    # tokenizers: "range end index 2 out of range for slice of length 1" (a panic).
    "merge makes no token": (
        _model(vocab={"a": 0, "b": 1}),
        r"merge 0 of model\.merges, 'a b', makes 'ab', which is not in the vocabulary",
    ),
    "merge as a pair makes no token": (
        _model(vocab={"a": 0, "b": 1, "c": 2}, merges=[["a", "b"]]),
        r"merge 0 of model\.merges, 'a b', makes 'ab', which is not in the vocabulary",
    ),
    # The merge's rank, as tokenizers counts it, skips a merges.txt header.
    "second merge makes no token": (
        _model(vocab={"a": 0, "b": 1, "ab": 2, "c": 3}, merges=["#version: 0.2", "a b", "ab c"]),
        r"merge 1 of model\.merges, 'ab c', makes 'abc'",
    ),
    "merge of a missing token": (
        _model(merges=["a c"]),
        r"merge 0 of model\.merges, 'a c', uses 'c', which is not in the vocabulary",
    ),
    "merge of three parts": (_model(merges=["a b c"]), r"merge 0 .* is not two tokens"),
    # Panics: the second part is shorter than the prefix tokenizers drops from it.
    "merge shorter than the subword prefix": (
        _model(continuing_subword_prefix="##"),
        r"merge 0 of model\.merges, 'a b', has a second part that cannot lose the 2 bytes",
    ),
    # Aborts the process: the prefix cut falls inside a UTF-8 character.
    "subword prefix cut inside a character": (
        _model(
            continuing_subword_prefix="#",
            vocab={"a": 0, "\u00e9": 1, "a\u00a9": 2},
            merges=["a \u00e9"],
        ),
        r"merge 0 .* cannot lose the 1 bytes of continuing_subword_prefix '#'",
    ),
    # A bare Exception from tokenizers, not a LlamalabError.
    "two tokens with one id": (
        _model(vocab={"a": 0, "b": 0, "ab": 2}),
        r"duplicate ids in model\.vocab: 'a' and 'b' are both id 0",
    ),
    "a far id": (
        _model(vocab={"a": 0, "b": 1, "ab": 2**32 - 1}),
        r"token 'ab' has id 4294967295, far outside the vocabulary of 3 tokens",
    ),
    # Loads, then a bare Exception at the first character that is no token.
    "unknown token not in the vocabulary": (
        _model(unk_token="<unk>"),
        r"model\.unk_token '<unk>' is not in model\.vocab",
    ),
    "duplicate Unigram pieces": (
        {
            **copy.deepcopy(BASE),
            "pre_tokenizer": None,
            "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"},
            "model": {"type": "Unigram", "unk_id": 0, "vocab": [["a", 0.0], ["b", -1], ["a", -2]]},
        },
        r"duplicate tokens in model\.vocab: 'a' is entry 0 and entry 2",
    ),
    # tokenizers: "no entry found for key" (a panic) at the first encode.
    "post-processor inserts an undefined token": (
        {
            **copy.deepcopy(BASE),
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [_special("<s>"), {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [],
                "special_tokens": {},
            },
        },
        r"post_processor\.single inserts '<s>', which post_processor\.special_tokens does not",
    ),
}


def _write_json(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(("raw", "message"), HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
def test_hostile_tokenizer_json_is_one_clear_error(
    tmp_path: Path, raw: dict[str, Any], message: str
) -> None:
    path = _write_json(tmp_path, raw)
    with pytest.raises(LlamalabError, match=rf"^{path}: {message}"):
        load_tokenizer(path)


def test_a_token_listed_twice_in_the_json(tmp_path: Path) -> None:
    # JSON parsers keep the last of two equal keys: "a" would silently lose id 0.
    text = json.dumps(BASE).replace('"vocab": {"a": 0,', '"vocab": {"a": 0, "a": 3,')
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LlamalabError, match=r"duplicate tokens in model\.vocab: 'a' is listed"):
        load_tokenizer(path)


def test_file_truncation_and_padding_do_not_apply(tmp_path: Path) -> None:
    # A stride not below max_length panicked at the first encode; a max_length cut every
    # prompt. transformers' encode neither truncates nor pads unless asked.
    raw = copy.deepcopy(BASE)
    raw["truncation"] = {
        "direction": "Right",
        "max_length": 1,
        "strategy": "LongestFirst",
        "stride": 5,
    }
    raw["padding"] = {
        "strategy": {"Fixed": 100},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "a",
    }
    tok = load_tokenizer(_write_json(tmp_path, raw))
    assert tok.encode("abab ab") == [2, 2, 2]  # three "ab" tokens, as the merge makes


def test_ids_with_gaps_decode(tmp_path: Path) -> None:
    # An id past the count of tokens once came back from encode and failed in decode.
    tok = load_tokenizer(_write_json(tmp_path, _model(vocab={"a": 0, "b": 1, "ab": 5})))
    ids = tok.encode("abab")
    assert ids == [5, 5]
    assert tok.decode(ids) == "abab"


def test_a_panic_never_escapes_in_a_fresh_process(tmp_path: Path) -> None:
    """The reported case, run where an abort or a stray PanicException would show."""
    path = _write_json(tmp_path, _model(vocab={"a": 0, "b": 1}))
    code = (
        "import sys\n"
        "from llamalab.errors import LlamalabError\n"
        "from llamalab.tokenizer import load_tokenizer\n"
        "try:\n"
        "    load_tokenizer(sys.argv[1])\n"
        "except LlamalabError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "makes 'ab', which is not in the vocabulary" in done.stdout
    assert "panicked" not in done.stderr


# ---------------------------------------------------------------- tiktoken


def _write_tiktoken(tmp_path: Path, tokens: list[bytes]) -> Path:
    path = tmp_path / "tokenizer.model"
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)]
    path.write_text("".join(lines), encoding="ascii")
    return path


BYTES = [bytes([b]) for b in range(256)]


def test_tiktoken_missing_single_bytes_is_refused_at_load(tmp_path: Path) -> None:
    # Ranks 0..N without gaps, but no token for 0xc3 (the first byte of "é"): this
    # loaded, then tiktoken panicked ("no entry found for key") encoding "é".
    tokens = [b for b in BYTES if b not in (b"\xc3", b"\xff")] + [b"ab"]
    with pytest.raises(
        LlamalabError, match=r"2 of the 256 single bytes are not tokens \(0xc3, 0xff\)"
    ):
        load_tokenizer(_write_tiktoken(tmp_path, tokens))


def test_tiktoken_duplicate_token_is_named(tmp_path: Path) -> None:
    path = _write_tiktoken(tmp_path, [*BYTES, b"ab", b"ab"])
    with pytest.raises(
        LlamalabError, match=rf"^{path}:258: duplicate token b'ab' \(YWI=\), already on line 257"
    ):
        load_tokenizer(path)


def test_tiktoken_duplicate_rank_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(BYTES)]
    lines += ["YWI= 256\n", "Y2Q= 256\n"]  # "ab" and "cd", both rank 256
    path.write_text("".join(lines), encoding="ascii")
    with pytest.raises(LlamalabError, match=r"duplicate rank 256: tokens b'ab' \(line 257\)"):
        load_tokenizer(path)


def test_tiktoken_complete_file_still_encodes(tmp_path: Path) -> None:
    tok = load_tokenizer(_write_tiktoken(tmp_path, [*BYTES, b"ab"]))
    # "é" is two bytes, each its own rank; "ab" is rank 256; BOS is the first special.
    assert tok.encode("ab\u00e9") == [257, 256, 0xC3, 0xA9]
