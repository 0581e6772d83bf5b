"""LoRA adapters: PEFT's initialisation and maths, merging, packed bases, parity with peft."""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.checkpoint.names import hf_to_meta_qk, meta_to_hf_qk, to_format
from llamalab.errors import LlamalabError
from llamalab.quant.linear import QuantizedLinear, fuse_projections, quantize_model
from llamalab.train.lora import (
    TARGETS,
    apply_lora,
    load_lora_state_dict,
    lora_adapters,
    lora_state_dict,
    merge_lora,
)

ALL = list(TARGETS)
HF_TARGET = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random HF Llama (grouped-query: q and k have different head counts) and its folder."""
    hf = make_hf_model("grouped-query")
    folder = tmp_path_factory.mktemp("lora") / "hf"
    hf.save_pretrained(folder)
    return hf, folder


def tokens_and_targets(seed: int, vocab: int = 320, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, shape, generator=g)
    labels = tokens.clone()
    labels[0, :5] = -100  # a masked prompt, as the instruction loss has
    labels[1, -3:] = -100
    return tokens, labels


def perturb_b(model, seed: int, std: float = 0.05) -> None:
    """Give every B nonzero values, so every gradient (A's too) is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {
        f"{n}.{part}": getattr(a, part).grad.clone()
        for n, a in lora_adapters(model).items()
        for part in ("lora_A", "lora_B")
    }


def loss_of(model, tokens, labels):
    return model(tokens[:, :-1], targets=labels[:, 1:])


# -- the adapters themselves -------------------------------------------------------


def test_adapters_start_as_peft_does_and_leave_the_model_unchanged(tiny):
    _, folder = tiny
    model = llamalab.load_model(folder)
    tokens, _ = tokens_and_targets(0)
    with torch.no_grad():
        before = model(tokens)
    names = apply_lora(model, rank=4, alpha=8, targets=ALL, seed=3)
    assert names[:3] == ["layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wv"]
    assert names[-1] == "output" and len(names) == 2 * 7 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    for name, adapter in lora_adapters(model).items():
        assert adapter.scaling == 8 / 4
        assert torch.count_nonzero(adapter.lora_B) == 0
        # kaiming_uniform(a=sqrt(5)) on (rank, in): uniform on ±1/sqrt(in).
        bound = 1 / math.sqrt(adapter.lora_A.shape[1])
        assert adapter.lora_A.abs().max() <= bound
        assert float(adapter.lora_A.detach().std()) == pytest.approx(
            bound / math.sqrt(3), rel=0.25
        ), name
    # The same seed gives the same adapters; another seed others.
    state = lora_state_dict(model)
    again, other = llamalab.load_model(folder), llamalab.load_model(folder)
    apply_lora(again, 4, 8, targets=ALL, seed=3)
    apply_lora(other, 4, 8, targets=ALL, seed=4)
    key = "layers.1.feed_forward.w2.lora_A.weight"
    torch.testing.assert_close(lora_state_dict(again)[key], state[key], atol=0, rtol=0)
    assert not torch.equal(lora_state_dict(other)[key], state[key])


