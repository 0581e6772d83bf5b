"""`--lora` on `chat` and `eval`: the adapter runs unmerged and gives what the merged model
(`convert --lora`) gives; a path that is not an adapter is one line before any model loads."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from test_finetune import make_tiny_chat_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.cli import main
from llamalab.train.lora import TARGETS, apply_lora, lora_adapters, save_gguf_adapter

NO_OUTPUT = [t for t in TARGETS if t != "output"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer) -> dict:
    """A tiny chat model (SmolLM2's tokenizer and template), a GGUF adapter for it that
    changes its replies, and the merged model as convert writes it."""
    base = tmp_path_factory.mktemp("lora-cli")
    model_dir = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    model = llamalab.load_model(model_dir)
    apply_lora(model, rank=4, alpha=8, targets=NO_OUTPUT, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.5)
    adapter = save_gguf_adapter(model, base / "adapter.gguf")
    merged = convert(model_dir, base / "merged", to="hf", lora=[(adapter, 1.0)])
    return {"model": model_dir, "adapter": adapter, "merged": merged, "base": base}


def chat_reply(model, tmp_path, name: str, *args: str) -> str:
    """One turn of `llamalab chat` on a pseudo-terminal; the assistant's saved reply."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamalab", "chat", "--model", str(model), "--no-server", *args]
        + ["--temperature", "0", "--max-tokens", "10"],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_HISTORY": ""},
        encoding="utf-8",
        timeout=180,
    )
    child.expect_exact("> ")
    child.sendline("Name a colour.")
    child.expect_exact("> ")
    saved = tmp_path / f"{name}.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("(saved")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return json.loads(saved.read_text())["messages"][-1]["content"]


def test_chat_with_the_adapter_replies_as_the_merged_model(setup, tmp_path):
    with_adapter = chat_reply(setup["model"], tmp_path, "lora", "--lora", str(setup["adapter"]))
    assert with_adapter == chat_reply(setup["merged"], tmp_path, "merged")
    assert with_adapter != chat_reply(setup["model"], tmp_path, "base")


def perplexity(capsys, model, *args: str, data) -> float:
    argv = ["eval", "-m", str(model), "--task", "perplexity", "--data", str(data)]
    code = main([*argv, "--ctx", "32", "--stride", "16", "--json", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)["value"]


def test_eval_with_the_adapter_scores_as_the_merged_model(setup, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    with_adapter = perplexity(capsys, setup["model"], "--lora", str(setup["adapter"]), data=text)
    merged = perplexity(capsys, setup["merged"], data=text)
    base = perplexity(capsys, setup["model"], data=text)
    assert with_adapter == pytest.approx(merged, rel=1e-4)
    assert abs(with_adapter - base) > 1e-2 * base  # the adapter matters
    # SCALE 0 is the base.
    zero = perplexity(capsys, setup["model"], "--lora", f"{setup['adapter']}:0", data=text)
    assert zero == pytest.approx(base, rel=1e-4)


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_what_is_not_an_adapter_is_one_line(setup, command, capsys):
    extra = ["--task", "mmlu"] if command == "eval" else ["--no-server"]
    for lora, message in [
        (setup["model"], "not a LoRA adapter"),
        (setup["base"] / "missing", "no such file or folder"),
        (f"{setup['adapter']}:x", "SCALE must be a number"),
    ]:
        code = main([command, "-m", str(setup["model"]), *extra, "--lora", str(lora)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert len(err) == 1 and message in err[0], err
