"""`llamalab finetune` end to end: metrics, checkpoints, the PEFT adapter, kill -9 resume,
a packed GGUF base, a full fine-tune, and bad input refused before training starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from llamalab.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
LORA = REPO / "configs" / "finetune" / "lora.toml"
FULL = REPO / "configs" / "finetune" / "full.toml"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
# Small rows and steps: a tiny model with SmolLM2's tokenizer trains a step in ~0.1 s.
QUICK = ["seq_len=64", "batch_tokens=256", "micro_batch_size=2", "warmup_steps=0", "threads=1"]


def make_tiny_chat_model(folder: Path, tokenizer) -> Path:
    """A random 2-layer HF Llama with SmolLM2's tokenizer (and so its chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamalab.tokenizer.export import write_tokenizer_files

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer_files(tokenizer, folder, context_length=256)
    return folder


def write_items(path: Path, n: int = 40) -> Path:
    """Alpaca and chat items: short sums, so every item fits a row of 64 tokens."""
    import random

    r = random.Random(0)
    lines = []
    for i in range(n):
        a, b = r.randint(1, 50), r.randint(1, 50)
        if i % 2:
            item = {"instruction": f"Add {a} and {b}.", "output": str(a + b)}
        else:
            item = {
                "messages": [
                    {"role": "user", "content": f"{a}+{b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ]
            }
        lines.append(json.dumps(item))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("finetune")
    model = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    return model, write_items(base / "items.jsonl")


def sets(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    args = []
    for s in [f"model={model}", f"data={data}", f"out_dir={out}", *QUICK, *more]:
        args += ["--set", s]
    return args


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_here(config: Path, model, data, out, *more: str) -> dict:
    from llamalab.train.finetune import finetune, load_finetune_config

    overrides = [f"model={model}", f"data={data}", f"out_dir={out}", *QUICK, *more]
    threads = torch.get_num_threads()
    try:
        return finetune(load_finetune_config(config, overrides), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_lora_run_through_the_cli_writes_metrics_checkpoints_and_a_peft_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    import llamalab
    from llamalab.train.lora import load_peft_adapters

    model, data = tiny
    out = tmp_path / "run"
    more = ["max_steps=6", "eval_every=3", "checkpoint_every=3", "lr=5e-2"]
    more += ['targets=["wq","wv","w2","output"]', "rank=4", "alpha=8"]
    proc = run_cli("finetune", str(LORA), *sets(model, data, out, *more), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "40 items (20 chat, 20 alpaca); 0 truncated, 0 dropped" in proc.stderr
    assert "36 train, 4 validation" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [("eval_loss" in r) for r in records] == [False, False, True, False, False, True]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "SHA256SUMS",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    if shutil.which("sha256sum"):
        check = subprocess.run(
            ["sha256sum", "-c", "SHA256SUMS"],
            cwd=adapter,
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert sorted(config["target_modules"]) == ["down_proj", "lm_head", "q_proj", "v_proj"]

    # peft puts the trained adapter on the Hugging Face base; llamalab reads it back.
    hf = LlamaForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = hf(tokens).logits
        expected = PeftModel.from_pretrained(hf, adapter).eval()(tokens).logits
    ours = llamalab.load_model(model)
    load_peft_adapters(ours, [(adapter, 1.0)])
    with torch.no_grad():
        got = ours(tokens)
    assert (expected - base).abs().max() > 1e-3  # the trained adapter changes the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # Run again: finished, says so, writes nothing.
    before = (out / "metrics.jsonl").read_bytes()
    again = run_cli("finetune", str(LORA), *sets(model, data, out, *more), env=ENV)
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_kill_9_then_the_same_command_equals_an_uninterrupted_run(tiny, tmp_path):
    model, data = tiny
    more = ["max_steps=60", "checkpoint_every=4", "eval_every=0", "dropout=0.1", "lr=1e-2"]
    whole = tmp_path / "whole"
    run_here(LORA, model, data, whole, *more)
    out = tmp_path / "killed"
    args = ["finetune", str(LORA), *sets(model, data, out, *more)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamalab", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ENV},
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = len(metrics.read_text().splitlines())
    assert 10 <= killed_at < 60
    again = run_cli(*args, env=ENV)
    assert again.returncode == 0, again.stderr
    assert "resuming from step-" in again.stderr
    a, b = losses(whole), losses(out)
    assert len(a) == len(b) == 60
    assert a == b  # float32, one thread, the same seed, dropout's random state restored
    from safetensors.torch import load_file

    x = load_file(whole / "adapter" / "adapter_model.safetensors")
    y = load_file(out / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_gguf_base_trains_packed(tiny, tmp_path):
    from llamalab.checkpoint.convert import convert

    model, data = tiny
    gguf_file = convert(model, tmp_path / "tiny.gguf", to="gguf", dtype="q8_0")
    out = tmp_path / "run"
    more = ["max_steps=3", "eval_every=3", "lr=5e-2", 'targets=["wq","wk","w1","w3","output"]']
    proc = run_cli("finetune", str(LORA), *sets(gguf_file, data, out, *more), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "(packed base)" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["grad_norm"] > 0 for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_full_fine_tune_exports_a_model_that_loads(tiny, tmp_path):
    import llamalab

    model, data = tiny
    out = tmp_path / "full"
    summary = run_here(FULL, model, data, out, "max_steps=2", "eval_every=0", "lr=1e-3")
    assert summary["step"] == 2
    trained = llamalab.load_model(out / "export")
    base = llamalab.load_model(model)
    tokens = torch.tensor([[1, 5, 900, 33]])
    with torch.no_grad():
        assert not torch.equal(trained(tokens), base(tokens))
    assert (out / "export" / "SHA256SUMS").is_file()
    assert llamalab.load_tokenizer(out / "export").encode("Hello") == llamalab.load_tokenizer(
        model
    ).encode("Hello")


BAD_ITEMS = {
    "malformed": (['{"text": "fine"}', '{"text": "broken"'], "items.jsonl:2: not valid JSON"),
    "no-assistant": (
        ['{"messages": [{"role": "user", "content": "hi"}]}'],
        "items.jsonl:1: no assistant turn",
    ),
    "unknown-format": (['{"question": "q", "answer": "a"}'], "items.jsonl:1: unknown format"),
    "empty": ([], "items.jsonl: empty file"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_data_is_one_line_before_anything_is_written(tiny, tmp_path, capsys, case):
    from llamalab.cli import main

    model, _ = tiny
    lines, message = BAD_ITEMS[case]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "run"
    assert main(["finetune", str(LORA), *sets(model, data, out, "max_steps=2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("rank=0", "rank must be a whole number ≥ 1, got 0"),
        ("rank=-4", "rank must be a whole number ≥ 1, got -4"),
        ('targets=["wq","q_proj"]', "unknown target module 'q_proj'"),
        ("method=qlora", "method must be one of lora, full"),
        ("dropout=1.5", "dropout must be a number from 0 to 0.999"),
        ("base=int8", "base must be one of auto, packed, float"),
        ("activations=fp8", "activations must be one of auto, float32, bfloat16"),
    ],
)
def test_bad_settings_are_one_line(tiny, tmp_path, capsys, setting, message):
    from llamalab.cli import main

    model, data = tiny
    out = tmp_path / "run"
    args = ["finetune", str(LORA), *sets(model, data, out, "max_steps=1", "eval_every=0")]
    code = main([*args, "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_out_dir_of_another_run_is_refused_and_the_same_run_resumes(tiny, tmp_path, capsys):
    from llamalab.cli import main

    model, data = tiny
    out = tmp_path / "run"
    base = ["finetune", str(LORA), *sets(model, data, out, "eval_every=0", "checkpoint_every=2")]
    assert main([*base, "--set", "max_steps=2"]) == 0
    capsys.readouterr()
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other_data = write_items(tmp_path / "other.jsonl", n=30)
    for change, what in (
        ("rank=16", "rank was 8, now 16"),
        (f"data={other_data}", "data was"),
        ('targets=["wq"]', "targets was"),
        ("method=full", "method was 'lora', now 'full'"),
    ):
        assert main([*base, "--set", "max_steps=4", "--set", change]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds another fine-tuning run" in err[0], err
        assert what in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    # A folder that is something else is refused too.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*base, "--set", f"out_dir={tmp_path / 'other'}", "--set", "max_steps=2"]) == 1
    assert "not a previous `llamalab finetune` run" in capsys.readouterr().err
    # The same run with more steps resumes.
    assert main([*base, "--set", "max_steps=4", "--progress", "lines"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step-00000002" in err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]
