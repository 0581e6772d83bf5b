"""`llamalab generate --lora PATH[:SCALE]`: PEFT adapters run unmerged on float and packed
bases, with the merged model's greedy tokens; what is not an adapter is one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model
from test_finetune import make_tiny_chat_model

import llamalab
from llamalab.cli import main
from llamalab.train.lora import (
    TARGETS,
    apply_lora,
    load_lora_state_dict,
    lora_adapters,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
)

PROMPT = "The capital of France is"
N = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer) -> dict:
    base = tmp_path_factory.mktemp("lora-generate")
    model_dir = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    model = llamalab.load_model(model_dir)
    apply_lora(model, rank=4, alpha=8, targets=list(TARGETS), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a large enough update that greedy decoding changes
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.5)
    adapter_dir = save_peft_adapter(model, base / "adapter", base_model=str(model_dir))
    return {
        "model": model_dir,
        "adapter": adapter_dir,
        "state": lora_state_dict(model),
        "base": base,
        "prompt_ids": smollm2_tokenizer.encode(PROMPT, special=True),
    }


def greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by whole forward passes (no cache): the reference."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def generate(capsys, *args: str) -> list[int]:
    code = main(["generate", *args, PROMPT, "-n", str(N), "--temperature", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)["ids"]


def test_greedy_tokens_with_the_adapter_equal_the_merged_model(setup, capsys):
    merged = llamalab.load_model(setup["model"])
    apply_lora(merged, rank=4, alpha=8, targets=list(TARGETS), seed=0)
    load_lora_state_dict(merged, setup["state"])
    merge_lora(merged)
    expected = greedy(merged, setup["prompt_ids"], N)
    got = generate(capsys, "-m", str(setup["model"]), "--lora", str(setup["adapter"]))
    assert got == expected
    plain = generate(capsys, "-m", str(setup["model"]))
    assert plain != expected  # the adapter changes what is generated
    # SCALE 0 is the base; the adapter given twice at 0.5 is the adapter once.
    assert generate(capsys, "-m", str(setup["model"]), "--lora", f"{setup['adapter']}:0") == plain
    half = f"{setup['adapter']}:0.5"
    assert generate(capsys, "-m", str(setup["model"]), "--lora", half, "--lora", half) == expected


def test_a_packed_gguf_base_runs_the_adapter_in_its_cached_steps(setup, capsys):
    from llamalab.checkpoint.convert import convert
    from llamalab.train.lora import load_peft_adapters

    gguf_file = convert(setup["model"], setup["base"] / "tiny.gguf", to="gguf", dtype="q8_0")
    packed = llamalab.load_model(gguf_file, packed=True)
    load_peft_adapters(packed, [(setup["adapter"], 1.0)])
    # The native step would run the packed weights past the adapters.
    assert packed.decode_path.native_step is None
    expected = greedy(packed, setup["prompt_ids"], N)
    got = generate(capsys, "-m", str(gguf_file), "--lora", str(setup["adapter"]))
    assert got == expected
    assert generate(capsys, "-m", str(gguf_file)) != expected


def test_what_is_not_an_adapter_for_this_model_is_one_line(setup, tmp_path, capsys):
    other = make_hf_model("grouped-query")  # 320 tokens, another feed-forward size
    other.save_pretrained(tmp_path / "other")
    foreign = llamalab.load_model(tmp_path / "other")
    apply_lora(foreign, rank=2, alpha=4, targets=["w1"], seed=0)
    save_peft_adapter(foreign, tmp_path / "foreign")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # transformers' saving progress
    cases = [
        (str(setup["model"]), "not a LoRA adapter"),  # a model folder
        (str(tmp_path / "empty"), "not a LoRA adapter"),
        (str(tmp_path / "missing"), "no such file or folder"),
        (f"{setup['adapter']}:lots", "SCALE must be a number"),
        (str(tmp_path / "foreign"), "made for another base"),
    ]
    for lora, message in cases:
        code = main(["generate", "-m", str(setup["model"]), "--lora", lora, "hi", "-n", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1, lora
        assert len(err) == 1 and message in err[0], (lora, err)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    assert main(["generate", "-m", str(setup["model"]), "--lora", str(bad), "hi"]) == 1
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_lora_never_goes_to_a_resident_server(setup, capsys):
    args = ["generate", "-m", str(setup["model"]), "--lora", str(setup["adapter"])]
    assert main([*args, "--server", "http://127.0.0.1:9", "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora is not sent to a server" in err[0], err