def test_same_seed_same_adapters_on_float_and_packed_bases(tiny):
    _, folder = tiny
    float_model = llamalab.load_model(folder)
    packed = packed_float32(folder)
    apply_lora(float_model, 4, 8, targets=ALL, seed=5)
    apply_lora(packed, 4, 8, targets=ALL, seed=5)
    a, b = lora_state_dict(float_model), lora_state_dict(packed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -2}, "rank must be a positive integer"),
        ({"targets": ["wq", "q_proj"]}, "unknown LoRA target module 'q_proj'"),
        ({"targets": []}, "at least one target"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_bad_settings_are_refused_with_one_line(tiny, kwargs, message):
    _, folder = tiny
    settings = {"rank": 4, "alpha": 8, "targets": ["wq"], **kwargs}
    with pytest.raises(LlamalabError, match=message):
        apply_lora(llamalab.load_model(folder), **settings)


def test_merge_equals_base_plus_adapter(tiny):
    _, folder = tiny
    model = llamalab.load_model(folder)
    apply_lora(model, 4, 8, targets=ALL, seed=1)
    perturb_b(model, 2)
    tokens, _ = tokens_and_targets(1)
    with torch.no_grad():
        adapted = model(tokens)
        state = lora_state_dict(model)
        merge_lora(model)
        merged = model(tokens)
    assert not lora_adapters(model)
    assert (adapted - llamalab.load_model(folder)(tokens).detach()).abs().max() > 1e-2
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    # The merged weight is W + scaling * B @ A, computed here from the exported matrices.
    base = llamalab.load_model(folder)
    expected = base.layers[1].attention.wk.weight + 2.0 * (
        state["layers.1.attention.wk.lora_B.weight"] @ state["layers.1.attention.wk.lora_A.weight"]
    )
    torch.testing.assert_close(model.layers[1].attention.wk.weight, expected, atol=1e-6, rtol=0)


def test_state_dict_round_trip_and_mismatch(tiny):
    _, folder = tiny
    a = llamalab.load_model(folder)
    apply_lora(a, 4, 8, targets=["wq", "w2"], seed=1)
    perturb_b(a, 3)
    b = llamalab.load_model(folder)
    apply_lora(b, 4, 8, targets=["wq", "w2"], seed=9)
    load_lora_state_dict(b, lora_state_dict(a))
    tokens, _ = tokens_and_targets(2)
    with torch.no_grad():
        torch.testing.assert_close(b(tokens), a(tokens), atol=0, rtol=0)
    c = llamalab.load_model(folder)
    apply_lora(c, 8, 8, targets=["wq", "w2"])
    with pytest.raises(
        LlamalabError, match=r"lora_A has shape \[4, 64\], the model needs \[8, 64\]"
    ):
        load_lora_state_dict(c, lora_state_dict(a))
    d = llamalab.load_model(folder)
    apply_lora(d, 4, 8, targets=["wq"])
    with pytest.raises(LlamalabError, match="unexpected layers.0.feed_forward.w2"):
        load_lora_state_dict(d, lora_state_dict(a))


def packed_float32(folder) -> torch.nn.Module:
    """The model with float32 packed layers, q/k/v and w1/w3 fused as packed loads fuse them
    (``fuse_projections`` joins only the compact kernels' layers, so it is done here)."""
    model = llamalab.load_model(folder)
    quantize_model(model, kernel="float32")
    for layer in model.layers:
        for owner, fused, parts in (
            (layer.attention, "wqkv", ("wq", "wk", "wv")),
            (layer.feed_forward, "w13", ("w1", "w3")),
        ):
            weight = torch.cat([getattr(owner, p).dequantized_weight() for p in parts])
            setattr(owner, fused, QuantizedLinear.from_float(weight, kernel="float32"))
            for p in parts:
                delattr(owner, p)
    return model


# -- packed bases -------------------------------------------------------------------


def float_twin(packed) -> torch.nn.Module:
    """A float model whose linears hold the packed model's dequantized weights, unfused."""
    model = copy.deepcopy(packed)
    for layer in model.layers:
        for owner, fused, parts in (
            (layer.attention, "wqkv", ("wq", "wk", "wv")),
            (layer.feed_forward, "w13", ("w1", "w3")),
        ):
            module = getattr(owner, fused, None)
            if module is None:
                continue
            weight = module.dequantized_weight()
            sizes = (
                [owner.n_heads * owner.head_dim] + [owner.n_kv_heads * owner.head_dim] * 2
                if fused == "wqkv"
                else [weight.shape[0] // 2] * 2
            )
            for name, w in zip(parts, weight.split(sizes), strict=True):
                setattr(owner, name, _linear(w))
            setattr(owner, fused, None)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                _linear(module.dequantized_weight()),
            )
    if not isinstance(model.tok_embeddings, torch.nn.Embedding):
        rows = model.tok_embeddings(torch.arange(model.config.vocab_size)).detach()
        model.tok_embeddings = torch.nn.Embedding.from_pretrained(rows)
    return model


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return layer


@pytest.mark.parametrize("kernel", ["float32", "fp16"])
def test_packed_base_gives_the_float_gradients(tiny, kernel):
    """Adapters over packed, fused layers get the gradients they get over the same weights
    in float: the backward pass through the frozen packed layers is exact."""
    from llamalab.quant.linear import fp16_kernel_available

    if kernel == "fp16" and not fp16_kernel_available():
        pytest.skip("no fbgemm float16 kernel here")
    _, folder = tiny
    packed = packed_float32(folder) if kernel == "float32" else llamalab.load_model(folder)
    if kernel == "fp16":
        quantize_model(packed, kernel="fp16")
        assert fuse_projections(packed) == 2
    reference = float_twin(packed)
    for model in (packed, reference):
        apply_lora(model, 4, 8, targets=["wq", "wv", "w3", "w2"], seed=4)  # wo, w1, output plain
        perturb_b(model, 5)
    tokens, labels = tokens_and_targets(3)
    loss_p, loss_f = loss_of(packed, tokens, labels), loss_of(reference, tokens, labels)
    loss_p.backward()
    loss_f.backward()
    torch.testing.assert_close(loss_p, loss_f, atol=1e-5, rtol=0)
    ours, theirs = adapter_grads(packed), adapter_grads(reference)
    for key in theirs:
        assert theirs[key].abs().max() > 0, key
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)


