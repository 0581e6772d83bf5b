"""``generate`` and ``eval`` on tensor-parallel ranks (gloo on CPUs), against one process.

The ranks are started by ``torchrun``, or directly (the environment torchrun would set:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) where a test needs one rank's process in
hand: to kill it, to stop it, or to give it another working directory. Expected outputs
come from the same command in one process, the reference the ranks must equal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pytest

LAUNCH_TIMEOUT = 240  # seconds for one launch: three ranks import torch on 2 busy cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def llamalab(
    *args: str, cwd: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """The command in one process (``input``: its standard input)."""
    return subprocess.run(
        [sys.executable, "-m", "llamalab", *args], capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT, env=ENV, cwd=cwd, check=False, input=input,
    )  # fmt: skip


def torchrun(nproc: int, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """The command on ``nproc`` ranks under torchrun (``input``: its standard input)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "llamalab", *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=ENV, check=False,
        input=input,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(nproc: int, *args: str, cwds: list[Path] | None = None) -> list[subprocess.Popen]:
    """The command on ``nproc`` ranks started here, as torchrun would start them."""
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        cwd = cwds[rank] if cwds else None
        cmd = [sys.executable, "-m", "llamalab", *args]
        procs.append(subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env, cwd=cwd))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Each rank's (exit status, stdout, stderr); every rank must end within ``timeout``."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_path) -> Path:
    """A 1-layer random float model (4 heads) with SmolLM2's tokenizer."""
    from conftest import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tp") / "tiny.gguf", smollm2_path,
                           context_length=4096)  # fmt: skip


def _one_error_line(stderr: str) -> list[str]:
    """llamalab's error lines; no traceback anywhere in the output of our ranks."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("llamalab: error:")]


# ---------------------------------------------------------------- equal to one process


@pytest.mark.slow
def test_smollm2_on_3_ranks_generates_the_tokens_of_one_process(smollm2_path) -> None:
    """SmolLM2 (9 query heads, 3 KV heads) on 3 ranks in float32: the 64 greedy tokens of
    one process, and only rank 0 prints."""
    args = ["generate", "--model", str(smollm2_path), "--dtype", "float32", "--temperature",
            "0", "--max-tokens", "64", "--json", "--chat", "Tell me about the history of Paris."]  # fmt: skip
    one = llamalab(*args)
    assert one.returncode == 0, one.stderr
    ranks = torchrun(3, *args)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    want, got = json.loads(one.stdout), json.loads(ranks.stdout)  # exactly one JSON object
    assert len(want["ids"]) == 64
    assert got["ids"] == want["ids"]
    assert got["text"] == want["text"]


@pytest.mark.slow
def test_chat_on_3_ranks_answers_as_one_process(smollm2_path) -> None:
    """A two-turn conversation read from standard input by rank 0: SmolLM2 in float32 on
    3 ranks gives one process's replies, and only rank 0 prints."""
    args = ["chat", "--model", str(smollm2_path), "--dtype", "float32", "--temperature", "0",
            "--max-tokens", "24"]  # fmt: skip
    turns = "What is the capital of France?\nAnd of Italy?\n"
    one = llamalab(*args, input=turns)
    assert one.returncode == 0, one.stderr
    ranks = torchrun(3, *args, input=turns)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout == one.stdout
    assert one.stdout.count("> ") >= 2 and "Paris" in one.stdout


def _packed_reference(model, prompt: list[int], ids: list[int]):
    """``model``'s logits for each chosen token's position, from one pass over the whole
    sequence (eager) and from a cached prefill and one decode step per token (the native
    step, as ``generate`` runs it in one process)."""
    import torch

    from llamalab.kv_cache import cache_view

    n, seq = len(prompt), prompt + ids
    with torch.inference_mode():
        full = model(torch.tensor([seq]))[0, n - 1 : -1]
        model.setup_cache(1, len(seq) + 1)
        steps = [model(torch.tensor([prompt]), cache_view(torch.arange(n), last_only=True))]
        for i, token in enumerate(ids[:-1]):
            steps.append(model(torch.tensor([[token]]), cache_view(torch.tensor([n + i]))))
        model.clear_cache()
    return full, torch.cat([s[0, -1:] for s in steps])


