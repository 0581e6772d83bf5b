"""Model behaviour beyond parity: dtypes, cache rows, info, devices."""

import json

import pytest
import torch
from conftest import run_cli

from llamalab.config import get_preset
from llamalab.kv_cache import Segments, cache_view
from llamalab.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(get_preset("debug"))
    m.reset_parameters(std=0.2)
    return m.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(model, dtype):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        half = Transformer(model.config).to(dtype)
        half.load_state_dict(model.state_dict())
        out = half.eval()(tokens)
    assert out.dtype == dtype
    assert (out.float() - full).abs().max() < 0.1 * full.abs().max()


def test_cache_rows_are_independent_sequences(model):
    a = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        model.setup_cache(max_batch_size=3, max_seq_len=32)
        # Prefill row 2 with b and row 0 with a (different lengths), then decode both together.
        model(b[:, :-1], cache=cache_view(torch.arange(8), row=2))
        model(a[:, :-1], cache=cache_view(torch.arange(19), row=0))
        tokens = torch.tensor([[a[0, -1]], [0], [b[0, -1]]])
        pos = torch.tensor([[19], [0], [8]])
        step = model(tokens, cache=cache_view(pos, row=0, kv_len=20))
    model.clear_cache()
    torch.testing.assert_close(step[0, 0], full_a[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[2, 0], full_b[0, -1], atol=1e-5, rtol=0)


def test_segments_in_one_pass_equal_full_recomputation(model):
    """Decode rows and a prefill chunk packed into one pass give every sequence's logits."""
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(0, 256, (1, n), generator=gen) for n in (12, 7, 15))
    with torch.no_grad():
        full = [model(x)[0] for x in (a, b, c)]
        model.setup_cache(max_batch_size=3, max_seq_len=32)
        model(a[:, :-1], cache=cache_view(torch.arange(11), row=0))
        model(b[:, :-1], cache=cache_view(torch.arange(6), row=1))
        model(c[:, :6], cache=cache_view(torch.arange(6), row=2))
        # rows 0-1 decode their last token while row 2 prefills tokens 6..14 (not last only)
        decode = cache_view(torch.tensor([[11], [6]]), row=0, kv_len=12)
        chunk = cache_view(torch.arange(6, 15), row=2)
        packed = torch.cat([torch.tensor([[a[0, -1], b[0, -1]]]), c[:, 6:]], dim=1)
        step, prefill = model(packed, cache=Segments((decode, chunk), ((2, 1), (1, 9))))
    model.clear_cache()
    assert step.shape == (2, 1, 256) and prefill.shape == (1, 9, 256)
    torch.testing.assert_close(step[0, 0], full[0][-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1, 0], full[1][-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[0], full[2][6:], atol=1e-5, rtol=0)


def test_training_step_reduces_loss(model):
    m = Transformer(model.config)
    m.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for _ in range(5):
        loss = m(tokens[:, :-1], targets=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_matches_cpu_float32(model):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    gpu = Transformer(model.config).to("cuda", torch.bfloat16)
    gpu.load_state_dict(model.state_dict())
    gpu.init_buffers("cuda")
    with torch.no_grad():
        out = gpu.eval()(tokens.cuda()).float().cpu()
        ref = model(tokens)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_info_json_for_a_preset_and_the_default_model(smollm2_path):
    preset = json.loads(run_cli("info", "llama-65b", "--json").stdout)
    assert preset["parameters"] == 65_285_660_672 and preset["format"] == "preset"
    result = run_cli("info", str(smollm2_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "gguf"
    assert info["parameters"] == 134_515_008  # tied output counted once
    assert (info["n_layers"], info["dim"], info["n_heads"], info["n_kv_heads"]) == (30, 576, 9, 3)
    assert (info["vocab_size"], info["context_length"]) == (49152, 8192)
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert "gpt2" in info["tokenizer"]
