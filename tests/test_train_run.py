"""`llamalab train` end to end: the debug config, resume equality, atomic checkpoints,
SIGTERM, and a 2-process FSDP2 run on gloo that matches the 1-process run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import run_cli

from llamalab.data import parse_sources, prepare
from llamalab.tokenizer.trainer import train_tokenizer
from llamalab.train.checkpoint import latest_checkpoint, list_checkpoints
from llamalab.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEBUG = REPO / "configs" / "train" / "debug.toml"


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two sources of real text (Python's standard library), tokenized with a 400-piece vocabulary."""
    base = tmp_path_factory.mktemp("train-data")
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    for name, chunk in (("code", files[:12]), ("more", files[12:20])):
        folder = base / name
        folder.mkdir()
        for f in chunk:
            (folder / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    train_tokenizer([base / "code"], 400, base / "tok", threads=2)
    prepare(
        parse_sources([f"code={base / 'code'}", f"more={base / 'more'}"]),
        base / "tok",
        base / "data",
        workers=1,
        progress=False,
    )
    return base / "data"


def run(data: Path, out: Path, *overrides: str) -> dict:
    """Train in this process, on one thread (the machine is shared), restored afterwards."""
    import torch

    from llamalab.train.loop import train

    cfg = load_config(DEBUG, [f"data={data}", f"out_dir={out}", "threads=1", *overrides])
    threads = torch.get_num_threads()
    try:
        return train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def debug_run(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """configs/train/debug.toml run once through the CLI, as a user would."""
    out = tmp_path_factory.mktemp("debug") / "run"
    t0 = time.perf_counter()
    proc = cli("train", str(DEBUG), "--set", f"data={data}", "--set", f"out_dir={out}")
    return out, proc, time.perf_counter() - t0


def test_debug_config_runs_end_to_end_through_the_cli(debug_run):
    out, proc, elapsed = debug_run
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 60
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "epochs"} <= r.keys()
    assert records[-1]["tokens"] == 20 * 1024
    assert set(records[9]["eval_loss"]) == {"code", "more"} == set(records[19]["eval_loss"])
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in list_checkpoints(out)] == [10, 20]
    assert "model exported to" in proc.stderr

    # The export is a Meta folder that llamalab's own loader and generator run.
    import llamalab

    model = llamalab.load_model(out / "export")
    assert model.config.vocab_size == 400 and model.config.dim == 64
    gen = cli("generate", "--model", str(out / "export"), "def", "-n", "8", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout  # eight tokens of whatever a 20-step model writes


def test_the_export_carries_checksums_that_coreutils_accepts(debug_run):
    export = debug_run[0] / "export"
    for tool, listing in (("sha256sum", "SHA256SUMS"), ("md5sum", "checklist.chk")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
        checked = subprocess.run(
            [tool, "-c", listing], cwd=export, capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        ok = {line.split(": ")[0] for line in checked.stdout.splitlines() if line.endswith("OK")}
        assert {"consolidated.00.pth", "params.json", "tokenizer.model"} <= ok, checked.stdout


def test_the_trained_model_runs_in_llama_cpp_after_convert(debug_run, tmp_path):
    import numpy as np
    import torch

    import llamalab
    from llamalab.checkpoint.convert import convert
    from llamalab.tokenizer import load_tokenizer

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    export = debug_run[0] / "export"
    gguf_file = convert(export, tmp_path / "trained.gguf", to="gguf", dtype="f32")
    ids = load_tokenizer(export).encode("def main(args):\n    return x + 12")
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=128, logits_all=True, verbose=False)
    assert llm.tokenize(b"def main(args):\n    return x + 12", add_bos=True) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = llamalab.load_model(export)(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3


def test_resume_equals_an_uninterrupted_run_and_ignores_partial_checkpoints(data, tmp_path):
    fixed = ["total_tokens=12288", "checkpoint_every=3", "eval_every=4"]  # a 12-step schedule
    whole = run(data, tmp_path / "whole", *fixed, "max_steps=12")
    assert whole["step"] == 12

    part = tmp_path / "part"
    first = run(data, part, *fixed, "max_steps=6")
    assert first["step"] == 6
    # What a crash leaves: a half-written temporary folder, and a step folder that never
    # got its train state. Neither may be taken for a checkpoint.
    junk = part / "checkpoints" / ".tmp-step-00000009"
    junk.mkdir()
    (junk / "__0_0.distcp").write_bytes(b"torn")
    (part / "checkpoints" / "step-00000010").mkdir()
    assert latest_checkpoint(part).name == "step-00000006"
    # A metrics line written after the checkpoint (then lost) is rewritten on resume.
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n" + '{"step": 8, "lo')
    second = run(data, part, *fixed, "max_steps=12")
    assert second["step"] == 12 and second["steps_run"] == 6
    a, b = losses(tmp_path / "whole"), losses(part)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert whole["epochs"] == second["epochs"]


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(data, tmp_path):
    out = tmp_path / "run"
    args = ["train", str(DEBUG), "--set", f"data={data}", "--set", f"out_dir={out}"]
    args += ["--set", "max_steps=400", "--set", "checkpoint_every=1000", "--set", "eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamalab", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    ckpt = latest_checkpoint(out)
    stopped_at = int(ckpt.name.split("-")[1])
    assert stopped_at >= 3 and len(losses(out)) == stopped_at
    assert not (out / "export").exists()  # an interrupted run exports nothing

    again = cli(*args[:-6], "--set", f"max_steps={stopped_at + 2}", "--set", "eval_every=0")
    assert again.returncode == 0, again.stderr
    assert f"resuming from {ckpt.name}" in again.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(data, tmp_path):
    one = tmp_path / "one"
    run(data, one, "max_steps=20", "eval_every=10")
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "llamalab", "train", str(DEBUG), "--set", f"data={data}"]
    cmd += ["--set", f"out_dir={two}", "--set", "max_steps=20", "--set", "eval_every=10"]
    cmd += ["--set", "checkpoint_every=10"]
    cmd += ["--set", "micro_batch_size=2"]  # 2 ranks × 2 = one process's 4 per micro-batch
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    # torch.distributed on CPUs sometimes aborts at exit after finishing: judge the results.
    assert (two / "metrics.jsonl").is_file(), proc.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 20, proc.stderr[-3000:]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5
    assert "2 rank(s)" in proc.stderr
    # Checkpoints from 2 ranks and the gathered export load like the 1-process ones.
    assert [s for s, _ in list_checkpoints(two)] == [10, 20]
    resumed = tmp_path / "resumed"  # the 2-rank checkpoint of step 10, resumed by 1 process
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000020")
    assert run(data, resumed, "max_steps=20", "eval_every=10")["steps_run"] == 10
    c = losses(resumed)
    assert max(abs(x - y) for x, y in zip(a, c, strict=True)) <= 1e-5
    import torch

    import llamalab

    m1, m2 = llamalab.load_model(one / "export"), llamalab.load_model(two / "export")
    for (k, v1), (_, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4, msg=k)


def test_kill_9_then_the_same_command_equals_an_uninterrupted_run(data, tmp_path):
    sets = ["max_steps=200", "checkpoint_every=5", "eval_every=0", "threads=1", "export=false"]
    whole = tmp_path / "whole"
    run(data, whole, *sets)
    out = tmp_path / "killed"
    args = ["train", str(DEBUG), "--set", f"data={data}", "--set", f"out_dir={out}"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamalab", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever was being written is torn
    proc.wait(timeout=60)
    killed_at = len(metrics.read_text().splitlines())
    assert 12 <= killed_at < 200
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resuming from step-" in again.stderr
    a, b = losses(whole), losses(out)
    assert len(a) == len(b) == 200
    assert a == b  # float32, one thread, same seed: identical


def test_convert_takes_a_run_folder(debug_run, tmp_path):
    import torch

    import llamalab

    out, proc, _ = debug_run
    assert proc.returncode == 0, proc.stderr
    gguf = tmp_path / "run.gguf"
    converted = cli("convert", str(out), str(gguf), "--to", "gguf", "--dtype", "f32")
    assert converted.returncode == 0, converted.stderr
    tokens = torch.tensor([[1, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        ours = llamalab.load_model(gguf)(tokens)
        exported = llamalab.load_model(out / "export")(tokens)
    # The run ended with its last checkpoint, so both hold the same weights.
    assert torch.allclose(ours, exported, atol=1e-5)
    generated = cli("generate", "-m", str(gguf), "def ", "-n", "8", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout
    # A folder that is a run with no checkpoint yet is one clear error.
    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "run.json").write_text((out / "run.json").read_text())
    refused = cli("convert", str(empty), str(tmp_path / "x.gguf"), "--to", "gguf")
    assert refused.returncode == 1
    assert "no whole checkpoint" in refused.stderr and "Traceback" not in refused.stderr


def test_a_truncated_newest_checkpoint_falls_back_to_the_newest_whole_one(data, tmp_path):
    # A 6-step schedule throughout (total_tokens), so the resumed run must equal this one.
    sets = ["total_tokens=6144", "warmup_steps=1", "checkpoint_every=2", "eval_every=0"]
    sets += ["threads=1", "export=false"]
    whole = tmp_path / "whole"
    run(data, whole, *sets, "max_steps=6")
    out = tmp_path / "run"
    run(data, out, *sets, "max_steps=4")
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    for part in latest_checkpoint(out).glob("*.distcp"):  # a disk that filled up mid-write
        part.write_bytes(part.read_bytes()[:100])
    args = ["train", str(DEBUG), "--set", f"data={data}", "--set", f"out_dir={out}"]
    for s in [*sets, "max_steps=6"]:
        args += ["--set", s]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "step-00000004" in line]
    assert len(said) == 1 and "step-00000002" in said[0], proc.stderr
    assert "cannot load" in said[0] and "Traceback" not in proc.stderr
    assert losses(out) == losses(whole)  # steps 3-6 trained again from step 2, as before
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]

    # With no checkpoint that loads, the run refuses to resume: one clear line.
    for _, folder in list_checkpoints(out):
        for part in folder.glob("*.distcp"):
            part.write_bytes(b"torn")
    proc = cli(*args[:-2], "--set", "max_steps=8")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "cannot load this checkpoint" in proc.stderr and "corrupt" in proc.stderr
    assert "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_sizes_that_cannot_work_are_refused_before_anything_starts(data, tmp_path, capsys):
    from llamalab.cli import main

    out = tmp_path / "run"
    base = ["train", str(DEBUG), "--set", f"data={data}", "--set", f"out_dir={out}"]
    cases = [
        # A batch larger than all the training tokens: no step could ever finish.
        (["batch_tokens=1_000_000_000_000"], "batch_tokens 1,000,000,000,000 is more than"),
        # One micro-batch whose activations alone exceed any machine's memory.
        (
            ["micro_batch_size=1_000_000_000", "batch_tokens=128_000_000_000"],
            "micro_batch_size 1000000000 (× seq_len 128) needs at least",
        ),
        (["micro_batch_size=1_000_000_000"], "micro_batch_size 1000000000 × seq_len 128"),
        (["model.dim=65536"], "parameters need at least"),
        (["warmup_steps=100"], "warmup_steps 100 is longer than the run's schedule of 20"),
    ]
    for sets, message in cases:
        args = list(base)
        for s in sets:
            args += ["--set", s]
        assert main(args) == 1, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (sets, err)
        assert not out.exists()  # refused before the out_dir was made


def test_the_activation_floor_is_below_what_backward_really_keeps():
    """The memory check's activation figure never exceeds the tensors autograd saves."""
    import torch

    from llamalab.config import get_preset
    from llamalab.model import Transformer
    from llamalab.train.budget import activation_bytes

    torch.manual_seed(0)
    cfg = get_preset("debug")
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    B, L = 2, 64
    tokens = torch.randint(0, cfg.vocab_size, (B, L + 1))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    floor = activation_bytes(
        dim=cfg.dim,
        kv_dim=cfg.n_kv_heads * (cfg.dim // cfg.n_heads),
        ffn_hidden_dim=cfg.ffn_hidden_dim,
        n_layers=cfg.n_layers,
        tokens=B * L,
        element_bytes=4,
        checkpointing=False,
    )
    saved = sum(storages.values())
    assert 0.3 * saved <= floor <= saved, (floor, saved)


def test_a_longer_max_steps_on_resume_is_said_and_follows_the_stated_rule(data, tmp_path, capsys):
    import math

    sets = ["warmup_steps=2", "eval_every=0", "checkpoint_every=100", "export=false"]
    out = tmp_path / "run"
    run(data, out, *sets, "max_steps=4")
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    capsys.readouterr()
    run(data, out, *sets, "max_steps=8")
    err = capsys.readouterr().err
    # The paper's schedule over the new length (warmup 2, cosine to 10% at step 8),
    # at the 5th step (index 4), written out here from §2.2's definition.
    peak = 3.0e-3
    expected = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 2) / (8 - 2))))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[4]["step"] == 5 and records[4]["lr"] == pytest.approx(expected)
    assert "max_steps is 8, the checkpoint's run had 4" in err, err
    assert "schedule now ends at step 8, not 4" in err
    assert f"step 5 runs at {expected:.3g} instead of {peak * 0.1:.3g}" in err
    assert "--set total_tokens=4096" in err

    # The way out the message gives: keep the saved 4-step schedule, train on at its floor.
    run(data, kept, *sets, "max_steps=8", "total_tokens=4096")
    err = capsys.readouterr().err
    assert "max_steps is 8, the checkpoint's run had 4" in err
    assert "schedule now ends" not in err and "schedule is unchanged" in err
    records = [json.loads(line) for line in (kept / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records[4:]] == pytest.approx([peak * 0.1] * 4)


def test_a_finished_run_run_again_says_so(debug_run):
    out, proc, _ = debug_run
    assert proc.returncode == 0, proc.stderr
    before = (out / "metrics.jsonl").read_bytes()
    again = cli("train", str(DEBUG), "--set", f"data={_data_of(out)}", "--set", f"out_dir={out}")
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr and "--set max_steps=" in again.stderr
    assert "nan" not in again.stderr and "tokens/s" not in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def _data_of(out: Path) -> str:
    return json.loads((out / "run.json").read_text())["config"]["data"]


def test_the_header_is_not_printed_on_the_progress_bar(data, tmp_path, capsys):
    import torch

    from llamalab.train.loop import train

    sets = ["max_steps=2", "warmup_steps=1", "eval_every=0", "export=false", "threads=1"]
    cfg = load_config(DEBUG, [f"data={data}", f"out_dir={tmp_path / 'run'}", *sets])
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=True)
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    at = err.index("llamalab train: ")
    assert at == 0 or err[at - 1] == "\n", repr(err[max(0, at - 80) : at + 20])
