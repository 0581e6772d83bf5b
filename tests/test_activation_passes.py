"""Two int8 passes over the activations (``kernels.native.set_activation_passes``), the
setting ``llamalab eval`` runs the packed kernels with, on every instruction-set build.

The reference is float32 maths on the weights as the kernels hold them. One pass moves
each activation by at most half its block's int8 step; the second pass quantizes that
rounding residual again, so what is left is at most half the residual's own step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as T

from llamalab.errors import LlamalabError
from llamalab.kernels import compiler
from llamalab.kernels.cpu import ISAS, isa_runs

RUNNABLE = [isa for isa in ISAS if isa_runs(isa)]
pytestmark = pytest.mark.skipif(
    not RUNNABLE or compiler() is None, reason="no kernel build runs here (CPU or compiler)"
)


def _steps(x: torch.Tensor) -> torch.Tensor:
    """Each activation's int8 step: max |x| / 127 over its block of 16."""
    step = x.abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True) / 127
    return step.expand(*step.shape[:-1], 16).flatten(-2)


def _layer(qtype: T, shape: tuple[int, int]):
    import gguf

    from llamalab.quant.linear import QuantizedLinear

    rng = np.random.default_rng(3)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:, :32] += 0.3  # an offset, so that the stored zeros take part
    layer = QuantizedLinear.from_gguf(gguf.quants.quantize(w, qtype), qtype, shape)
    assert layer.kernel == "vnni"
    return layer


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
def test_two_passes_leave_a_residual_of_a_residual(isa: str, qtype: T) -> None:
    from llamalab.kernels import native

    shape = (96, 512)
    layer = _layer(qtype, shape)
    buffer, layout = layer._vnni
    weight = layer.dequantized_weight()
    op = native.ops(isa).vnni_linear
    torch.manual_seed(0)
    x = torch.randn(70, shape[1]) * torch.rand(70, 1) * 4  # rows of different scales
    x[:, 5] *= 30  # an outlier, as LLaMA activations have
    ref = F.linear(x.double(), weight.double()).float()
    previous = native.set_activation_passes(1, isa)
    try:
        one = op(x, buffer, shape[0], *layout)
        assert native.set_activation_passes(2, isa) == 1
        two = op(x, buffer, shape[0], *layout)
        # Within the two-pass bound: half the residual's step (at most half the first step
        # over 127, rounded up) plus float32 rounding of the sums.
        bound = (
            F.linear(_steps(x) / 2 / 127 * 0.51, weight.abs())
            + 2e-6 * F.linear(x.abs(), weight.abs())
            + 1e-5
        )
        assert float(((two - ref).abs() - bound).max()) <= 0.0
        assert float((two - ref).abs().max()) * 50 < float((one - ref).abs().max())
        # Rows stay independent, and the setting is read by every call.
        singles = torch.cat([op(x[i : i + 1], buffer, shape[0], *layout) for i in range(8)])
        assert torch.equal(singles, two[:8])
        native.set_activation_passes(1, isa)
        assert torch.equal(op(x, buffer, shape[0], *layout), one)
    finally:
        native.set_activation_passes(previous, isa)


def test_only_one_or_two_passes() -> None:
    from llamalab.kernels import native

    for bad in (0, 3, -1):
        with pytest.raises(LlamalabError, match="1 or 2"):
            native.set_activation_passes(bad)


def test_eval_scores_with_two_passes_and_leaves_the_setting_after(smollm2_path) -> None:
    """``llamalab eval`` (in this process) scores with two passes, and afterwards the
    process is back at one: a later command or library call in it is unchanged."""
    from unittest import mock

    from llamalab.cli import main
    from llamalab.eval import runner
    from llamalab.kernels import native
    from llamalab.runtime import load_runtime

    seen = []
    real = runner.run_choice

    def spy(*args, **kwargs):
        seen.append(native.set_activation_passes(2))  # the setting while it scores
        return real(*args, **kwargs)

    fixture = str(Path(__file__).resolve().parent / "fixtures" / "eval" / "mc.jsonl")
    with mock.patch.object(runner, "run_choice", spy):
        assert main(["eval", "-m", str(smollm2_path), "--task", fixture, "--json"]) == 0
    assert seen == [2 if native.vnni_available() else 1]
    assert native.set_activation_passes(1) == 1  # set back after the command
    model, _ = load_runtime(str(smollm2_path), "float32", device="cpu", threads=1)
    with runner.scoring_kernels(model):  # float32: the kernels are not in the way
        assert native.set_activation_passes(1) == 1