@pytest.mark.slow
def test_smollm2_packed_on_3_ranks_decodes_within_the_packed_spread(smollm2_path) -> None:
    """SmolLM2 Q4_1 on 3 ranks with the default --dtype auto: every rank keeps its Q4_1
    blocks packed (576 / 3 = 192 columns, 6 blocks of 32 per row) and runs the packed
    kernels. Packed maths is not bit-stable: the vnni kernel rounds activations to int8,
    so a float32 rounding difference (the row splits' partial sums added in another
    order) can move an activation by a quantization step. The same happens inside one
    process: its eager pass over a whole sequence and its cached native steps differ by
    a few tenths of a logit. Each token the ranks pick must be the best one of the packed
    model's whole-sequence logits, or within that spread of it (a near tie)."""
    from llamalab.checkpoint.load import load_model

    args = ["generate", "--model", str(smollm2_path), "--temperature", "0", "--max-tokens",
            "64", "--json", "--chat", "Tell me about the history of Paris."]  # fmt: skip
    ranks = torchrun(3, *args)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    got = json.loads(ranks.stdout)
    assert len(got["ids"]) == 64
    model = load_model(smollm2_path, packed=True)
    full, cached = _packed_reference(model, got["prompt_ids"], got["ids"])
    spread = (full - cached).abs().max().item()  # the packed model against itself
    assert 0 < spread < 2.0, spread
    chosen = full.gather(1, full.new_tensor(got["ids"]).long()[:, None])[:, 0]
    gaps = full.max(-1).values - chosen
    assert gaps.max().item() <= 2 * spread, (gaps.max().item(), spread)
    # Most picks are the reference's argmax outright.
    assert (gaps == 0).sum().item() >= 60, gaps.tolist()


