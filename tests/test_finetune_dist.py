"""`llamalab finetune` under torchrun (2 processes, gloo, CPU): the same losses, validation
losses and trained weights as one process, rank 0 alone writing, and a resume under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import FULL, LORA, QUICK, REPO, make_tiny_chat_model, run_here, write_items

from llamalab.train.checkpoint import list_checkpoints

# A flat learning rate (min_lr_ratio = 1): a run stopped at step 3 and resumed with
# max_steps = 6 follows the same rates as one run of 6 steps. No dropout: each rank draws
# its own masks, so only without it can 2 processes repeat 1 exactly.
# Rows of 128 take three items each (at 64, one).
ROWS = ["seq_len=128", "batch_tokens=512"]
FLAT = ["eval_every=3", "checkpoint_every=3", "min_lr_ratio=1.0", "lr=2e-2", "dropout=0", *ROWS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("finetune-dist")
    model = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    return model, write_items(base / "items.jsonl")


def torchrun(config: Path, model: Path, data: Path, out: Path, *more: str):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "llamalab", "finetune", str(config)]
    for s in [f"model={model}", f"data={data}", f"out_dir={out}", *QUICK, *more]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=400)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, steps: int) -> None:
    a, b = records(one), records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
        assert x["trained_tokens"] == y["trained_tokens"]
        assert x.keys() == y.keys()
        if "eval_loss" in x:
            assert abs(x["eval_loss"]["validation"] - y["eval_loss"]["validation"]) <= 1e-5


def top_level(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.mark.slow
def test_lora_on_two_processes_equals_one_and_resumes_under_torchrun(tiny, tmp_path):
    """On a packed Q8_0 base, replicated on each rank."""
    from safetensors.torch import load_file

    from llamalab.checkpoint.convert import convert

    hf, data = tiny
    model = convert(hf, tmp_path / "tiny.gguf", to="gguf", dtype="q8_0")
    one = tmp_path / "one"
    run_here(LORA, model, data, one, "max_steps=6", *FLAT)
    two = tmp_path / "two"
    first = torchrun(LORA, model, data, two, "max_steps=3", *FLAT)
    # torch.distributed on CPUs sometimes aborts at exit after finishing: judge the results.
    assert (two / "metrics.jsonl").is_file(), first.stderr[-3000:]
    assert first.stderr.count("2 processes") == 1, first.stderr[-3000:]  # rank 0 alone says
    assert first.stderr.count("packed into") == 1
    assert "(packed base)" in first.stderr
    assert [s for s, _ in list_checkpoints(two)] == [3]
    second = torchrun(LORA, model, data, two, "max_steps=6", *FLAT)
    assert "resuming from step-00000003" in second.stderr, second.stderr[-3000:]
    assert second.stderr.count("llamalab finetune: step 6, loss") == 1  # rank 0's summary
    assert_same_run(one, two, 6)
    assert [s for s, _ in list_checkpoints(two)] == [3, 6]
    assert top_level(two) == top_level(one)
    # Each rank writes its random state; everything else in a checkpoint is shared.
    assert sorted(p.name for p in (two / "checkpoints" / "step-00000006").glob("rng-*")) == [
        "rng-0.pt",
        "rng-1.pt",
    ]

    # The replicated tensors are written once, shared out between the ranks' files.
    def stored(out: Path) -> int:
        return sum(
            f.stat().st_size for f in (out / "checkpoints" / "step-00000006").glob("*.distcp")
        )

    assert abs(stored(two) - stored(one)) <= 0.02 * stored(one)
    # One process resumes the 2-process checkpoint of step 3 and takes the same steps.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    assert run_here(LORA, model, data, resumed, "max_steps=6", *FLAT)["steps_run"] == 3
    assert_same_run(one, resumed, 6)
    x = load_file(one / "adapter" / "adapter_model.safetensors")
    y = load_file(two / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-4, msg=k)
    assert max(float(v.abs().max()) for k, v in x.items() if "lora_B" in k) > 1e-3  # trained


@pytest.mark.slow
def test_a_full_fine_tune_on_two_processes_equals_one(tiny, tmp_path):
    import llamalab

    model, data = tiny
    more = ["max_steps=3", "eval_every=3", "checkpoint_every=3", "lr=1e-3", *ROWS]
    one = tmp_path / "one"
    run_here(FULL, model, data, one, *more)
    two = tmp_path / "two"
    proc = torchrun(FULL, model, data, two, *more)
    assert (two / "export").is_dir(), proc.stderr[-3000:]
    assert_same_run(one, two, 3)
    m1, m2 = llamalab.load_model(one / "export"), llamalab.load_model(two / "export")
    for (k, v1), (_, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4, msg=k)


def test_micro_batches_that_ranks_cannot_share_are_refused(tiny, tmp_path, monkeypatch):
    """3 micro-batches a step cannot be dealt out evenly to 2 ranks: one line, before
    anything is written (the check runs before the process group is needed)."""
    from llamalab.errors import LlamalabError
    from llamalab.train import finetune as ft
    from llamalab.train.parallel import World

    model, data = tiny
    monkeypatch.setattr(
        "llamalab.train.parallel.init_world", lambda device: World(0, 2, 0, torch.device("cpu"))
    )
    monkeypatch.setattr("llamalab.train.parallel.close_world", lambda world: None)
    out = tmp_path / "run"
    cfg = ft.load_finetune_config(
        LORA,
        [f"model={model}", f"data={data}", f"out_dir={out}", *QUICK, "micro_batch_size=1"]
        + ["batch_tokens=192", "max_steps=1"],
    )
    with pytest.raises(LlamalabError, match="3 micro-batches of 1×64, which 2 processes cannot"):
        ft.finetune(cfg, progress=False)
    assert not out.exists()


def test_packing_is_part_of_the_run_and_an_older_run_counts_as_unpacked(tiny, tmp_path, capsys):
    from llamalab.cli import main

    model, data = tiny
    out = tmp_path / "run"
    args = ["finetune", str(LORA)]
    for s in [f"model={model}", f"data={data}", f"out_dir={out}", *QUICK, "eval_every=0"]:
        args += ["--set", s]
    assert main([*args, "--set", "max_steps=1"]) == 0
    capsys.readouterr()
    assert main([*args, "--set", "max_steps=2", "--set", "packing=false"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(packing was True, now False)" in err[0], err
    # A run recorded before packing existed trained one item per row: it resumes with
    # packing = false and is refused with packing = true.
    record = json.loads((out / "finetune.json").read_text())
    del record["identity"]["packing"], record["config"]["packing"]
    (out / "finetune.json").write_text(json.dumps(record))
    assert main([*args, "--set", "max_steps=2"]) == 1
    assert "(packing was False, now True)" in capsys.readouterr().err
    assert main([*args, "--set", "max_steps=1", "--set", "packing=false"]) == 0
    assert main([*args, "--set", "packing=maybe", "--set", "max_steps=1"]) == 1
    assert "packing must be true or false, got 'maybe'" in capsys.readouterr().err
