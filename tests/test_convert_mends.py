"""convert: staging left by a killed run is cleaned, progress shows on a terminal only, a run
folder converts without torch's chatter, and an HF export tells transformers where to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import make_hf_model, run_cli

from llamalab.checkpoint import convert as convert_module
from llamalab.checkpoint.convert import convert

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# A conversion that stops, once its output is written, until it is killed.
STALLED = """
import sys, time
from llamalab.checkpoint import convert as c
real = c.write_hf
def stalled(*args):
    real(*args)
    print("written", flush=True)
    time.sleep(600)
c.write_hf = stalled
c.convert(sys.argv[1], sys.argv[2], to="hf")
"""


def test_a_rerun_removes_the_staging_of_a_killed_conversion(source, tmp_path):
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED, str(source), str(dst)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    stale = leftovers(tmp_path, "out")
    assert len(stale) == 1  # what kill -9 leaves: no handler ran
    # Staging that is not provably a dead conversion's own is left alone: one without our
    # marker, one whose owner is alive (this process), one for another destination.
    unmarked = tmp_path / ".out.abcd1234"
    unmarked.mkdir()
    alive = tmp_path / ".out.efgh5678"
    alive.mkdir()
    convert_module._write_marker(alive, dst)
    other = tmp_path / ".out2.ijkl9012"
    other.mkdir()
    (other / convert_module.STAGING_MARKER).write_text(
        (tmp_path / stale[0] / convert_module.STAGING_MARKER).read_text()
    )
    convert(source, dst, to="hf")
    assert (dst / "model.safetensors").is_file()
    assert leftovers(tmp_path, "out") == [".out.abcd1234", ".out.efgh5678"]
    assert other.is_dir()


def test_a_reused_pid_does_not_keep_staging_alive(source, tmp_path):
    dst = tmp_path / "out"
    folder = tmp_path / ".out.zzzz0000"
    folder.mkdir()
    convert_module._write_marker(folder, dst)
    marker = folder / convert_module.STAGING_MARKER
    owner = json.loads(marker.read_text())
    owner["start"] = "1"  # this pid, but a process that started at another time
    marker.write_text(json.dumps(owner))
    assert convert_module.remove_stale_staging(dst) == [folder]
    assert not folder.exists()


def test_progress_on_a_terminal_only(source, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamalab", "convert", str(source), str(tmp_path / "tty"), "--to", "meta"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
        encoding="utf-8",
    )
    out = child.read()
    child.close()
    assert child.exitstatus == 0, out
    assert "writing" in out and "tensor" in out and "%|" in out
    piped = run_cli("convert", str(source), str(tmp_path / "piped"), "--to", "meta")
    assert piped.returncode == 0
    assert piped.stderr == f"wrote {tmp_path / 'piped'}\n"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A two-step `llamalab train` run of the debug model on a few files of Python's library."""
    import torch

    from llamalab.data import parse_sources, prepare
    from llamalab.tokenizer.trainer import train_tokenizer
    from llamalab.train.config import load_config
    from llamalab.train.loop import train

    base = tmp_path_factory.mktemp("run")
    text = base / "text"
    text.mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:12]:
        (text / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    train_tokenizer([text], 400, base / "tok", threads=1)
    prepare(parse_sources([f"code={text}"]), base / "tok", base / "data", workers=1, progress=False)
    sets = [
        "threads=1",
        "max_steps=2",
        "warmup_steps=1",
        "checkpoint_every=2",
        "eval_every=0",
        "export=false",
    ]
    cfg = load_config(
        REPO / "configs/train/debug.toml",
        [f"data={base / 'data'}", f"out_dir={base / 'out'}", *sets],
    )
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return base / "out"


def test_a_run_folder_converts_without_warnings(run_folder, tmp_path):
    dst = tmp_path / "run.gguf"
    proc = run_cli(
        "convert", str(run_folder), str(dst), "--to", "gguf", env={"OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"wrote {dst}\n"  # no UserWarning from torch.distributed.checkpoint


def test_hf_export_stops_where_the_chat_model_does(smollm2_path, tmp_path):
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    folder = convert(smollm2_path, tmp_path / "hf", to="hf")
    tok = AutoTokenizer.from_pretrained(folder)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig.from_pretrained(folder)
    stops = generation.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert im_end in stops
    assert generation.bos_token_id == tok.convert_tokens_to_ids("<|im_start|>")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.eos_token_id == stops[0] == tok.convert_tokens_to_ids(tok.eos_token)
    assert model.config.bos_token_id == generation.bos_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True
    )
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) < 48 and new[-1] == im_end, tok.decode(new)
    assert im_end not in new[:-1]
