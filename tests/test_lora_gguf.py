"""GGUF LoRA adapters: llama.cpp loads the ones llamalab writes (same logits, same greedy
tokens), `--lora` reads them back, and what is not one (or is for another base) is one line."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.checkpoint.lora_files import read_adapter
from llamalab.cli import main
from llamalab.errors import LlamalabError
from llamalab.train.lora import (
    TARGETS,
    apply_lora,
    export_gguf_adapter,
    load_adapters,
    lora_adapters,
    save_gguf_adapter,
    save_peft_adapter,
)

NO_OUTPUT = [t for t in TARGETS if t != "output"]


def perturb(model, seed: int, std: float) -> None:
    """Nonzero B everywhere, so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def llamacpp(model_path: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip("llama_cpp")
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    return llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=128,
        logits_all=True,
        verbose=False,
        n_threads=2,
        seed=0,
        **kwargs,
    )


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A random 2-layer model (grouped-query, untied output) as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("lora-gguf") / "hf"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf) -> Path:
    return convert(tiny_hf, tiny_hf.parent / "tiny-f32.gguf", to="gguf", dtype="f32")


def test_the_file_is_llamacpps_adapter_layout(tiny_gguf, tmp_path):
    model = llamalab.load_model(tiny_gguf)
    apply_lora(model, rank=4, alpha=8, targets=["wq", "w2", "output"], seed=0)
    path = save_gguf_adapter(model, tmp_path / "a.gguf")
    reader = gguf.GGUFReader(path)  # gguf-py's own reader: the reference for the layout
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    # ggml's ne order (innermost first): lora_a [in, rank], lora_b [rank, out].
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4]
    assert shapes["blk.0.attn_q.weight.lora_b"] == [4, 64]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [160, 4]
    assert shapes["blk.1.ffn_down.weight.lora_b"] == [4, 64]
    assert shapes["output.weight.lora_b"] == [4, 320]
    assert len(shapes) == 2 * (2 * 2 + 1)


