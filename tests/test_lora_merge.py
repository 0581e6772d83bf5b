"""`llamalab convert BASE DST --lora ADAPTER[:SCALE]`: the merged model equals the base with
the adapter on top (float32), a quantized merge loses no more than quantizing the base
does, and an adapter for another base is one line with nothing written."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.cli import main
from llamalab.errors import LlamalabError
from llamalab.train.lora import (
    TARGETS,
    apply_lora,
    load_adapters,
    lora_adapters,
    save_gguf_adapter,
    save_peft_adapter,
)

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 7, 64, 128, 1, 300, 42, 42]])


def perturb(model, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0].float()


@pytest.fixture(scope="module", params=["grouped-query", "tied-output"])
def adapted(request, tmp_path_factory) -> dict:
    """A tiny float32 base, an adapter on every target saved both ways, and the logits of
    the base with the adapter on top (the reference a merge must equal)."""
    base = tmp_path_factory.mktemp(f"merge-{request.param}")
    make_hf_model(request.param).save_pretrained(base / "hf")
    model = llamalab.load_model(base / "hf")
    apply_lora(model, rank=4, alpha=8, targets=list(TARGETS), seed=0)
    perturb(model, 1, 0.2)
    files = {"peft": save_peft_adapter(model, base / "peft")}
    if request.param != "tied-output":  # llama.cpp cannot adapt a tied output
        files["gguf"] = save_gguf_adapter(model, base / "adapter.gguf")
    return {"base": base, "hf": base / "hf", "files": files, "expected": logits(model)}


@pytest.mark.parametrize("to", ["hf", "gguf", "meta"])
def test_the_float32_merge_equals_the_base_with_the_adapter(adapted, to, capsys):
    plain = logits(llamalab.load_model(adapted["hf"]))
    assert (adapted["expected"] - plain).abs().max() > 0.5  # the adapter matters
    for kind, adapter in adapted["files"].items():
        dst = adapted["base"] / f"merged-{kind}-{to}{'.gguf' if to == 'gguf' else ''}"
        args = ["convert", str(adapted["hf"]), str(dst), "--to", to, "--dtype", "f32"]
        assert main([*args, "--lora", str(adapter)]) == 0, capsys.readouterr().err
        merged = llamalab.load_model(dst)
        torch.testing.assert_close(logits(merged), adapted["expected"], atol=1e-5, rtol=0)
        # The embedding stays the base's; a tied output that was adapted is untied.
        assert merged.config.tie_embeddings is False


def test_scales_add_up_and_zero_is_the_base(adapted, tmp_path):
    peft = adapted["files"]["peft"]
    half = convert(adapted["hf"], tmp_path / "half", to="hf", lora=[(peft, 0.5), (peft, 0.5)])
    torch.testing.assert_close(
        logits(llamalab.load_model(half)), adapted["expected"], atol=1e-5, rtol=0
    )
    zero = convert(adapted["hf"], tmp_path / "zero", to="hf", lora=[(peft, 0.0)])
    base = logits(llamalab.load_model(adapted["hf"]))
    torch.testing.assert_close(logits(llamalab.load_model(zero)), base, atol=1e-5, rtol=0)


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) of the next-token distributions, averaged over positions."""
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_a_quantized_merge_loses_what_quantizing_the_base_loses(tmp_path, qtype):
    """KL from float32 over held-out tokens: the merge written as QTYPE against the float32
    base with the adapter on top, beside the base written as QTYPE against the float32
    base. The bar is 1.5 times the base's loss."""
    make_hf_model("grouped-query", seed=3).save_pretrained(tmp_path / "hf")
    model = llamalab.load_model(tmp_path / "hf")
    g = torch.Generator().manual_seed(7)
    held_out = torch.randint(0, 320, (4, 64), generator=g)
    float_base = logits(model, held_out)
    apply_lora(model, rank=8, alpha=16, targets=list(TARGETS), seed=0)
    perturb(model, 2, 0.05)  # an update about a tenth of the weights' size
    float_merged = logits(model, held_out)
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    base_q = convert(tmp_path / "hf", tmp_path / f"base-{qtype}.gguf", to="gguf", dtype=qtype)
    merged_q = convert(
        tmp_path / "hf", tmp_path / f"merged-{qtype}.gguf", to="gguf", dtype=qtype,
        lora=[(adapter, 1.0)],
    )  # fmt: skip
    base_kl = mean_kl(float_base, logits(llamalab.load_model(base_q), held_out))
    merged_kl = mean_kl(float_merged, logits(llamalab.load_model(merged_q), held_out))
    assert mean_kl(float_base, float_merged) > merged_kl  # the adapter matters
    assert 0 < merged_kl <= 1.5 * base_kl, (merged_kl, base_kl)


def test_an_adapter_that_does_not_fit_is_one_line_and_nothing_is_written(adapted, tmp_path, capsys):
    other = make_hf_model("multi-head")  # four key/value heads: wk and wv are wider
    other.save_pretrained(tmp_path / "other")
    cases = [
        (adapted["files"]["peft"], "made for another base"),
        (adapted["hf"], "not a LoRA adapter"),
        (f"{adapted['files']['peft']}:x", "SCALE must be a number"),
    ]
    capsys.readouterr()
    for lora, message in cases:
        dst = tmp_path / "merged"
        code = main(
            ["convert", str(tmp_path / "other"), str(dst), "--to", "hf", "--lora", str(lora)]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert len(err) == 1 and message in err[0], err
        assert not dst.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["other"]


def test_load_adapters_runs_what_convert_merges(adapted, tmp_path):
    """The same adapters, merged by convert or run unmerged, give the same logits."""
    files = list(adapted["files"].values())
    run = llamalab.load_model(adapted["hf"])
    load_adapters(run, [(f, 1.0 / len(files)) for f in files])
    torch.testing.assert_close(logits(run), adapted["expected"], atol=1e-5, rtol=0)
    merged = convert(
        adapted["hf"], tmp_path / "m", to="hf", lora=[(f, 1.0 / len(files)) for f in files]
    )
    torch.testing.assert_close(logits(llamalab.load_model(merged)), logits(run), atol=1e-5, rtol=0)


def test_a_missing_adapter_writes_nothing(adapted, tmp_path):
    with pytest.raises(LlamalabError, match="not a LoRA adapter"):
        convert(adapted["hf"], tmp_path / "m", to="hf", lora=[(tmp_path / "none", 1.0)])
    assert list(tmp_path.iterdir()) == []
