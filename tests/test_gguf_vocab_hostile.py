"""Forged GGUF vocabularies: one clear error naming the problem, never a Rust panic.

The rules are the references': llama.cpp names each empty token ``[EMPTY_<id>]`` and then
stops on any two equal tokens (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``
in llama-vocab.cpp), and `tokenizers` refuses a BPE merge whose result is not a token
(``MergeTokenOutOfVocabulary``) — handed one directly, it panics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
from test_gguf_hostile import ARRAY, BOOL, I32, STRING, U32, build, kv, reencode

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError
from llamalab.gguf.header import read_gguf_metadata

NORMAL, CONTROL = 1, 3


def vocab_file(path: Path, model: str, tokens: list, *extra: bytes, merges=None) -> Path:
    """A vocabulary-only GGUF: ``tokens`` as an array of strings unless they are ints."""
    sub = I32 if tokens and isinstance(tokens[0], int) else STRING
    kvs = [
        kv("general.architecture", STRING, "llama"),
        kv("tokenizer.ggml.model", STRING, model),
        kv("tokenizer.ggml.tokens", ARRAY, tokens, sub),
        *extra,
    ]
    if model == "gpt2":
        kvs.append(kv("tokenizer.ggml.pre", STRING, "gpt-2"))
        if merges is not None:
            msub = I32 if merges and isinstance(merges[0], int) else STRING
            kvs.append(kv("tokenizer.ggml.merges", ARRAY, merges, msub))
    path.write_bytes(build(kvs))
    return path


@pytest.fixture(scope="module")
def smollm2_all_one_token(smollm2_path: Path, tmp_path_factory) -> Path:
    """SmolLM2's file with every one of its 49,152 tokens set to the same text."""
    n = len(read_gguf_metadata(smollm2_path)["tokenizer.ggml.tokens"])
    out = tmp_path_factory.mktemp("forged") / "same-token.gguf"
    return reencode(smollm2_path, out, {"tokenizer.ggml.tokens": (ARRAY, ["a"] * n, STRING)})


def test_info_names_the_duplicate_tokens(smollm2_all_one_token: Path) -> None:
    # `info` describes the model and reports the tokenizer's error as one line of its own.
    result = run_cli("info", str(smollm2_all_one_token))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "panicked" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("tokenizer error")]
    assert len(errors) == 1, result.stdout
    assert "duplicate tokens in the vocabulary" in errors[0]
    assert "'a' is token 0 and token 1; 49151 duplicates in all" in errors[0]


def test_tokenize_stops_with_one_error_line(smollm2_all_one_token: Path) -> None:
    result = run_cli("tokenize", "-m", str(smollm2_all_one_token), "hello")
    assert result.returncode == 1
    expected = (
        f"llamalab: error: {smollm2_all_one_token}: duplicate tokens in the vocabulary "
        "(tokenizer.ggml.tokens): 'a' is token 0 and token 1; 49151 duplicates in all"
    )
    assert result.stderr.strip().splitlines() == [expected]


BPE = ["a", "b", "ab", "Ġ", "Ġa"]


