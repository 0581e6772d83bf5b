"""LoRA adapter files: PEFT folders and llama.cpp's GGUF adapters, read and written.

An adapter is read into ``{canonical module: (A, B)}`` (``layers.0.attention.wq``,
``output``) with ``A`` (rank, in) and ``B`` (out, rank) in Meta's row order, ``B`` already
times the adapter's own scaling, so that the update of a module is exactly ``B @ A``.
Both readers check the adapter against the model's config (its layers and every shape)
before anything uses it: an adapter made for another base is one error.

The GGUF adapter is the layout llama.cpp's ``convert_lora_to_gguf.py`` writes and
``llama_adapter_lora_init`` loads: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and for each adapted weight ``W`` of the base (by its GGUF name,
``blk.N.attn_q.weight``) two tensors ``W.lora_a`` (ggml ne ``[in, rank]``, PyTorch
shape (rank, in)) and ``W.lora_b`` (ne ``[rank, out]``, shape (out, rank)); llama.cpp
scales each pair by ``alpha / rank`` (by 1 when alpha is 0), the rank read off the pair.
GGUF bases keep q and k in Meta's row order, so ``B`` needs no permutation there;
Hugging Face's rotate-half order is the PEFT folder's, undone on reading.

This module is core: it knows files and configs, never ``nn.Module``s or ``train/``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from llamalab.checkpoint.reader import CheckpointReader, TensorInfo
from llamalab.errors import LlamalabError

if TYPE_CHECKING:
    import torch

    from llamalab.config import ModelConfig

# The linear layers an adapter may change, by their Meta names.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
# Meta target name -> the Hugging Face module name PEFT targets.
HF_MODULES = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
ARCHITECTURE = "llama"

Update = tuple["torch.Tensor", "torch.Tensor"]


def linear_dims(config: ModelConfig, name: str) -> tuple[int, int] | None:
    """(in, out) of the linear layer a canonical module name means, None if there is none."""
    if name == "output":
        return config.dim, config.vocab_size
    layer, _, kind = name.removeprefix("layers.").partition(".")
    if not name.startswith("layers.") or not layer.isdigit() or int(layer) >= config.n_layers:
        return None
    owner, _, kind = kind.partition(".")
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    dims = {
        ("attention", "wq"): (config.dim, q),
        ("attention", "wk"): (config.dim, kv),
        ("attention", "wv"): (config.dim, kv),
        ("attention", "wo"): (q, config.dim),
        ("feed_forward", "w1"): (config.dim, config.ffn_hidden_dim),
        ("feed_forward", "w3"): (config.dim, config.ffn_hidden_dim),
        ("feed_forward", "w2"): (config.ffn_hidden_dim, config.dim),
    }
    return dims.get((owner, kind))


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file starting with GGUF's magic bytes."""
    from llamalab.gguf.header import is_gguf

    return os.path.isfile(path) and is_gguf(path)


def check_adapter_path(path: str | os.PathLike[str], flag: str = "--lora") -> None:
    """Refuse, cheaply and before any model loads, a path that cannot be a LoRA adapter:
    a folder without ``adapter_config.json``, a file that is not a GGUF adapter."""
    path = Path(path)
    hint = (
        "a PEFT folder with adapter_config.json or a GGUF LoRA adapter, as `llamalab "
        "finetune` writes under out_dir (adapter/, adapter.gguf)"
    )
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file():
            raise LlamalabError(f"{flag} {path}: not a LoRA adapter ({hint})")
        return
    if not is_gguf_file(path):
        raise LlamalabError(f"{flag} {path}: not a LoRA adapter ({hint})")
    _gguf_adapter_metadata(path, flag)