@pytest.mark.parametrize("split", [[], ["--tp-exact"]], ids=["rows", "exact"])
def test_eval_on_2_ranks_scores_every_item_as_one_process(
    tmp_path: Path, tiny_gguf, split: list[str]
) -> None:
    """MMLU items scored on 2 ranks: the same prediction item by item, the same
    log-likelihoods within float32 rounding (with --tp-exact: the same bits)."""
    args = ["eval", "--model", str(tiny_gguf), "--dtype", "float32", "--task", "mmlu",
            "--subjects", "abstract_algebra,astronomy", "--limit", "10", "--json"]  # fmt: skip
    one = llamalab(*args, "--output", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    ranks = torchrun(2, *args, *split, "--output", str(tmp_path / "ranks.jsonl"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    want = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert len(want) == len(got) == 20
    for a, b in zip(want, got, strict=True):
        assert (a["id"], a["subject"], a["prediction"]) == (b["id"], b["subject"], b["prediction"])
        bound = 0.0 if split else 1e-4
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) <= bound
    assert json.loads(ranks.stdout)["value"] == json.loads(one.stdout)["value"]


def _serve_replies(port: int) -> dict:
    """Greedy replies of the official openai client: plain and streamed, 4 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,", "Hello"]

    def plain(prompt: str) -> str:
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        return reply.choices[0].text

    def streamed(prompt: str) -> str:
        chunks = client.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(4) as pool:
        return {
            "plain": list(pool.map(plain, prompts)),
            "streamed": list(pool.map(streamed, prompts)),
        }


def _wait_for_health(port: int, procs: list[subprocess.Popen]) -> None:
    import urllib.request

    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a rank ended: {[p.stderr.read()[-2000:] for p in procs]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("the server did not start")


@pytest.mark.slow
def test_serve_on_2_ranks_answers_as_one_process(tiny_gguf) -> None:
    """The openai client gets the same greedy replies (streamed and not, concurrent) from
    2 ranks as from one process; SIGTERM (torchrun sends it to every rank) drains and
    ends every rank."""
    replies = []
    for nproc in (1, 2):
        port = _free_port()
        args = ["serve", "--model", str(tiny_gguf), "--dtype", "float32", "--port", str(port)]
        if nproc == 1:
            procs = [subprocess.Popen([sys.executable, "-m", "llamalab", *args], stdout=PIPE,
                                      stderr=PIPE, text=True, env=ENV)]  # fmt: skip
        else:
            procs = spawn_ranks(nproc, *args)
        try:
            _wait_for_health(port, procs)
            replies.append(_serve_replies(port))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            results = finish(procs, timeout=60)
        if nproc == 2:
            assert all(rc == 128 + signal.SIGTERM for rc, _, _ in results), results
            assert not [line for _, _, err in results for line in _one_error_line(err)]
    assert replies[1] == replies[0]
    assert len(replies[0]["plain"][0]) > 0


# ---------------------------------------------------------------- faults


def test_a_degree_that_does_not_divide_the_heads_is_one_error(tiny_gguf) -> None:
    """4 heads on 3 ranks: every rank exits 1, and the job says why once."""
    procs = spawn_ranks(3, "generate", "--model", str(tiny_gguf), "--max-tokens", "4", "Hi")
    results = finish(procs, LAUNCH_TIMEOUT)
    assert [rc for rc, _, _ in results] == [1, 1, 1], results
    lines = [line for _, _, err in results for line in _one_error_line(err)]
    assert len(lines) == 1, lines
    assert "tensor-parallel degree 3 does not divide its 4 attention heads" in lines[0]
    assert all(out == "" for _, out, _ in results)


def test_ranks_holding_different_model_files_are_refused(tmp_path: Path, tiny_gguf) -> None:
    """The same relative path names different files in the two ranks' working folders."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    changed = bytearray(tiny_gguf.read_bytes())
    changed[-1] ^= 0xFF  # one weight byte differs: the same header, another model
    (second / "model.gguf").write_bytes(bytes(changed))
    procs = spawn_ranks(2, "generate", "--model", "model.gguf", "Hi", cwds=[first, second])
    results = finish(procs, LAUNCH_TIMEOUT)
    assert [rc for rc, _, _ in results] == [1, 1], results
    lines = [line for _, _, err in results for line in _one_error_line(err)]
    assert len(lines) == 1, lines
    assert "the ranks hold different model files at model.gguf: rank 1 differs" in lines[0]


def _start_generating(tiny_gguf: Path, timeout: float) -> list[subprocess.Popen]:
    """Two ranks generating a long reply; returns once rank 0 has printed text."""
    procs = spawn_ranks(
        2, "generate", "--model", str(tiny_gguf), "--max-tokens", "3500", "--dist-timeout",
        str(timeout), "--temperature", "0", "Once upon a time",
    )  # fmt: skip
    os.set_blocking(procs[0].stdout.fileno(), False)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline:
        if procs[0].poll() is not None:
            pytest.fail(f"rank 0 ended early: {procs[0].stderr.read()[-2000:]}")
        chunk = procs[0].stdout.read(1)
        if chunk:
            return procs
        time.sleep(0.05)
    pytest.fail("rank 0 printed nothing")


def test_a_killed_rank_ends_the_job_with_one_error(tiny_gguf) -> None:
    """kill -9 of rank 1 mid-generation: rank 0 exits 1 at once with one clear line."""
    procs = _start_generating(tiny_gguf, timeout=30)
    os.set_blocking(procs[0].stdout.fileno(), True)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (rc, _, err), _ = finish(procs, timeout=45)
    assert rc == 1
    assert time.monotonic() - t0 < 45
    lines = _one_error_line(err)
    assert len(lines) == 1 and "the ranks lost touch" in lines[0], err[-2000:]


# Long enough that two ranks loading side by side on a busy 2-core machine never wait on
# each other that long before the stop (5 s did, now and then); short enough for a test.
HANG_TIMEOUT = 20


def test_a_hung_rank_ends_the_job_within_the_timeout(tiny_gguf) -> None:
    """A stopped rank 1 (SIGSTOP): rank 0 gives up after --dist-timeout with one line."""
    procs = _start_generating(tiny_gguf, timeout=HANG_TIMEOUT)
    os.set_blocking(procs[0].stdout.fileno(), True)
    procs[1].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        rc, _, err = finish(procs[:1], timeout=HANG_TIMEOUT + 40)[0]
    finally:
        procs[1].send_signal(signal.SIGCONT)
        finish(procs[1:], timeout=60)
    assert rc == 1
    assert time.monotonic() - t0 < HANG_TIMEOUT + 40
    lines = _one_error_line(err)
    assert len(lines) == 1 and ("lost touch" in lines[0] or "hangs" in lines[0]), err[-2000:]


def test_a_split_that_cuts_a_quantization_block_is_refused(tmp_path: Path) -> None:
    """Q8_0 blocks hold 32 values; 4 ranks would cut wo's 64 columns into 16s."""
    import gguf
    import torch

    from llamalab.checkpoint import names as tensor_names
    from llamalab.checkpoint.gguf_format import add_model_metadata
    from llamalab.checkpoint.load import open_checkpoint
    from llamalab.checkpoint.names import expected_shapes
    from llamalab.config import ModelConfig
    from llamalab.errors import LlamalabError
    from llamalab.gguf.dequant import quantize_q8_0
    from llamalab.parallel.loading import check_blocks

    config = ModelConfig(name="q8", dim=64, n_layers=1, n_heads=4, n_kv_heads=4,
                         vocab_size=64, ffn_hidden_dim=128)  # fmt: skip
    path = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    add_model_metadata(writer, config)
    for name, shape in expected_shapes(config).items():
        gguf_name = tensor_names.to_format(name, "gguf")
        if len(shape) == 1:
            writer.add_tensor(gguf_name, torch.ones(shape).numpy())
        else:
            data = quantize_q8_0(torch.randn(shape))
            writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_checkpoint(path)
    check_blocks(reader, 2)  # 32 columns each: whole blocks
    with pytest.raises(LlamalabError, match=r"blk\.0\.attn_output\.weight \(Q8_0, blocks of 32"):
        check_blocks(reader, 4)


def test_a_bad_world_size_is_refused_before_any_rank_joins(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from llamalab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["generate", "--model", "x.gguf", "Hi"]) == 1
    assert "WORLD_SIZE must be a whole number, got 'two'" in capsys.readouterr().err


# ---------------------------------------------------------------- NCCL


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="NCCL ranks need two CUDA devices (one per rank)")
def test_nccl_ranks_generate_the_tokens_of_one_gpu(tiny_gguf) -> None:
    """Two NCCL ranks, one GPU each, float32: the greedy tokens of one process on one GPU."""
    args = ["generate", "--model", str(tiny_gguf), "--device", "cuda", "--dtype", "float32",
            "--temperature", "0", "--max-tokens", "32", "--json", "Once upon a time"]  # fmt: skip
    one = llamalab(*args)
    assert one.returncode == 0, one.stderr
    ranks = torchrun(2, *args)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert json.loads(ranks.stdout)["ids"] == json.loads(one.stdout)["ids"]
