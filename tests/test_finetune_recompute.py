"""``recompute = true``: each block keeps its input alone and recomputes its activations
in backward; the run's losses and adapters are those of the run that keeps them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import LORA, losses, run_here


@pytest.mark.parametrize("which", ["float", "packed"])
def test_recomputed_activations_give_the_same_run(tiny_gguf, tmp_path, which):
    model, gguf_file, data = tiny_gguf
    base = model if which == "float" else gguf_file
    # dropout > 0: the recomputed pass must replay the same dropout masks.
    more = ["max_steps=3", "eval_every=3", "lr=5e-2", "dropout=0.1", 'targets=["wq","w1","w2"]']
    runs = {}
    for recompute in ("false", "true"):
        out = tmp_path / recompute
        run_here(LORA, base, data, out, *more, f"recompute={recompute}")
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        runs[recompute] = (losses(out), adapter)
    (kept, kept_adapter), (redone, redone_adapter) = runs["false"], runs["true"]
    assert len(kept) == 3
    torch.testing.assert_close(redone, kept, atol=1e-6, rtol=0)
    for key, value in kept_adapter.items():
        torch.testing.assert_close(redone_adapter[key], value, atol=1e-6, rtol=1e-5)


def test_recompute_must_be_a_boolean(tiny_gguf, tmp_path, capsys):
    from test_finetune import sets

    from llamalab.cli import main

    model, _, data = tiny_gguf
    out = tmp_path / "run"
    args = ["finetune", str(LORA), *sets(model, data, out, "max_steps=1", "recompute=2")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recompute must be true or false, got 2" in err[0], err
    assert not out.exists()
