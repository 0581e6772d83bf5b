"""Instruction data: the four formats, the assistant-only loss mask, rows, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.data.instruct import (
    IGNORE,
    encode_messages,
    load_instruct,
    split_validation,
    to_rows,
)
from llamalab.errors import LlamalabError

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome!\nBye."},
]


def write_jsonl(path, items) -> str:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return str(path)


def chatml_text(messages) -> str:
    """SmolLM2's ChatML rendering, written out here (its template adds a default system turn)."""
    out = ""
    if messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out


def assistant_mask_by_scan(tok, ids: list[int]) -> list[bool]:
    """The assistant mask built from token ids alone: after each ``<|im_start|>assistant\\n``
    header, every token through the next ``<|im_end|>`` and the newline after it."""
    im_start, im_end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
    mask = [False] * len(ids)
    j = 0
    while j < len(ids):
        if ids[j] != im_start:
            j += 1
            continue
        k = j + 1
        while tok.decode([ids[k]]) != "\n":
            k += 1
        role = tok.decode(ids[j + 1 : k])
        j = k + 1
        if role != "assistant":
            continue
        while ids[j] != im_end:
            mask[j] = True
            j += 1
        mask[j] = mask[j + 1] = True  # <|im_end|> and its newline
        assert tok.decode([ids[j + 1]]) == "\n"
        j += 2
    return mask


@pytest.mark.parametrize("with_system", [True, False])
def test_multi_turn_mask_equals_one_built_by_hand(smollm2_tokenizer, with_system):
    tok = smollm2_tokenizer
    messages = CHAT if with_system else CHAT[1:]
    tokens, trained = encode_messages(tok, messages)
    # Tokenized in pieces, the chat is the same tokens as its whole text.
    assert tokens == tok.encode(chatml_text(messages), add_bos=False, special=True)
    assert trained == assistant_mask_by_scan(tok, tokens)
    replies = tok.decode([t for t, m in zip(tokens, trained, strict=True) if m])
    assert replies == "4.<|im_end|>\n6, of course.<|im_end|>\nYou're welcome!\nBye.<|im_end|>\n"
    # The prompt before the first reply is exactly what generation sends the model.
    first = trained.index(True)
    reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert tokens[:first] == tok.encode_chat(messages[:reply], add_generation_prompt=True)


def test_the_four_formats(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    items = [
        {"messages": CHAT},
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "output": "hi"},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {"text": "Plain text trains on every token."},
    ]
    data = load_instruct(write_jsonl(tmp_path / "d.jsonl", items), tok, seq_len=512)
    assert data.formats == {"chat": 1, "alpaca": 2, "sharegpt": 1, "text": 1}
    assert (data.truncated, data.dropped) == (0, 0)
    assert [e.line for e in data.examples] == [1, 2, 3, 4, 5]
    alpaca_with_input = encode_messages(
        tok,
        [
            {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
            {"role": "assistant", "content": "4"},
        ],
    )
    assert (data.examples[1].tokens, data.examples[1].trained) == alpaca_with_input
    # Alpaca without input and ShareGPT say the same conversation: the same tokens.
    assert data.examples[2].tokens == data.examples[3].tokens
    assert data.examples[2].trained == data.examples[3].trained
    text = data.examples[4]
    assert text.tokens == tok.encode("Plain text trains on every token.") + [tok.eos_id]
    assert all(text.trained)
    assert "5 items (1 chat, 2 alpaca, 1 sharegpt, 1 text); 0 truncated, 0 dropped" in (
        data.summary()
    )


def test_over_long_items_are_truncated_or_dropped_and_counted(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    long_reply = " ".join(["word"] * 200)
    items = [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Talk.", "output": long_reply},  # long, truncated inside the reply
        {"instruction": " ".join(["x"] * 200), "output": "y"},  # the reply falls past the cut
        {"text": long_reply},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    kept = load_instruct(path, tok, seq_len=64)
    assert (kept.truncated, kept.dropped) == (3, 1)  # the third lost its only reply
    assert [e.line for e in kept.examples] == [1, 2, 4]
    assert all(len(e) == 65 for e in kept.examples[1:])
    dropped = load_instruct(path, tok, seq_len=64, overflow="drop")
    assert (dropped.truncated, dropped.dropped) == (0, 3)
    assert [e.line for e in dropped.examples] == [1]


def test_rows_hold_shifted_targets_of_trained_tokens_only(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    data = load_instruct(
        write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"text": "short"}]), tok, 96
    )
    inputs, targets = to_rows(data.examples, 96, pad_id=tok.eos_id)
    assert inputs.shape == targets.shape == (2, 96)
    for row, example in enumerate(data.examples):
        n = len(example.tokens) - 1
        assert inputs[row, :n].tolist() == example.tokens[:-1]
        assert (inputs[row, n:] == tok.eos_id).all()
        expected = [t if m else IGNORE for t, m in zip(example.tokens[1:], example.trained[1:])]
        assert targets[row, :n].tolist() == expected
        assert (targets[row, n:] == IGNORE).all()
    assert (targets[0] != IGNORE).sum() == sum(data.examples[0].trained)


def test_validation_split_is_seeded(smollm2_tokenizer, tmp_path):
    items = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    data = load_instruct(write_jsonl(tmp_path / "d.jsonl", items), smollm2_tokenizer, 64)
    train, val = split_validation(data.examples, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert {e.line for e in train} | {e.line for e in val} == set(range(1, 21))
    _, val2 = split_validation(data.examples, 0.2, seed=1)
    assert [e.line for e in val2] == [e.line for e in val]
    assert split_validation(data.examples, 0.0) == (data.examples, [])


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', "", '{"text": "broken"'], r"d\.jsonl:3: not valid JSON"),
        (
            [json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
            r"d\.jsonl:1: no assistant turn",
        ),
        ([json.dumps({"prompt": "a", "completion": "b"})], r"d\.jsonl:1: unknown format"),
        ([], r"d\.jsonl: empty file"),
        (["", "   "], r"d\.jsonl: empty file"),
        (["[1, 2]"], r"d\.jsonl:1: an item must be a JSON object"),
        (
            [json.dumps({"messages": [{"role": "robot", "content": "x"}]})],
            r"d\.jsonl:1: messages\[0\] has role='robot'",
        ),
        (
            [json.dumps({"conversations": [{"from": "alien", "value": "x"}]})],
            r"d\.jsonl:1: conversations\[0\] has from='alien'",
        ),
        ([json.dumps({"text": 5})], r"d\.jsonl:1: text must be a string"),
    ],
)
def test_bad_input_is_one_clear_line(smollm2_tokenizer, tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(LlamalabError, match=message) as info:
        load_instruct(path, smollm2_tokenizer, 64)
    assert "\n" not in str(info.value)


def test_not_utf8_and_not_a_file(smollm2_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(LlamalabError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_instruct(path, smollm2_tokenizer, 64)
    with pytest.raises(LlamalabError, match="not a regular file"):
        load_instruct(tmp_path, smollm2_tokenizer, 64)
    with pytest.raises(LlamalabError, match="no such file"):
        load_instruct(tmp_path / "missing.jsonl", smollm2_tokenizer, 64)


def test_rows_refuse_an_item_longer_than_the_row(smollm2_tokenizer, tmp_path):
    data = load_instruct(
        write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c d e f g"}]), smollm2_tokenizer, 64
    )
    with pytest.raises(LlamalabError, match="longer than seq_len 3"):
        to_rows(data.examples, 3)
    assert torch.is_tensor(to_rows(data.examples, 64)[0])
