"""``convert --to gguf --dtype q4_0 ...``: quantized files load, and their error is the format's."""

from __future__ import annotations

import gguf
import pytest
import torch
from conftest import make_hf_model, run_cli

from llamalab import load_model
from llamalab.checkpoint.convert import convert
from llamalab.gguf.header import read_gguf_header

DTYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant") / "hf"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


def quantized_reference(dtype: str) -> torch.nn.Module:
    """transformers' model with every matrix rounded through gguf-py's own quantizer.

    Quantization blocks run along rows, so the q/k row order (Hugging Face's or Meta's)
    does not change the result: this is what the GGUF file must hold, reached without
    any llamalab code.
    """
    model = make_hf_model("grouped-query")
    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                blocks = gguf.quants.quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, qtype)))
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_gguf_equals_the_reference_quantization(hf_folder, tmp_path, dtype):
    out = convert(hf_folder, tmp_path / f"m-{dtype}.gguf", to="gguf", dtype=dtype)
    _, tensors = read_gguf_header(out)
    assert {t.qtype.name for t in tensors if len(t.shape) == 2} == {dtype.upper()}
    assert {t.qtype.name for t in tensors if len(t.shape) == 1} == {"F32"}  # norms

    tokens = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = quantized_reference(dtype)(tokens).logits
        ours = load_model(out)(tokens)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_quant_types_are_gguf_only(hf_folder, tmp_path):
    result = run_cli(
        "convert", str(hf_folder), str(tmp_path / "x"), "--to", "hf", "--dtype", "q4_0"
    )
    assert result.returncode == 1 and "q4_0 can only be written to GGUF" in result.stderr
    assert not (tmp_path / "x").exists()


def test_gguf_package_agrees_on_the_bytes(hf_folder, tmp_path):
    """Our reader dequantizes what we wrote exactly as gguf-py does."""
    out = convert(hf_folder, tmp_path / "m.gguf", to="gguf", dtype="q4_1")
    reference = gguf.GGUFReader(out)
    theirs = {t.name: t for t in reference.tensors}
    model = load_model(out)
    ours = model.state_dict()["layers.0.attention.wq.weight"]
    tensor = theirs["blk.0.attn_q.weight"]
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    assert torch.equal(ours, torch.from_numpy(expected.reshape(ours.shape)))
