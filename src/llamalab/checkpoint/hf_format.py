"""Hugging Face folders: ``config.json`` + ``model.safetensors`` (or sharded, with an index).

Hugging Face stores q/k rows permuted for its rotate-half RoPE; ``load`` undoes that so the
model sees Meta's layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import names as tensor_names
from llamalab.checkpoint.reader import (
    CheckpointReader,
    TensorInfo,
    naming_the_file,
    torch_type_name,
)
from llamalab.config import ModelConfig, RopeScaling
from llamalab.errors import LlamalabError

SUPPORTED_MODEL_TYPES = ("llama",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a Hugging Face checkpoint)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlamalabError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LlamalabError(f"{path}: expected a JSON object")
    return data


def config_from_hf(data: dict[str, Any], source: Path) -> ModelConfig:
    """Translate a transformers ``LlamaConfig`` dict (v4 or v5 spelling) into a ModelConfig."""
    try:
        with naming_the_file(source):
            return _config_from_hf(data, source)
    except KeyError as exc:
        raise LlamalabError(f"{source}: missing key {exc}") from None


def _config_from_hf(data: dict[str, Any], source: Path) -> ModelConfig:
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LlamalabError(
            f"{source}: unsupported architecture {model_type!r} "
            f"(llamalab runs {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise LlamalabError(f"{source}: linear biases are not part of the LLaMA architecture")
    if data.get("hidden_act", "silu") != "silu":
        raise LlamalabError(f"{source}: unsupported activation {data['hidden_act']!r}")
    dim, n_heads = data["hidden_size"], data["num_attention_heads"]
    head_dim = data.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise LlamalabError(
            f"{source}: head_dim {head_dim} other than hidden_size / heads is not supported"
        )
    # transformers 5 folds rope_theta and rope_scaling into one rope_parameters dict.
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    return ModelConfig(
        name=str(data.get("_name_or_path", "")),
        dim=dim,
        n_layers=data["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=data.get("num_key_value_heads") or n_heads,
        vocab_size=data["vocab_size"],
        ffn_hidden_dim=data["intermediate_size"],
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling_from_hf(rope, source),
        context_length=int(data.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def _rope_scaling_from_hf(rope: dict[str, Any], source: Path) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_context_length=int(rope["original_max_position_embeddings"]),
        )
    raise LlamalabError(f"{source}: unsupported RoPE scaling {kind!r}")


def config_to_hf(
    config: ModelConfig,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """A ``config.json`` that transformers' ``LlamaForCausalLM`` loads.

    It uses the legacy spelling, which transformers v4 and v5 both read. The token ids,
    where known, are written as transformers' own exports write them (``eos_token_id`` a
    list when several tokens end generation); left out, transformers would fall back to
    LlamaConfig's defaults, which are not this vocabulary's.
    """
    data: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for key, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None:
            data[key] = value
    scaling = config.rope_scaling
    if scaling is not None:
        if scaling.kind == "linear":
            data["rope_scaling"] = {"rope_type": "linear", "factor": scaling.factor}
        elif scaling.kind == "llama3":
            data["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_context_length,
            }
        else:
            raise LlamalabError(
                "explicit per-frequency RoPE factors cannot be written to a Hugging Face config"
            )
    return data


class HFReader(CheckpointReader):
    """A Hugging Face folder: safetensors files opened lazily, q/k rows put back in Meta's order."""

    format = "hf"

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        super().__init__(path)
        self._config = config_from_hf(read_json(path / "config.json"), path / "config.json")
        files = self._weight_files()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, tuple[Path, str]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise LlamalabError(f"{file}: not a readable safetensors file: {exc}") from None
            self._handles[file] = handle
            for hf_name in handle.keys():  # noqa: SIM118 (safe_open is no dict: no `in`)
                canonical = tensor_names.from_format(hf_name, "hf")
                if canonical is not None:
                    self._where[canonical] = (file, hf_name)
        if self._config.tie_embeddings:
            self._where.pop("output.weight", None)

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise LlamalabError(f"{index}: no weight_map")
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise LlamalabError(f"{self.path}: missing shard file(s): {', '.join(missing)}")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return [single]
        raise LlamalabError(
            f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)"
        )

    @property
    def config(self) -> ModelConfig:
        return self._config

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        file, hf_name = self._where[name]
        view = self._handles[file].get_slice(hf_name)
        shape = tuple(view.get_shape())
        dtype_name = view.get_dtype()  # e.g. "F32", "BF16"
        nbytes = 1
        for d in shape:
            nbytes *= d
        return TensorInfo(shape, dtype_name, nbytes * _DTYPE_SIZES.get(dtype_name, 4))

    def load(self, name: str) -> torch.Tensor:
        file, hf_name = self._where[name]
        tensor = self._handles[file].get_tensor(hf_name)
        if tensor_names.is_query_or_key(name):
            heads = self._config.n_heads if name.endswith("wq.weight") else self._config.n_kv_heads
            tensor = tensor_names.hf_to_meta_qk(tensor, heads)
        return tensor

    def tokenizer_kind(self) -> str | None:
        if (self.path / "tokenizer.json").is_file():
            return "tokenizer.json"
        if (self.path / "tokenizer.model").is_file():
            return "tokenizer.model"
        return None

    def close(self) -> None:
        self._handles.clear()


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}

__all__ = ["HFReader", "config_from_hf", "config_to_hf", "is_hf_folder", "torch_type_name"]