def read_adapter(path: str | os.PathLike[str], config: ModelConfig) -> dict[str, Update]:
    """One adapter (PEFT folder or GGUF file) as ``{module: (A, B)}``, ``B @ A`` its update.

    Raises:
        LlamalabError: not a LoRA adapter, unreadable, or made for another base than
            ``config`` (a module the model lacks, or a shape it does not have).
    """
    path = Path(path)
    if path.is_dir():
        found, scaling = _read_peft_folder(path, config)
        updates = {name: (a, b * scaling) for name, (a, b) in found.items()}
    else:
        updates = _read_gguf_adapter(path, config)
    for name, (a, b) in updates.items():
        dims = linear_dims(config, name)
        if dims is None:
            raise LlamalabError(
                f"{path}: made for another base: it adapts {name}, which this model "
                f"({config.n_layers} layers) has not"
            )
        if (a.shape[1], b.shape[0]) != dims:
            raise LlamalabError(
                f"{path}: made for another base: {name} takes {a.shape[1]} inputs and "
                f"gives {b.shape[0]} outputs there, {dims[0]} and {dims[1]} in this model"
            )
    return updates


def read_adapters(
    adapters: Iterable[tuple[str | os.PathLike[str], float]], config: ModelConfig
) -> list[dict[str, Update]]:
    """Each ``(path, scale)`` read with :func:`read_adapter`, its ``B`` times ``scale``."""
    return [
        {name: (a, b * float(scale)) for name, (a, b) in read_adapter(path, config).items()}
        for path, scale in adapters
    ]


# -- PEFT folders ---------------------------------------------------------------------


