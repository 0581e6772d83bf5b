"""Meta's original release: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Shards are opened with ``torch.load(mmap=True, weights_only=True)``: the weights stay on
disk until used, and a pickle that carries code is refused instead of run. Merging follows
Meta's model parallelism: column-parallel weights were split by output rows, row-parallel
ones by input columns, norms were replicated.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint.hf_format import read_json
from llamalab.checkpoint.reader import (
    CheckpointReader,
    TensorInfo,
    naming_the_file,
    release_pages,
    torch_type_name,
)
from llamalab.config import (
    LLAMA3_ROPE_SCALING,
    ModelConfig,
    RopeScaling,
    ffn_hidden_dim,
    rope_scaling_from_dict,
)
from llamalab.errors import LlamalabError

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")

# Keys of params.json that we understand; anything else means a model we do not run.
KNOWN_PARAMS = {
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
    "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
    "max_batch_size", "rope_scaling", "rope_scaling_factor",
}  # fmt: skip

# The dimension each tensor was split along, by the last two parts of its name.
_SPLIT_DIM = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # column-parallel
    "wo": 1, "w2": 1,  # row-parallel
}  # fmt: skip


def is_meta_folder(path: Path) -> bool:
    """Whether ``path`` is a folder with a ``params.json`` (a Meta checkpoint)."""
    return path.is_dir() and (path / "params.json").is_file()


def split_dim(name: str, tok_embeddings_dim: int = 1) -> int | None:
    """Along which dimension a canonical tensor is split across shards (None: replicated).

    ``tok_embeddings`` was split by columns in LLaMA 1/2 and by rows in Llama 3.
    """
    if name == "tok_embeddings.weight":
        return tok_embeddings_dim
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _SPLIT_DIM:
        return _SPLIT_DIM[parts[-2]]
    return None


def load_pth(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Open one shard, memory-mapped where the file allows it, refusing pickles that would run code.

    Returns the tensors and whether they view a file mapping.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # torch's pickle-protocol chatter is not the user's concern
            mapped = True
            try:
                data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "zipfile" not in str(exc):
                    raise
                # A legacy (pre-zip) torch.save file cannot be memory-mapped: read it whole.
                data = torch.load(path, map_location="cpu", weights_only=True)
                mapped = False
    except pickle.UnpicklingError as exc:
        lines = [
            ln.strip()
            for ln in str(exc).splitlines()
            if "Unsupported" in ln or "Unpickler error" in ln
        ]
        why = lines[0] if lines else "objects other than tensors"
        raise LlamalabError(f"{path}: refused to load: the pickle would run code ({why})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LlamalabError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {exc}"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LlamalabError(f"{path}: expected a dict of tensors")
    return data, mapped


class MetaReader(CheckpointReader):
    """A Meta folder: every shard memory-mapped, tensors merged along Meta's split dimension."""

    format = "meta"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._params = read_json(path / "params.json")
        unknown = sorted(set(self._params) - KNOWN_PARAMS)
        if unknown:
            raise LlamalabError(
                f"{path / 'params.json'}: unsupported keys {', '.join(unknown)} "
                "(not a LLaMA text model?)"
            )
        self._shard_paths = self._find_shards()
        loaded = [load_pth(p) for p in self._shard_paths]
        self._shards = [tensors for tensors, _ in loaded]
        self._mapped = all(mapped for _, mapped in loaded)
        first = self._shards[0]
        for p, shard in zip(self._shard_paths[1:], self._shards[1:], strict=True):
            if shard.keys() != first.keys():
                raise LlamalabError(f"{p}: holds different tensors than {self._shard_paths[0]}")
        self._tok_dim = self._embedding_split_dim()
        self._config = self._read_config()

    def _find_shards(self) -> list[Path]:
        found = {}
        for child in self.path.iterdir():
            match = SHARD_PATTERN.match(child.name)
            if match:
                found[int(match.group(1))] = child
        if not found:
            raise LlamalabError(f"{self.path}: no consolidated.NN.pth shard next to params.json")
        missing = [i for i in range(max(found) + 1) if i not in found]
        if missing:
            names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
            raise LlamalabError(f"{self.path}: missing shard(s) {names} of {max(found) + 1}")
        return [found[i] for i in sorted(found)]

    def _embedding_split_dim(self) -> int:
        emb = self._shards[0].get("tok_embeddings.weight")
        if emb is None:
            raise LlamalabError(f"{self._shard_paths[0]}: no tok_embeddings.weight")
        # A full-width row means the shards split the vocabulary (Llama 3) rather than dim.
        return 0 if len(self._shards) > 1 and emb.shape[1] == self._params.get("dim") else 1

    def _merged_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self._shards[0][name].shape)
        dim = split_dim(name, self._tok_dim)
        if dim is not None:
            shape[dim] = sum(s[name].shape[dim] for s in self._shards)
        return tuple(shape)

    def _read_config(self) -> ModelConfig:
        p = self._params
        source = self.path / "params.json"
        with naming_the_file(source):
            return self._config_from_params(p)

    def _config_from_params(self, p: dict) -> ModelConfig:
        try:
            dim, n_heads = int(p["dim"]), int(p["n_heads"])
            vocab = int(p.get("vocab_size", -1))
            if vocab <= 0:  # LLaMA 1 leaves it to the tokenizer; the embedding knows
                vocab = self._merged_shape("tok_embeddings.weight")[0]
            w1 = "layers.0.feed_forward.w1.weight"
            hidden = (
                self._merged_shape(w1)[0]
                if w1 in self._shards[0]
                else ffn_hidden_dim(
                    dim, int(p.get("multiple_of", 256)), p.get("ffn_dim_multiplier")
                )
            )
            return ModelConfig(
                dim=dim,
                n_layers=int(p["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(p.get("n_kv_heads") or n_heads),
                vocab_size=vocab,
                ffn_hidden_dim=hidden,
                norm_eps=float(p.get("norm_eps", 1e-6)),
                rope_theta=float(p.get("rope_theta", 10000.0)),
                rope_scaling=self._rope_scaling(),
                context_length=int(p.get("max_seq_len") or self._default_context()),
                tie_embeddings="output.weight" not in self._shards[0],
            )
        except KeyError as exc:
            raise LlamalabError(f"{self.path / 'params.json'}: missing key {exc}") from None

    def _rope_scaling(self) -> RopeScaling | None:
        if isinstance(self._params.get("rope_scaling"), dict):
            return rope_scaling_from_dict(self._params["rope_scaling"])
        if self._params.get("use_scaled_rope"):
            factor = self._params.get("rope_scaling_factor")
            if factor is None:
                return LLAMA3_ROPE_SCALING
            return RopeScaling(**{**LLAMA3_ROPE_SCALING.__dict__, "factor": float(factor)})
        return None

    def _default_context(self) -> int:
        # params.json never said; Meta's code fixed it per generation of models.
        if self._params.get("use_scaled_rope"):
            return 131072
        if float(self._params.get("rope_theta", 10000.0)) >= 500000:
            return 8192
        return 4096 if float(self._params.get("norm_eps", 1e-6)) >= 1e-5 else 2048

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def names(self) -> list[str]:
        # Meta's LLaMA 1 checkpoints also hold "rope.freqs", which is derived, not loaded.
        return [n for n in self._shards[0] if n != "rope.freqs"]

    def info(self, name: str) -> TensorInfo:
        shape = self._merged_shape(name)
        t = self._shards[0][name]
        nbytes = t.element_size()
        for d in shape:
            nbytes *= d
        return TensorInfo(shape, torch_type_name(t.dtype), nbytes)

    def load(self, name: str) -> torch.Tensor:
        parts = [shard[name] for shard in self._shards]
        if len(parts) == 1:
            return parts[0]  # a view of the mapped file: no copy at all
        dim = split_dim(name, self._tok_dim)
        try:
            # Copy out of the mapping (merged or replicated), then let the shards' pages go,
            # so that loading N shards holds one copy of the model, not two.
            merged = parts[0].clone() if dim is None else torch.cat(parts, dim=dim)
        except RuntimeError as exc:
            raise LlamalabError(
                f"{self.path}: shards of {name} do not fit together: {exc}"
            ) from None
        if self._mapped:
            for part in parts:
                release_pages(part)
        return merged

    def tokenizer_kind(self) -> str | None:
        tok = self.path / "tokenizer.model"
        if not tok.is_file():
            return None
        with open(tok, "rb") as f:
            head = f.read(64)
        # tiktoken's file is base64 text lines; SentencePiece's is a binary protobuf.
        return "tiktoken" if head[:1].isalnum() and b" " in head else "sentencepiece"

    def close(self) -> None:
        self._shards.clear()


def params_for(config: ModelConfig) -> dict[str, Any]:
    """A ``params.json`` for ``config`` that Meta's own code reads back to the same shapes."""
    base = int(2 * (4 * config.dim) / 3)
    # Meta recomputes the FFN width from multiple_of (and a multiplier); choose values that
    # land exactly on our width.
    params: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": 256,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_seq_len": config.context_length,
    }
    if ffn_hidden_dim(config.dim, 256) != config.ffn_hidden_dim:
        params["multiple_of"] = config.ffn_hidden_dim
        if base > config.ffn_hidden_dim:
            params["ffn_dim_multiplier"] = config.ffn_hidden_dim / base
    scaling = config.rope_scaling
    if scaling == LLAMA3_ROPE_SCALING:
        params["use_scaled_rope"] = True
    elif scaling is not None:
        data = {k: v for k, v in scaling.__dict__.items() if v is not None}
        if "factors" in data:
            data["factors"] = list(data["factors"])
        params["rope_scaling"] = data
    return params