def test_gguf_packed_base_backward_dequantizes_one_layer_at_a_time(tiny, tmp_path, monkeypatch):
    """A Q8_0 GGUF base loaded packed (its own kernels, fused q/k/v and w1/w3): adapter
    gradients follow the float model of the same weights, and backward never holds two
    dequantized weights at once."""
    _, folder = tiny
    gguf_file = convert(folder, tmp_path / "tiny.gguf", to="gguf", dtype="q8_0")
    packed = llamalab.load_model(gguf_file, packed=True)
    assert packed.layers[0].attention.wqkv is not None
    reference = float_twin(packed)
    for model in (packed, reference):
        apply_lora(model, 4, 8, targets=ALL, seed=6)
        perturb_b(model, 7)
    alive: list[weakref.ref] = []
    most = [0]
    original = QuantizedLinear.dequantized_weight

    def tracked(self):
        weight = original(self)
        most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
        alive.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(QuantizedLinear, "dequantized_weight", tracked)
    tokens, labels = tokens_and_targets(4)
    loss_p = loss_of(packed, tokens, labels)
    loss_p.backward()
    n_packed = sum(isinstance(m, QuantizedLinear) for m in packed.modules())
    # Each packed layer dequantized once, in backward, except the first q/k/v: its input,
    # the frozen embedding's output, needs no gradient.
    assert len(alive) == n_packed - 1
    assert most[0] == 1
    loss_f = loss_of(reference, tokens, labels)
    loss_f.backward()
    # llamalab's kernel rounds activations to 8 bits in the forward pass (not in backward).
    kernel = packed.layers[0].attention.wqkv.base.kernel
    tol = 1e-5 if kernel in ("float32", "fp16") else 3e-2
    torch.testing.assert_close(loss_p, loss_f, atol=tol, rtol=0)
    ours, theirs = adapter_grads(packed), adapter_grads(reference)
    for key in theirs:
        err = (ours[key] - theirs[key]).norm() / theirs[key].norm()
        assert err < (1e-4 if tol == 1e-5 else 5e-2), (key, float(err))


def test_merge_on_a_packed_base(tiny):
    _, folder = tiny
    packed = packed_float32(folder)
    apply_lora(packed, 4, 8, targets=["wk", "w1", "output"], seed=1)
    perturb_b(packed, 2)
    tokens, _ = tokens_and_targets(5)
    with torch.no_grad():
        adapted = packed(tokens)
        merge_lora(packed)
        torch.testing.assert_close(packed(tokens), adapted, atol=1e-5, rtol=0)
    assert isinstance(packed.layers[0].attention.wqkv, QuantizedLinear)


