"""Logits parity with transformers' LlamaForCausalLM, directly and after format round trips."""

import pytest
import torch
from conftest import TINY_HF_CONFIGS, make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.kv_cache import cache_view

TOL = 1e-4


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module", params=list(TINY_HF_CONFIGS))
def hf_folder(request, tmp_path_factory):
    model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(folder)
    return model, folder


def test_logits_match_transformers(hf_folder):
    hf_model, folder = hf_folder
    ours = llamalab.load_model(folder)
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1)
    )
    expected = hf_logits(hf_model, tokens)
    assert expected.std() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(our_logits(ours, tokens), expected, atol=TOL, rtol=0)


def test_logits_match_after_hf_meta_gguf_round_trip(hf_folder, tmp_path):
    hf_model, folder = hf_folder
    meta = convert(folder, tmp_path / "meta", to="meta", shards=2)
    assert sorted(p.name for p in meta.glob("consolidated.*.pth")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    gguf_file = convert(meta, tmp_path / "model.gguf", to="gguf", dtype="f32")
    ours = llamalab.load_model(gguf_file)
    assert ours.config == llamalab.load_config(folder)
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(
        our_logits(ours, tokens), hf_logits(hf_model, tokens), atol=TOL, rtol=0
    )


def test_written_hf_folder_loads_in_transformers(hf_folder, tmp_path):
    from transformers import LlamaForCausalLM

    hf_model, folder = hf_folder
    gguf_file = convert(folder, tmp_path / "model.gguf", to="gguf", dtype="f32")
    back = convert(gguf_file, tmp_path / "hf", to="hf")
    reloaded = LlamaForCausalLM.from_pretrained(back).eval()
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(
        hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=TOL, rtol=0
    )


def test_training_loss_matches_transformers(hf_folder):
    hf_model, folder = hf_folder
    ours = llamalab.load_model(folder)
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        expected = hf_model(tokens, labels=tokens).loss  # HF shifts the labels itself
        loss = ours(tokens[:, :-1], targets=tokens[:, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_kv_cached_decoding_equals_full_recomputation(hf_folder):
    _, folder = hf_folder
    model = llamalab.load_model(folder)
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5)
    )
    full = our_logits(model, tokens)
    model.setup_cache(max_batch_size=2, max_seq_len=64)
    prefill = 17
    steps = [model(tokens[:, :prefill], cache=cache_view(torch.arange(prefill)))]
    with torch.no_grad():
        for pos in range(prefill, tokens.shape[1]):
            steps.append(model(tokens[:, pos : pos + 1], cache=cache_view(torch.tensor([pos]))))
    cached = torch.cat([s.detach() for s in steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
