"""A 0.9B-parameter LLaMA with random weights, quantized by llama.cpp's own quantizer.

Decode speed on a model this size is set by memory bandwidth, not per-operation
overhead, which SmolLM2-135M cannot show. The shape: dim 2048, 16 layers, 32 query
heads and 8 key/value heads, FFN 5632, untied output, SmolLM2's vocabulary and
tokenizer (49,152 tokens). Weights are normal(0, 0.02), norms are ones.

The float16 file is written by llamalab (``gguf`` writer, SmolLM2's vocabulary carried
over); Q4_0 and Q4_K_M come from ``llama_cpp.llama_model_quantize`` on it, so the
packed files are exactly what llama.cpp's users get. Files are cached:

    python bench/random_model.py [--out artifacts/bench-models]   # prints the paths
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "artifacts" / "bench-models"
QUANTS = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def config():
    from llamalab.config import ModelConfig

    return ModelConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=49152,
        ffn_hidden_dim=5632, norm_eps=1e-5, rope_theta=100000.0, context_length=2048,
        name="random-0.9b",
    )  # fmt: skip


def write_f16(path: Path, seed: int = 0) -> None:
    import gguf
    import numpy as np
    import torch

    from llamalab.checkpoint import names as tensor_names
    from llamalab.checkpoint.gguf_format import ARCHITECTURE, add_model_metadata
    from llamalab.default_model import default_model_path
    from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

    cfg = config()
    shapes = tensor_names.expected_shapes(cfg)
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    add_model_metadata(writer, cfg)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    add_vocab_to_gguf(writer, default_model_path())
    plan = tensor_names.canonical_names(cfg.n_layers, cfg.tie_embeddings)
    for name in plan:
        shape = shapes[name]
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(
            tensor_names.to_format(name, "gguf"), shape, np.dtype(dtype),
            int(np.prod(shape)) * np.dtype(dtype).itemsize, raw_dtype=qtype,
        )  # fmt: skip
    tmp = path.with_suffix(".tmp")
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    generator = torch.Generator().manual_seed(seed)
    for name in plan:
        shape = shapes[name]
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            values = torch.randn(shape, generator=generator).mul_(0.02).half()
            writer.write_tensor_data(values.numpy())
    writer.close()
    os.replace(tmp, path)


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[kind])
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) failed with {rc}")
    os.replace(tmp, dst)


def ensure(out: Path = DEFAULT_OUT, threads: int = 2) -> dict[str, Path]:
    """The F16, Q4_0 and Q4_K_M files, made on first use."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"F16": out / "random-0.9b-F16.gguf"}
    if not files["F16"].exists():
        write_f16(files["F16"])
    for kind in QUANTS:
        files[kind] = out / f"random-0.9b-{kind}.gguf"
        if not files[kind].exists():
            quantize(files["F16"], files[kind], kind, threads)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for kind, path in ensure(args.out, args.threads).items():
        print(f"{kind:7} {path} ({path.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