# -- parity with peft + transformers ----------------------------------------------


def peft_twin(hf, ours, rank: int, alpha: float, targets: list[str]):
    """``hf`` wrapped by peft with the same adapters as ``ours`` (q/k B rows permuted)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=[HF_TARGET[t] for t in targets],
        bias="none",
    )
    model = get_peft_model(copy.deepcopy(hf), config)
    heads = {"wq": ours.config.n_heads, "wk": ours.config.n_kv_heads}
    with torch.no_grad():
        for name, adapter in lora_adapters(ours).items():
            layer = peft_layer(model, name)
            assert layer.scaling["default"] == adapter.scaling
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            b = adapter.lora_B
            kind = name.rpartition(".")[2]
            if kind in heads:
                b = meta_to_hf_qk(b, heads[kind])
            layer.lora_B["default"].weight.copy_(b)
    return model


def peft_layer(model, name: str):
    return model.base_model.model.get_submodule(
        to_format(f"{name}.weight", "hf")[: -len(".weight")]
    )


def peft_grads(model, ours) -> dict[str, torch.Tensor]:
    """peft's adapter gradients under llamalab's names, B rows in Meta's q/k layout."""
    heads = {"wq": ours.config.n_heads, "wk": ours.config.n_kv_heads}
    out = {}
    for name in lora_adapters(ours):
        layer = peft_layer(model, name)
        out[f"{name}.lora_A"] = layer.lora_A["default"].weight.grad
        g = layer.lora_B["default"].weight.grad
        kind = name.rpartition(".")[2]
        out[f"{name}.lora_B"] = hf_to_meta_qk(g, heads[kind]) if kind in heads else g
    return out


@pytest.mark.parametrize("variant", ["grouped-query", "tied-output"])
def test_one_step_loss_and_every_gradient_equal_peft(variant, tmp_path):
    hf = make_hf_model(variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = llamalab.load_model(tmp_path / "hf")
    apply_lora(ours, rank=4, alpha=8, targets=ALL, seed=11)
    perturb_b(ours, 12)
    theirs = peft_twin(hf, ours, 4, 8, ALL)
    tokens, labels = tokens_and_targets(6)
    loss = loss_of(ours, tokens, labels)
    loss.backward()
    expected = theirs(input_ids=tokens, labels=labels).loss  # transformers shifts the labels
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    grads, reference = adapter_grads(ours), peft_grads(theirs, ours)
    assert grads.keys() == reference.keys() and len(grads) == 2 * 15
    for key, g in reference.items():
        assert g.abs().max() > 1e-4, key  # a gradient worth comparing
        torch.testing.assert_close(grads[key], g, atol=1e-5, rtol=0, msg=key)


def test_twenty_adamw_steps_follow_peft(tiny):
    hf, folder = tiny
    ours = llamalab.load_model(folder)
    targets = ["wq", "wk", "wv", "wo", "w2"]
    apply_lora(ours, rank=8, alpha=16, targets=targets, seed=21)
    perturb_b(ours, 22, std=0.02)
    theirs = peft_twin(hf, ours, 8, 16, targets)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)
    assert sum(p.numel() for g in opt_ours.param_groups for p in g["params"]) == sum(
        p.numel() for g in opt_theirs.param_groups for p in g["params"]
    )
    losses_ours, losses_theirs = [], []
    for step in range(20):
        tokens, labels = tokens_and_targets(100 + step % 4)
        for model, opt, losses in (
            (ours, opt_ours, losses_ours),
            (theirs, opt_theirs, losses_theirs),
        ):
            opt.zero_grad()
            loss = (
                loss_of(model, tokens, labels)
                if model is ours
                else model(input_ids=tokens, labels=labels).loss
            )
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses_ours[-1] < losses_ours[0] - 0.05  # it learned something
    for a, b in zip(losses_ours, losses_theirs, strict=True):
        assert abs(a - b) < 1e-4, (losses_ours, losses_theirs)
