"""Adapters out: the PEFT folder loads with peft onto the Hugging Face copy of the base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.errors import LlamalabError
from llamalab.train.lora import TARGETS, apply_lora, lora_adapters, save_peft_adapter


def perturb(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize(
    "variant, targets",
    [
        ("grouped-query", list(TARGETS)),
        ("multi-head", ["wq", "wk"]),
        ("tied-output", ["wv", "output"]),
    ],
)
def test_peft_loads_the_exported_adapter_with_the_same_logits(tmp_path, variant, targets):
    from peft import PeftModel

    hf = make_hf_model(variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = llamalab.load_model(tmp_path / "hf")
    apply_lora(ours, rank=4, alpha=12, targets=targets, seed=1)
    perturb(ours, 2)
    folder = save_peft_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 12)

    loaded = PeftModel.from_pretrained(make_hf_model(variant), folder).eval()
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = loaded(tokens).logits
        base = hf(tokens).logits
        got = ours(tokens)
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    hf = make_hf_model("grouped-query")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(LlamalabError, match="no LoRA adapters"):
        save_peft_adapter(llamalab.load_model(tmp_path / "hf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
