"""``llamalab info``: what a checkpoint is and what running it takes."""

from __future__ import annotations

import json

from conftest import run_cli

LLAMA_7B_PARAMETERS = 6_738_415_616  # the paper's exact count (Table 2)
LLAMA_7B_EMBEDDING = 32_000 * 4096
LLAMA_7B_NORMS = (2 * 32 + 1) * 4096


def info_json(*args: str) -> dict:
    result = run_cli("info", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_preset_memory_matches_the_paper_sizes():
    report = info_json("llama-7b", "--dtype", "float32", "--ctx", "2048")
    run = report["run_memory"]
    assert run["weights_bytes"] == 4 * LLAMA_7B_PARAMETERS
    # keys and values, 32 layers of 4096 float32 values each: 1 MiB per token
    assert run["kv_cache_bytes"] == 2048 * (1 << 20)
    auto = info_json("llama-7b")["run_memory"]
    linear = LLAMA_7B_PARAMETERS - LLAMA_7B_EMBEDDING - LLAMA_7B_NORMS
    assert auto["weights_bytes"] == 2 * linear + 4 * (LLAMA_7B_EMBEDDING + LLAMA_7B_NORMS)
    assert auto["ctx"] == 2048


def test_checkpoint_report_names_path_tokens_and_template(smollm2_path):
    report = info_json(str(smollm2_path), "--ctx", "100000")
    assert report["path"] == str(smollm2_path.resolve())
    assert report["bos"] == {"id": 1, "text": "<|im_start|>"}
    assert report["eos"] == {"id": 2, "text": "<|im_end|>"}
    assert {"id": 2, "text": "<|im_end|>"} in report["stop_tokens"]
    assert report["chat_template"]["origin"] == "gguf"
    assert "<|im_start|>" in report["chat_template"]["source"]
    # the cache is never sized past the model's own context
    assert report["run_memory"]["ctx"] == report["context_length"] == 8192
    text = run_cli("info", str(smollm2_path)).stdout
    for label in ("path", "bos / eos", "chat template", "to run (auto, ctx 2048)"):
        assert label in text, text


def test_auto_memory_equals_what_the_packed_model_holds(smollm2_path):
    """`info`'s weight bytes for --dtype auto are the bytes the loaded model's tensors take
    (vnni or int4 where this CPU runs them, float16 otherwise, the embedding as stored)."""
    import torch

    import llamalab

    model = llamalab.load_model(smollm2_path, packed=True)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for attr in ("_vnni", "_int4", "_weight", "_rows"):
            value = getattr(module, attr, None)
            for tensor in (
                value if isinstance(value, tuple) else (value,) if value is not None else ()
            ):
                if isinstance(tensor, torch.Tensor):  # not vnni's bits and group
                    held += tensor.numel() * tensor.element_size()
        if getattr(module, "_packed", None) is not None:  # fbgemm float16: 2 bytes a weight
            held += 2 * module.in_features * module.out_features
    assert info_json(str(smollm2_path))["run_memory"]["weights_bytes"] == held
