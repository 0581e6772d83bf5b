"""Several LoRA adapters served at once: each request picks one through `model`
(`MODEL:NAME`), rows of different adapters share the engine's batched passes, and each
reply equals its adapter run alone."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import make_tiny_chat_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.errors import LlamalabError
from llamalab.generation import GREEDY, Engine, Request
from llamalab.train.lora import (
    TARGETS,
    apply_lora,
    load_adapters,
    lora_adapters,
    save_gguf_adapter,
    save_peft_adapter,
    serve_adapters,
)

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Colours: red,"]
N = 10


def make_adapter(model_dir, seed: int, targets, folder, kind: str):
    model = llamalab.load_model(model_dir)
    apply_lora(model, rank=2 + seed, alpha=8, targets=targets, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # large enough that greedy decoding changes
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.5)
    if kind == "gguf":
        return save_gguf_adapter(model, folder / f"{seed}.gguf")
    return save_peft_adapter(model, folder / f"peft-{seed}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_tokenizer) -> dict:
    base = tmp_path_factory.mktemp("lora-serve")
    model_dir = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    no_output = [t for t in TARGETS if t != "output"]
    adapters = {
        "attn": make_adapter(model_dir, 1, ["wq", "wk", "wv", "wo"], base, "gguf"),
        "all": make_adapter(model_dir, 2, list(TARGETS), base, "peft"),  # output included
        "mlp": make_adapter(model_dir, 3, no_output, base, "gguf"),
    }
    ids = [smollm2_tokenizer.encode(p, special=True) for p in PROMPTS]
    return {"model": model_dir, "adapters": adapters, "ids": ids, "base": base}


def alone(model_dir, adapter, ids: list[int], base_path=None) -> list[int]:
    """Greedy tokens of ``adapter`` run alone on the model; None: the base, as a model
    with adapters runs it (an adapter at scale 0: on a packed base, the layers' own
    kernels rather than the native step, which adapters turn off)."""
    model = llamalab.load_model(model_dir, packed=str(model_dir).endswith(".gguf"))
    load_adapters(model, [(adapter or base_path, 1.0 if adapter else 0.0)])
    engine = Engine(model, llamalab.load_tokenizer(model_dir), max_batch=1, max_seq_len=128)
    seq = engine.generate_batch([Request(ids, max_tokens=N, sampling=GREEDY, lookup=None)])[0]
    return seq.ids


@pytest.mark.parametrize("packed", [False, True])
def test_rows_of_different_adapters_share_a_batch_and_each_equals_its_adapter_alone(
    setup, packed, tmp_path
):
    model_dir = setup["model"]
    if packed:  # a packed GGUF base: its native step must give way to the adapters
        model_dir = convert(model_dir, tmp_path / "tiny.gguf", to="gguf", dtype="q8_0")
    model = llamalab.load_model(model_dir, packed=packed)
    names = list(setup["adapters"])
    rows = serve_adapters(model, [(n, setup["adapters"][n], 1.0) for n in names])
    assert rows.names == names
    engine = Engine(model, llamalab.load_tokenizer(model_dir), max_batch=4, max_seq_len=128)
    # Each prompt with each adapter and the base: four rows at a time, all different.
    choices = [None, *names]
    passes = []
    real_forward = model.forward

    def counting(tokens, cache=None, **kw):
        passes.append({rows[r] for r in range(4) if engine._rows[r] is not None})
        return real_forward(tokens, cache, **kw)

    model.forward = counting
    for shift in range(len(choices)):
        picks = [choices[(i + shift) % len(choices)] for i in range(len(PROMPTS))]
        requests = [
            Request(ids, max_tokens=N, sampling=GREEDY, lookup=None,
                    adapter=0 if pick is None else rows.index(pick))
            for ids, pick in zip(setup["ids"], picks, strict=True)
        ]  # fmt: skip
        seqs = engine.generate_batch(requests)
        for seq, ids, pick in zip(seqs, setup["ids"], picks, strict=True):
            adapter = None if pick is None else setup["adapters"][pick]
            reference = alone(model_dir, adapter, ids, base_path=setup["adapters"]["attn"])
            assert seq.ids == reference, (pick, shift)
    assert max(len(p) for p in passes) == 4  # a pass ran rows of four different adapters


def test_a_row_reused_by_another_adapter_recomputes_its_prompt(setup):
    model = llamalab.load_model(setup["model"])
    rows = serve_adapters(model, [(n, p, 1.0) for n, p in setup["adapters"].items()])
    engine = Engine(model, llamalab.load_tokenizer(setup["model"]), max_batch=1, max_seq_len=128)
    ids = setup["ids"][0]
    for name in ["attn", "mlp", "attn"]:
        request = Request(ids, max_tokens=N, sampling=GREEDY, lookup=None, adapter=rows.index(name))
        (seq,) = engine.generate_batch([request])
        assert seq.timing.prefill_tokens == len(ids)  # no keys and values of another adapter
        assert seq.ids == alone(setup["model"], setup["adapters"][name], ids)
    (seq,) = engine.generate_batch([request])  # the same adapter again: its prefix is reused
    assert seq.timing.prefill_tokens == 1


def test_bad_adapter_requests(setup):
    model = llamalab.load_model(setup["model"])
    engine = Engine(model, llamalab.load_tokenizer(setup["model"]), max_batch=1, max_seq_len=64)
    with pytest.raises(LlamalabError, match="runs no LoRA adapters"):
        engine.add(Request(setup["ids"][0], max_tokens=2, adapter=1))
    path = setup["adapters"]["attn"]
    with pytest.raises(LlamalabError, match="two adapters are named 'x'"):
        serve_adapters(llamalab.load_model(setup["model"]), [("x", path, 1.0), ("x", path, 1.0)])


def test_the_server_picks_the_adapter_by_model_name(smollm2_path, tmp_path, capsys):
    """`llamalab serve --lora NAME=PATH`: `MODEL:NAME` replies as `generate --lora` does."""
    from conftest import http_request

    from llamalab.cli import main
    from llamalab.serve.launch import ServerProcess

    model = llamalab.load_model(smollm2_path, packed=True)
    apply_lora(model, rank=8, alpha=16, targets=[t for t in TARGETS if t != "output"], seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)
    path = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    del model
    prompt = "The capital of France is"

    def generate(*more: str) -> str:
        args = ["generate", "-m", str(smollm2_path), prompt, "-n", "12", "--temperature", "0"]
        assert main([*args, "--no-server", "--json", *more]) == 0
        return json.loads(capsys.readouterr().out)["text"]

    expected, plain = generate("--lora", str(path)), generate()
    assert expected != plain
    server = ServerProcess(
        ["--model", str(smollm2_path), "--max-batch", "2", "--ctx", "256", "--lora", f"ft={path}"]
    )
    server.launch()
    try:
        server.wait_ready()
        base = "SmolLM2-135M-Instruct.Q4_1"

        def complete(model_name: str) -> tuple[int, dict]:
            body = {"model": model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            status, data, _ = http_request(server.port, "POST", "/v1/completions", body, {})
            return status, json.loads(data)

        status, listing = http_request(server.port, "GET", "/v1/models", None, {})[:2]
        assert [m["id"] for m in json.loads(listing)["data"]] == [base, f"{base}:ft"]
        status, reply = complete(f"{base}:ft")
        assert status == 200 and reply["model"] == f"{base}:ft"
        assert reply["choices"][0]["text"] == expected
        status, reply = complete(base)
        assert status == 200 and reply["choices"][0]["text"] == plain
        status, reply = complete(f"{base}:other")
        assert status == 404 and reply["error"]["code"] == "model_not_found"
    finally:
        server.stop()


def test_passes_of_base_rows_alone_skip_the_adapters(setup, monkeypatch):
    from llamalab.train.lora import LoRAAdapter

    model = llamalab.load_model(setup["model"])
    rows = serve_adapters(model, [(n, p, 1.0) for n, p in setup["adapters"].items()])
    engine = Engine(model, llamalab.load_tokenizer(setup["model"]), max_batch=2, max_seq_len=64)
    calls = []
    real = LoRAAdapter.forward
    monkeypatch.setattr(LoRAAdapter, "forward", lambda self, x: calls.append(1) or real(self, x))
    base = Request(setup["ids"][0], max_tokens=4, sampling=GREEDY, lookup=None)
    engine.generate_batch([base, base])
    assert calls == []
    engine.generate_batch([base, Request(base.prompt_ids, max_tokens=4, adapter=rows.index("mlp"))])
    assert calls