@pytest.mark.parametrize(
    ("model", "tokens", "merges", "extra", "needle"),
    [
        # The panic of the forged SmolLM2 file, small: one token, and a merge of it with itself.
        ("gpt2", ["x"] * 100, ["x x"], [], "'x' is token 0 and token 1; 99 duplicates in all"),
        ("gpt2", [*BPE, "b"], ["a b"], [], "'b' is token 1 and token 5"),
        (
            "llama",
            ["<unk>", "<s>", "</s>", "▁a", "b", "▁a"],
            None,
            [],
            "'▁a' is token 3 and token 5",
        ),
        # llama.cpp's name for an empty token counts as a token of its own.
        ("gpt2", [*BPE, "", "[EMPTY_5]"], [], [], "'[EMPTY_5]' is token 5 and token 6"),
        ("gpt2", [], [], [], "the vocabulary (tokenizer.ggml.tokens) is empty"),
        ("llama", [], None, [], "the vocabulary (tokenizer.ggml.tokens) is empty"),
        ("gpt2", ["a", "b"], ["a b"], [], "merge 0 of tokenizer.ggml.merges, 'a b', makes 'ab'"),
        ("gpt2", BPE, ["a b", "b a"], [], "merge 1 of tokenizer.ggml.merges, 'b a', makes 'ba'"),
        ("gpt2", [0, 1, 2], [], [], "tokenizer.ggml.tokens must be an array of strings"),
        ("llama", [0, 1, 2], None, [], "tokenizer.ggml.tokens must be an array of strings"),
        ("gpt2", BPE, [1, 2], [], "tokenizer.ggml.merges must be an array of strings"),
        (
            "gpt2",
            BPE,
            ["a b"],
            [kv("tokenizer.ggml.token_type", ARRAY, ["x"] * 5, STRING)],
            "tokenizer.ggml.token_type must be an array of integers",
        ),
        (
            "llama",
            ["<unk>", "a"],
            None,
            [kv("tokenizer.ggml.scores", ARRAY, ["x", "y"], STRING)],
            "tokenizer.ggml.scores must be an array of numbers",
        ),
        (
            "gpt2",
            BPE,
            ["a b"],
            [kv("tokenizer.ggml.bos_token_id", STRING, "one")],
            "tokenizer.ggml.bos_token_id must be an integer",
        ),
        (
            "llama",
            ["<unk>", "a"],
            None,
            [kv("tokenizer.ggml.add_bos_token", ARRAY, [1, 0], U32)],
            "tokenizer.ggml.add_bos_token must be a boolean",
        ),
    ],
)
def test_forged_vocabularies_fail_with_one_error(
    tmp_path: Path, model, tokens, merges, extra, needle
) -> None:
    path = vocab_file(tmp_path / "vocab.gguf", model, tokens, *extra, merges=merges)
    # A Rust panic is a BaseException; pytest.raises(LlamalabError) lets it through.
    with pytest.raises(LlamalabError) as caught:
        load_tokenizer(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert needle in message, message
    assert "\n" not in message


def test_what_llamacpp_accepts_still_loads(tmp_path: Path) -> None:
    """Empty tokens (llama.cpp renames each after its id) and merges of non-tokens load."""
    tokens = [*BPE, "", "", "<s>"]
    types = [NORMAL] * 7 + [CONTROL]
    path = vocab_file(
        tmp_path / "vocab.gguf",
        "gpt2",
        tokens,
        kv("tokenizer.ggml.token_type", ARRAY, types, I32),
        kv("tokenizer.ggml.add_bos_token", BOOL, True),
        kv("tokenizer.ggml.bos_token_id", U32, 7),
        # "z y" joins two non-tokens: it never fires, and llama.cpp keeps it harmlessly.
        merges=["a b", "Ġ a", "z y"],
    )
    tok = load_tokenizer(path)
    assert tok.encode("ab a") == [7, 2, 4]


@pytest.mark.parametrize(
    ("merges", "kept"),
    [
        # The usual vocabulary: settled by the whole-list passes.
        (["a b", "ab c"], [("a", "b"), ("ab", "c")]),
        # A second space belongs to the right part; a leading space is no split point.
        (["a  c", " ab", "a b"], [("a", " c"), ("a", "b")]),
        # A newline in a part (the loop's case); no space or a part that is not a
        # token: skipped.
        (["ab", "a\nb c", "q b", "a b"], [("a\nb", "c"), ("a", "b")]),
        # As many spaces as merges, but two in one and none in another: no pairing
        # across merges ("c ab" is not a merge).
        (["a b c", "ab"], []),
    ],
)
def test_merges_split_as_llamacpp_splits_them(merges, kept) -> None:
    from llamalab.tokenizer.bpe import _usable_merges

    vocab = {
        t: i
        for i, t in enumerate(["a", "b", "c", "ab", "abc", "cab", " c", "a c", "a\nb", "a\nbc"])
    }
    assert _usable_merges(merges, vocab, "x") == kept