# What the base alone meets against llama.cpp (tests/test_llamacpp_interop.py): llama.cpp
# keeps its KV cache in float16, and Q8_0 also rounds the weights.
TOLERANCE = {"f32": 0.02, "q8_0": 0.3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_llamacpp_runs_our_adapter_on_the_gguf_base(tiny_hf, tmp_path, dtype):
    base_file = convert(tiny_hf, tmp_path / f"tiny-{dtype}.gguf", to="gguf", dtype=dtype)
    model = llamalab.load_model(base_file, packed=dtype != "f32")
    tokens = [5, 17, 99, 3, 250, 7, 64, 128]
    base = logits(model, tokens)
    apply_lora(model, rank=4, alpha=8, targets=list(TARGETS), seed=0)
    perturb(model, 1, 0.3)
    ours = logits(model, tokens)
    path = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    theirs_base = llamacpp_logits(llamacpp(base_file), tokens)
    theirs = llamacpp_logits(llamacpp(base_file, path), tokens)
    assert np.abs(theirs_base - base).max() < TOLERANCE[dtype]  # the base alone
    assert np.abs(ours - base).max() > 1.0  # the adapter matters
    assert np.abs(theirs - ours).max() < TOLERANCE[dtype]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_smollm2_q4_1_adapter_in_llamacpp_and_in_llamalab(smollm2_path, tmp_path, capsys):
    """The packed default model: llama.cpp with our GGUF adapter gives the greedy tokens
    of `generate --lora adapter.gguf`. Its logits are compared with the gap the base
    alone has: llama.cpp rounds every activation to 8 bits against Q4_1 weights, an error
    that grows with the activations an adapter changes, so the bound is 1.5 times it."""
    from llamalab.generation.chat import build_messages

    model = llamalab.load_model(smollm2_path, packed=True)
    tokenizer = llamalab.load_tokenizer(smollm2_path)
    prompt = "What is the capital of France?"
    ids = tokenizer.encode_chat(build_messages(prompt, None))
    base = logits(model, ids)
    # SmolLM2 ties its output to the embeddings: llama.cpp can adapt every other target.
    apply_lora(model, rank=8, alpha=16, targets=NO_OUTPUT, seed=0)
    perturb(model, 1, 0.03)
    ours = logits(model, ids)
    path = save_gguf_adapter(model, tmp_path / "adapter.gguf")
    llm_base = llamacpp(smollm2_path)
    base_gap = np.abs(llamacpp_logits(llm_base, ids) - base).max()
    plain = llamacpp_greedy(llm_base, ids, 12)
    del llm_base
    llm = llamacpp(smollm2_path, path)
    theirs = llamacpp_logits(llm, ids)
    assert np.abs(ours - base).max() > 2 * base_gap  # the adapter matters
    assert np.abs(theirs - ours).max() <= 1.5 * base_gap
    theirs_tokens = llamacpp_greedy(llm, ids, 12)
    assert theirs_tokens != plain  # the adapter changes what is generated
    code = main(
        ["generate", "-m", str(smollm2_path), "--lora", str(path), "--chat", prompt]
        + ["-n", "12", "--temperature", "0", "--json", "--no-server"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    got = json.loads(captured.out)["ids"]
    # generate stops at the end of the turn, llama.cpp's loop here runs on past it.
    assert len(got) >= 5 and got == theirs_tokens[: len(got)]
    assert len(got) == 12 or theirs_tokens[len(got)] in tokenizer.stop_ids


def test_gguf_and_peft_copies_of_one_adapter_load_alike(tiny_gguf, tmp_path):
    model = llamalab.load_model(tiny_gguf)
    apply_lora(model, rank=4, alpha=6, targets=list(TARGETS), seed=3)
    perturb(model, 4, 0.2)
    gguf_file = save_gguf_adapter(model, tmp_path / "a.gguf")
    folder = save_peft_adapter(model, tmp_path / "peft")
    tokens = [1, 2, 3, 40, 50, 60]
    expected = logits(model, tokens)
    for adapters in ([(gguf_file, 1.0)], [(folder, 1.0)], [(gguf_file, 0.5), (folder, 0.5)]):
        run = llamalab.load_model(tiny_gguf)
        load_adapters(run, adapters)
        np.testing.assert_allclose(logits(run, tokens), expected, atol=1e-5, rtol=0)
    a, b = read_adapter(gguf_file, model.config)["layers.1.attention.wk"]
    ref = lora_adapters(model)["layers.1.attention.wk"]
    torch.testing.assert_close(b @ a, ref.delta_weight().detach(), atol=1e-6, rtol=0)


def _write_adapter(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", **kv):
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_type(kv.pop("general_type", "adapter"))
    writer.add_string("adapter.type", kv.pop("adapter_type", "lora"))
    writer.add_float32("adapter.lora.alpha", 4.0)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_what_is_not_a_gguf_adapter_for_this_base_is_one_line(
    tiny_gguf, smollm2_tokenizer, tmp_path, capsys
):
    from test_finetune import make_tiny_chat_model

    chat_model = make_tiny_chat_model(tmp_path / "tiny", smollm2_tokenizer)  # dim 64
    a, b = np.zeros((2, 64)), np.zeros((64, 2))
    good = {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}
    cases = [
        (tiny_gguf, "not a LoRA adapter (a GGUF file with general.type 'model')"),  # a model
        (_write_adapter(tmp_path / "qwen.gguf", good, arch="qwen2"), "made for another base"),
        (
            _write_adapter(
                tmp_path / "wide.gguf",
                {
                    **good,
                    "blk.0.ffn_up.weight.lora_a": np.zeros((2, 80)),
                    "blk.0.ffn_up.weight.lora_b": np.zeros((160, 2)),
                },
            ),
            "made for another base: layers.0.feed_forward.w3 takes 80 inputs",
        ),
        (
            _write_adapter(
                tmp_path / "deep.gguf",
                {"blk.7.attn_q.weight.lora_a": a, "blk.7.attn_q.weight.lora_b": b},
            ),
            "made for another base: it adapts layers.7.attention.wq",
        ),
        (
            _write_adapter(tmp_path / "half.gguf", {"blk.0.attn_q.weight.lora_a": a}),
            "has lora_a or lora_b but not both",
        ),
        (
            _write_adapter(tmp_path / "cvec.gguf", good, adapter_type="control_vector"),
            "not a LoRA adapter",
        ),
        (
            _write_adapter(
                tmp_path / "embd.gguf",
                {"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": b},
            ),
            "not a linear layer llamalab can adapt",
        ),
    ]
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    cases.append((tmp_path / "junk.gguf", "not a LoRA adapter"))
    capsys.readouterr()  # transformers' saving progress
    for path, message in cases:
        code = main(["generate", "-m", str(chat_model), "--lora", str(path), "hi", "-n", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1, path
        assert len(err) == 1 and message in err[0], (path, err)


def test_a_tied_output_adapter_is_not_written_for_llamacpp(tmp_path, capsys):
    make_hf_model("tied-output").save_pretrained(tmp_path / "hf")
    model = llamalab.load_model(tmp_path / "hf")
    apply_lora(model, rank=2, alpha=4, targets=["wq", "output"], seed=0)
    with pytest.raises(LlamalabError, match="tied to its embeddings"):
        save_gguf_adapter(model, tmp_path / "a.gguf")
    assert export_gguf_adapter(model, tmp_path) is None
    assert "no adapter.gguf" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "adapter.gguf").exists()
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind


def test_finetune_writes_the_gguf_adapter_beside_the_peft_folder(smollm2_tokenizer, tmp_path):
    from test_finetune import LORA, make_tiny_chat_model, run_here, write_items

    model = make_tiny_chat_model(tmp_path / "tiny", smollm2_tokenizer)
    data = write_items(tmp_path / "items.jsonl")
    out = tmp_path / "run"
    run_here(
        LORA, model, data, out, "max_steps=2", "checkpoint_every=1", 'targets=["wq","wv","w2"]'
    )
    assert (out / "adapter" / "adapter_config.json").is_file()
    tokens = [1, 2, 3, 40, 50, 60]
    by_peft, by_gguf = llamalab.load_model(model), llamalab.load_model(model)
    load_adapters(by_peft, [(out / "adapter", 1.0)])
    load_adapters(by_gguf, [(out / "adapter.gguf", 1.0)])
    np.testing.assert_allclose(logits(by_gguf, tokens), logits(by_peft, tokens), atol=1e-6)