def _read_peft_folder(path: Path, config: ModelConfig) -> tuple[dict[str, Update], float]:
    """One PEFT folder's adapters as ``{module: (A, B)}`` (B in Meta's row order) and its
    scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)."""
    from safetensors import SafetensorError, safe_open

    from llamalab.checkpoint.names import from_format, hf_to_meta_qk
    from llamalab.files import read_text_bounded

    if not path.is_dir() or not (path / PEFT_CONFIG).is_file():
        raise LlamalabError(f"--lora {path}: not a LoRA adapter (a PEFT folder with {PEFT_CONFIG})")
    try:
        cfg = json.loads(read_text_bounded(path / PEFT_CONFIG, MAX_ADAPTER_CONFIG_BYTES, "config"))
    except ValueError as exc:
        raise LlamalabError(f"{path / PEFT_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise LlamalabError(f"{path}: not a LoRA adapter (peft_type {kind!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LlamalabError(f"{path / PEFT_CONFIG}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise LlamalabError(f"{path / PEFT_CONFIG}: lora_alpha must be a number, got {alpha!r}")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise LlamalabError(f"{path}: {key} adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise LlamalabError(
            f"{path}: adapters that train biases or whole modules are not supported"
        )
    scaling = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        raise LlamalabError(f"{path}: no {PEFT_WEIGHTS}")
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                stem, _, part = key.removesuffix(".weight").rpartition(".")
                module = stem.removeprefix("base_model.model.")
                name = from_format(f"{module}.weight", "hf")
                if part not in ("lora_A", "lora_B") or name is None:
                    raise LlamalabError(
                        f"{path}: tensor {key!r} is not a LoRA matrix of a LLaMA module"
                    )
                name = name.removesuffix(".weight")
                if name.rpartition(".")[2] not in LORA_TARGETS:
                    raise LlamalabError(f"{path}: tensor {key!r} adapts no linear layer")
                found.setdefault(name, {})[part] = f.get_tensor(key).float()
    except (SafetensorError, OSError, ValueError) as exc:
        raise LlamalabError(f"{weights}: not a readable safetensors file ({exc})") from None
    adapters = {}
    for name, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise LlamalabError(f"{path}: {name} has lora_A or lora_B but not both")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LlamalabError(
                f"{path}: {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"not of rank {r}"
            )
        kind = name.rpartition(".")[2]
        if kind in heads and b.shape[0] % heads[kind] == 0:
            b = hf_to_meta_qk(b, heads[kind])
        adapters[name] = (a, b)
    if not adapters:
        raise LlamalabError(f"{path}: the adapter holds no LoRA matrices")
    return adapters, scaling


# -- GGUF adapters --------------------------------------------------------------------


def _gguf_adapter_metadata(path: Path, flag: str = "--lora") -> dict:
    """A GGUF file's metadata, refused unless it is a LoRA adapter for a LLaMA."""
    from llamalab.gguf.header import read_gguf_metadata

    meta = read_gguf_metadata(path)
    kind = meta.get("general.type", "model")
    if kind != "adapter" or meta.get("adapter.type") != "lora":
        what = f"general.type {kind!r}" if kind != "adapter" else "adapter.type "
        if kind == "adapter":
            what += repr(meta.get("adapter.type"))
        raise LlamalabError(f"{flag} {path}: not a LoRA adapter (a GGUF file with {what})")
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise LlamalabError(
            f"{path}: made for another base: a {arch!r} adapter, and this model is a llama"
        )
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise LlamalabError(f"{path}: adapter.lora.alpha must be a number, got {alpha!r}")
    return meta


def _read_gguf_adapter(path: Path, config: ModelConfig) -> dict[str, Update]:
    """A GGUF LoRA adapter as ``{module: (A, B)}``, each ``B`` times ``alpha / rank``."""
    from llamalab.checkpoint.names import from_format
    from llamalab.gguf.header import read_gguf_header
    from llamalab.gguf.tensors import read_tensor

    if not is_gguf_file(path):
        raise LlamalabError(f"--lora {path}: not a LoRA adapter (a PEFT folder or a GGUF file)")
    meta = _gguf_adapter_metadata(path)
    _, records = read_gguf_header(path)
    alpha = float(meta.get("adapter.lora.alpha", 0.0))
    pairs: dict[str, dict[str, object]] = {}
    for record in records:
        stem, dot, part = record.name.rpartition(".")
        if dot and part in ("lora_a", "lora_b"):
            pairs.setdefault(stem, {})[part] = record
        elif not record.name.endswith("_norm.weight"):  # llama.cpp passes norms over too
            raise LlamalabError(f"{path}: tensor {record.name!r} is not a LoRA matrix")
    updates = {}
    for stem, parts in pairs.items():
        canonical = from_format(stem, "gguf")
        if canonical is None or canonical == "tok_embeddings.weight":
            raise LlamalabError(f"{path}: {stem} is not a linear layer llamalab can adapt")
        name = canonical.removesuffix(".weight")
        if name.rpartition(".")[2] not in LORA_TARGETS:
            raise LlamalabError(f"{path}: {stem} is not a linear layer llamalab can adapt")
        if set(parts) != {"lora_a", "lora_b"}:
            raise LlamalabError(f"{path}: {stem} has lora_a or lora_b but not both")
        a_rec, b_rec = parts["lora_a"], parts["lora_b"]
        if len(a_rec.shape) != 2 or len(b_rec.shape) != 2 or a_rec.shape[0] != b_rec.shape[1]:
            raise LlamalabError(
                f"{path}: {stem} has lora_a {list(a_rec.shape)} and lora_b "
                f"{list(b_rec.shape)}: not a (rank, in) and (out, rank) pair"
            )
        # Shapes are checked against the model before any data is read.
        dims = linear_dims(config, name)
        if dims is not None and (a_rec.shape[1], b_rec.shape[0]) == dims:
            a, b = read_tensor(path, a_rec), read_tensor(path, b_rec)
        else:  # read_adapter names what differs
            import torch

            a, b = torch.empty(a_rec.shape), torch.empty(b_rec.shape)
        rank = a_rec.shape[0]
        updates[name] = (a, b * (alpha / rank if alpha else 1.0))
    if not updates:
        raise LlamalabError(f"{path}: the adapter holds no LoRA matrices")
    return updates


def write_gguf_adapter(
    updates: dict[str, Update],
    alpha: float,
    path: str | os.PathLike[str],
    config: ModelConfig,
    *,
    name: str = "",
) -> Path:
    """Write ``{module: (A, B)}`` as a GGUF LoRA adapter that llama.cpp loads (``--lora``).

    ``B`` is the raw matrix (llama.cpp scales it by ``alpha / rank``). Tensors are float32.
    The file is written beside ``path`` and moved into place whole, so a reader never sees
    half of it. A tied output projection cannot be adapted in llama.cpp (the base has no
    ``output.weight`` of its own): such an adapter is refused.
    """
    import gguf

    from llamalab.checkpoint.names import to_format
    from llamalab.gguf.writer import PlannedTensor, write_tensors

    if "output" in updates and config.tie_embeddings:
        raise LlamalabError(
            "llama.cpp cannot load an adapter of the output projection on a base whose "
            "output is tied to its embeddings; leave `output` out of the targets"
        )
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in updates.items():
        dims = linear_dims(config, module)
        if dims is None or (a.shape[1], b.shape[0]) != dims or a.shape[0] != b.shape[1]:
            raise LlamalabError(f"adapter {module}: shapes do not fit the base")
        stem = to_format(f"{module}.weight", "gguf")
        tensors[f"{stem}.lora_a"] = a.detach().float().cpu().contiguous()
        tensors[f"{stem}.lora_b"] = b.detach().float().cpu().contiguous()
    writer = gguf.GGUFWriter(path=None, arch=ARCHITECTURE)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    f32 = gguf.GGMLQuantizationType.F32
    plan = [PlannedTensor(n, tuple(t.shape), f32) for n, t in tensors.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write_tensors(writer, Path(tmp), plan, lambda t: tensors[t.name])
        umask = os.umask(0)  # mkstemp makes owner-only files; an adapter is read like any
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- merging into a checkpoint -----------------------------------------------------------


def merged_reader(reader: CheckpointReader, updates: list[dict[str, Update]]) -> CheckpointReader:
    """A reader of ``reader``'s checkpoint with every update added to its weight (float32).

    A tied output projection that an adapter changes gets a weight of its own (the
    embedding stays as it is), so the merged checkpoint is untied.
    """
    return _MergedReader(reader, updates)


class _MergedReader(CheckpointReader):
    """Wraps a reader: the same tensors, each adapted weight plus its summed update."""

    def __init__(self, reader: CheckpointReader, updates: list[dict[str, Update]]) -> None:
        import dataclasses

        super().__init__(reader.path)
        self._reader = reader
        self.format = reader.format
        self._deltas: dict[str, list[Update]] = {}
        for adapter in updates:
            for module, pair in adapter.items():
                self._deltas.setdefault(f"{module}.weight", []).append(pair)
        config = reader.config
        self._untie = config.tie_embeddings and "output.weight" in self._deltas
        self._config = dataclasses.replace(config, tie_embeddings=False) if self._untie else config

    @property
    def config(self) -> ModelConfig:
        return self._config

    def names(self) -> list[str]:
        names = self._reader.names()
        return [*names, "output.weight"] if self._untie else names

    def info(self, name: str) -> TensorInfo:
        source = "tok_embeddings.weight" if self._untie and name == "output.weight" else name
        info = self._reader.info(source)
        if name in self._deltas:  # a merged weight is float32, whatever it was stored as
            n = math.prod(info.shape)
            return TensorInfo(info.shape, "F32", 4 * n)
        return info

    def load(self, name: str) -> torch.Tensor:
        source = "tok_embeddings.weight" if self._untie and name == "output.weight" else name
        tensor = self._reader.load(source)
        if name not in self._deltas:
            return tensor
        merged = tensor.float().clone()
        for a, b in self._deltas[name]:
            merged += b.float() @ a.float()
        return merged

    def raw(self, name: str):
        return self.load(name) if name in self._deltas else self._reader.raw(name)

    def tokenizer_kind(self) -> str | None:
        return self._reader.tokenizer_kind()

    def close(self) -> None:
        self._reader.close()

    def __getattr__(self, attr: str):  # format-specific helpers (a GGUF's metadata ...)
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._reader, attr)
