"""GGUF files that llamalab writes load and run in llama.cpp (skipped without llama-cpp-python)."""

import numpy as np
import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (it compiles for ~20 min)"
)

# llama.cpp keeps its KV cache in float16, and Q8_0 also rounds the weights.
TOLERANCE = {"f32": 0.02, "f16": 0.02, "q8_0": 0.3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_llamacpp_runs_our_gguf(tmp_path, dtype):
    make_hf_model("grouped-query").save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / f"model-{dtype}.gguf", to="gguf", dtype=dtype)
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2
    )
    tokens = [5, 17, 99, 3, 250, 7, 64, 128]
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)])
    with torch.no_grad():
        ours = llamalab.load_model(path)(torch.tensor([tokens]))[0].numpy()
    assert ours.std() > 0.5
    assert np.abs(theirs - ours).max() < TOLERANCE[dtype]
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
