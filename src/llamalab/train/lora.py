"""Low-rank adapters (LoRA) on a llamalab Transformer, float or packed.

Each targeted linear ``y = W x`` becomes ``y = W x + (B A dropout(x)) * alpha / rank`` with
``A`` (rank, in) and ``B`` (out, rank), PEFT's convention: ``A`` starts kaiming-uniform
(``a = sqrt(5)``, as ``nn.Linear`` and PEFT initialise it, here from a seeded generator) and
``B`` at zero, so the adapted model starts equal to the base. The base stays frozen.

Targets are Meta's module names (``wq wk wv wo w1 w2 w3 output``). A packed base may have
fused q/k/v into one ``wqkv`` and w1/w3 into ``w13`` (``quant.linear.fuse_projections``);
the adapter of each part is then kept beside the fused layer and added to its slice of
the output, so the adapters and their names are the same whatever the base's layout.
A packed base layer gives its input a gradient by dequantizing its own weight in
backward, one layer at a time (``quant/linear.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from llamalab.checkpoint.lora_files import (
    HF_MODULES,
    LORA_TARGETS,
    linear_dims,
    read_adapters,
    write_gguf_adapter,
)
from llamalab.errors import LlamalabError

TARGETS = LORA_TARGETS
# Where each target lives in a block, and which fused layer may hold it.
_OWNER = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
    "w1": "feed_forward",
    "w2": "feed_forward",
    "w3": "feed_forward",
}
_FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


class LoRAAdapter(nn.Module):
    """The low-rank update alone: ``x -> (dropout(x) @ A.T @ B.T) * alpha / rank``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        # PEFT's init (its reset_lora_parameters): A as nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        # Serving several adapters (see serve_adapters): each token keeps the rank columns
        # of its own adapter, none for the base.
        selection = self.__dict__.get("selection")
        if selection is not None:
            mask = selection.output if self.__dict__.get("is_output") else selection.blocks
            if mask is not None:
                h = h * mask.view(*h.shape[:-1], -1)
        return (h @ self.lora_B.T) * self.scaling

    def idle(self) -> bool:
        """Whether no token of the running pass uses this adapter (serving several: a pass
        of base rows alone skips every adapter)."""
        selection = self.__dict__.get("selection")
        if selection is None:
            return False
        return not (selection.output_on if self.__dict__.get("is_output") else selection.blocks_on)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling``, the (out, in) change the adapter makes to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(nn.Module):
    """A frozen base linear (float or packed) plus one adapter."""

    def __init__(self, base: nn.Module, adapter: LoRAAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.adapter.idle():
            return y
        return y + self.adapter(x).to(y.dtype)


class LoRAFused(nn.Module):
    """A frozen fused base (``wqkv`` or ``w13``) with an adapter on some of its parts."""

    def __init__(self, base: nn.Module, parts: dict[str, int], adapters: dict[str, LoRAAdapter]):
        super().__init__()
        self.base = base
        self.parts = dict(parts)  # part name -> its output rows, in the fused order
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if all(a.idle() for a in self.adapters.values()):
            return y
        pieces = list(y.split(list(self.parts.values()), dim=-1))
        for i, name in enumerate(self.parts):
            if name in self.adapters:
                pieces[i] = pieces[i] + self.adapters[name](x).to(y.dtype)
        return torch.cat(pieces, dim=-1)


def _dims(module: nn.Module) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


def _check_targets(targets: Iterable[str]) -> list[str]:
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise LlamalabError(
            "LoRA needs at least one target module (among " + " ".join(TARGETS) + ")"
        )
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LlamalabError(
            f"unknown LoRA target module {unknown[0]!r}; choose among {' '.join(TARGETS)}"
        )
    return targets


def _fused_parts(owner: nn.Module, fused: str) -> dict[str, int]:
    """Output rows of each part of a fused layer (from the block's own sizes)."""
    if fused == "wqkv":
        q = owner.n_heads * owner.head_dim
        kv = owner.n_kv_heads * owner.head_dim
        return {"wq": q, "wk": kv, "wv": kv}
    half = owner.w13.out_features // 2
    return {"w1": half, "w3": half}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = ("wq", "wv"),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Freeze ``model`` and wrap its ``targets`` with fresh adapters; returns their names.

    The names are canonical module names (``layers.0.attention.wq``, ``output``), in the
    order the adapters were created: layer by layer, then within a layer in the order of
    :data:`TARGETS`. Every ``A`` is drawn from one generator seeded with ``seed`` in
    that order, so a seed gives the same adapters on a float and a packed base.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LlamalabError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise LlamalabError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise LlamalabError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    wanted = set(_check_targets(targets))
    if any(isinstance(m, LoRAAdapter) for m in model.modules()):
        raise LlamalabError("this model already has LoRA adapters")
    model.requires_grad_(False)
    # A packed model's native step runs every block's weights straight from their packed
    # buffers, past the modules; the adapters live in the modules, so it must go.
    if getattr(model, "decode_path", None) is not None:
        model.decode_path.native_step = None
    generator = torch.Generator().manual_seed(seed)

    def make(module: nn.Module, out_features: int | None = None) -> LoRAAdapter:
        in_features, out = _dims(module)
        return LoRAAdapter(
            in_features,
            out if out_features is None else out_features,
            rank,
            alpha,
            dropout,
            generator=generator,
            dtype=dtype,
        )

    names: list[str] = []
    for i, layer in enumerate(model.layers):
        adapters: dict[str, tuple[nn.Module, str, LoRAAdapter | None]] = {}
        for target in TARGETS[:-1]:
            if target not in wanted:
                continue
            owner = getattr(layer, _OWNER[target])
            fused = next((f for f, ps in _FUSED.items() if target in ps), None)
            fused_module = getattr(owner, fused, None) if fused else None
            if fused_module is not None:
                rows = _fused_parts(owner, fused)[target]
                adapters[target] = (owner, fused, make(fused_module, rows))
            else:
                adapters[target] = (owner, target, make(getattr(owner, target)))
            names.append(f"layers.{i}.{_OWNER[target]}.{target}")
        for target, (owner, attr, adapter) in adapters.items():
            if attr == target:
                setattr(owner, attr, LoRALinear(getattr(owner, attr), adapter))
        for fused in _FUSED:
            parts = {t: a for t, (_, attr, a) in adapters.items() if attr == fused}
            if parts:
                owner = next(o for _, (o, attr, _) in adapters.items() if attr == fused)
                wrapper = LoRAFused(getattr(owner, fused), _fused_parts(owner, fused), parts)
                setattr(owner, fused, wrapper)
    if "output" in wanted:
        model.output = LoRALinear(model.output, make(model.output))
        names.append("output")
    return names


def _adapters(model: nn.Module) -> Iterator[tuple[str, LoRAAdapter]]:
    """Every adapter of the model under its canonical module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name.removesuffix(".base"), module.adapter
        elif isinstance(module, LoRAFused):
            prefix = name.rpartition(".")[0]
            for part, adapter in module.adapters.items():
                yield f"{prefix}.{part}", adapter


def lora_adapters(model: nn.Module) -> dict[str, LoRAAdapter]:
    """The model's adapters by canonical module name (``layers.0.attention.wq``)."""
    return dict(_adapters(model))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights: ``<module>.lora_A.weight`` (rank, in) and ``.lora_B.weight``
    (out, rank) under canonical module names, detached."""
    state = {}
    for name, adapter in _adapters(model):
        state[f"{name}.lora_A.weight"] = adapter.lora_A.detach()
        state[f"{name}.lora_B.weight"] = adapter.lora_B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (as :func:`lora_state_dict` names them) into the model's adapters.

    Every adapter must get both matrices, of its own shape; nothing is copied otherwise.
    """
    adapters = lora_adapters(model)
    expected = {f"{n}.lora_{m}.weight" for n in adapters for m in "AB"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise LlamalabError(f"adapter weights do not match the model's adapters: {which}")
    for name, adapter in adapters.items():
        for part, param in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            tensor = state[f"{name}.lora_{part}.weight"]
            if tuple(tensor.shape) != tuple(param.shape):
                raise LlamalabError(
                    f"adapter {name}.lora_{part} has shape {list(tensor.shape)}, "
                    f"the model needs {list(param.shape)}"
                )
    with torch.no_grad():
        for name, adapter in adapters.items():
            adapter.lora_A.copy_(state[f"{name}.lora_A.weight"])
            adapter.lora_B.copy_(state[f"{name}.lora_B.weight"])


def _merged(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A base linear with ``delta`` added to its weight: float stays float (in its own
    dtype), a packed layer becomes a float32 one (its dequantized weight plus delta)."""
    if isinstance(base, nn.Linear):
        with torch.no_grad():
            merged = nn.Linear(base.in_features, base.out_features, bias=False)
            merged.weight = nn.Parameter(
                (base.weight.float() + delta.float()).to(base.weight.dtype),
                requires_grad=False,
            )
        return merged
    from llamalab.quant.linear import QuantizedLinear

    weight = base.dequantized_weight() + delta.float()
    return QuantizedLinear.from_float(weight, kernel="float32", source_type=base.source_type)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers (in place).

    A float base keeps its dtype. A packed base layer becomes a float32 layer holding
    its dequantized weight plus the update (requantizing is a separate, lossy step).
    A tied output projection gets a weight of its own, since the embedding is unchanged.
    """
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                new = _merged(module.base, module.adapter.delta_weight().detach())
            elif isinstance(module, LoRAFused):
                deltas = []
                for part, rows in module.parts.items():
                    if part in module.adapters:
                        deltas.append(module.adapters[part].delta_weight().detach())
                    else:
                        deltas.append(torch.zeros(rows, module.base.in_features))
                new = _merged(module.base, torch.cat([d.float() for d in deltas]))
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


# -- export ---------------------------------------------------------------------------


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under the names PEFT saves (``base_model.model.<HF module>.lora_A.weight``).

    Hugging Face checkpoints store q and k rows permuted for their rotate-half RoPE, so
    the B matrices of wq and wk (their output rows) get the same permutation; A acts on
    the input and is unchanged.
    """
    from llamalab.checkpoint.names import meta_to_hf_qk, to_format

    config = model.config
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    state = {}
    for name, adapter in _adapters(model):
        hf_module = to_format(f"{name}.weight", "hf").removesuffix(".weight")
        kind = name.rpartition(".")[2]
        b = adapter.lora_B.detach()
        if kind in heads:
            b = meta_to_hf_qk(b, heads[kind])
        prefix = f"base_model.model.{hf_module}"
        state[f"{prefix}.lora_A.weight"] = adapter.lora_A.detach().contiguous().cpu()
        state[f"{prefix}.lora_B.weight"] = b.contiguous().cpu()
    return state


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str = "") -> Path:
    """Write the adapters as a PEFT folder: ``adapter_config.json`` and
    ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained`` loads onto the
    Hugging Face copy of the base. Each file is written whole, then moved into place."""
    import json
    import os
    import tempfile

    from safetensors.torch import save_file

    adapters = lora_adapters(model)
    if not adapters:
        raise LlamalabError("the model has no LoRA adapters to save")
    first = next(iter(adapters.values()))
    if any((a.rank, a.alpha) != (first.rank, first.alpha) for a in adapters.values()):
        raise LlamalabError("adapters of different ranks or alphas cannot share one PEFT config")
    kinds = sorted({n.rpartition(".")[2] for n in adapters}, key=TARGETS.index)
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": [HF_MODULES[k] for k in kinds],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def place(name: str, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        os.close(fd)
        try:
            write(tmp)
            # mkstemp makes owner-only files; an adapter is read like any other file.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    place("adapter_model.safetensors", lambda p: save_file(peft_state_dict(model), p))
    place(
        "adapter_config.json",
        lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"),
    )
    return out


def save_gguf_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters as a GGUF LoRA adapter (``general.type = adapter``) that llama.cpp
    loads onto the GGUF base with ``--lora`` (llama-cpp-python: ``Llama(lora_path=...)``).

    Written whole beside ``path``, then moved into place. Every adapter must share one
    alpha (llama.cpp keeps one per file; the rank it reads off each pair).
    """
    adapters = lora_adapters(model)
    if not adapters:
        raise LlamalabError("the model has no LoRA adapters to save")
    first = next(iter(adapters.values()))
    if any(a.scaling != first.scaling for a in adapters.values()):
        raise LlamalabError("adapters of different alpha / rank cannot share one GGUF adapter")
    updates = {name: (a.lora_A, a.lora_B) for name, a in adapters.items()}
    # llama.cpp scales by alpha / rank with the rank read off B; keep that ratio ours.
    alpha = first.scaling * first.rank
    return write_gguf_adapter(updates, alpha, path, model.config, name=model.config.name or "")


# -- import ---------------------------------------------------------------------------


def load_adapters(model: nn.Module, adapters: Iterable[tuple[str | Path, float]]) -> None:
    """Run ``model`` with LoRA adapters ``[(path, scale), ...]`` on top, unmerged.

    Each path is a PEFT folder or a GGUF LoRA adapter (llama.cpp's layout). Every adapter
    is checked against the model (module names and shapes) before the model is touched.
    Several adapters become one adapter of their summed rank: ``A`` stacks their ``A``
    rows and ``B`` their ``B`` columns times each one's ``scale * alpha / r``, so ``B A``
    is exactly the sum of their updates; a module only some adapt gets zero blocks from
    the others. Works on float and packed bases alike (see :func:`apply_lora`).
    """
    loaded = read_adapters(adapters, model.config)
    if loaded:
        _stack(model, loaded)


def _stack(model: nn.Module, loaded: list[dict]) -> list[int]:
    """Put adapters ``[{module: (A, B)}, ...]`` on ``model`` as one of their summed rank
    (see :func:`load_adapters`); returns each one's rank, in order."""
    # One rank per adapter: a GGUF adapter may give its modules different ranks, and the
    # smaller ones are padded with zero rows of A and columns of B (no change to B A).
    ranks = [max(a.shape[0] for a, _ in found.values()) for found in loaded]
    names = sorted({n for found in loaded for n in found})
    kinds = sorted({n.rpartition(".")[2] for n in names}, key=TARGETS.index)
    total = sum(ranks)
    created = apply_lora(model, total, float(total), targets=kinds)  # scaling 1: B carries it
    state = {}
    for name in created:
        dims = linear_dims(model.config, name)
        assert dims is not None
        a_parts, b_parts = [], []
        for found, rank in zip(loaded, ranks, strict=True):
            a = torch.zeros(rank, dims[0])
            b = torch.zeros(dims[1], rank)
            if name in found:
                fa, fb = found[name]
                a[: fa.shape[0]] = fa
                b[:, : fb.shape[1]] = fb
            a_parts.append(a)
            b_parts.append(b)
        state[f"{name}.lora_A.weight"] = torch.cat(a_parts)
        state[f"{name}.lora_B.weight"] = torch.cat(b_parts, dim=1)
    load_lora_state_dict(model, state)
    norm = getattr(getattr(model, "norm", None), "weight", None)  # where the model runs
    if norm is not None:
        for adapter in lora_adapters(model).values():
            adapter.to(norm.device)
    model.requires_grad_(False)
    return ranks


# The name the first release gave it, when only PEFT folders were read.
load_peft_adapters = load_adapters


GGUF_ADAPTER = "adapter.gguf"


def export_gguf_adapter(model: nn.Module, out_dir: str | Path) -> Path | None:
    """``out_dir/adapter.gguf`` (see :func:`save_gguf_adapter`), as a run writes it beside
    its PEFT folder; None, with a line on stderr, when llama.cpp cannot express the
    adapter (an adapted output projection tied to the embeddings): the run goes on."""
    import sys

    if model.config.tie_embeddings and "output" in lora_adapters(model):
        print(
            f"note: no {GGUF_ADAPTER}: llama.cpp cannot adapt an output projection tied to "
            "the embeddings (the PEFT folder has it)",
            file=sys.stderr,
        )
        return None
    return save_gguf_adapter(model, Path(out_dir) / GGUF_ADAPTER)


# -- serving several adapters at once ---------------------------------------------------


class _Selection:
    """The rank columns each token of the running pass keeps: ``blocks`` for the tokens
    the blocks see, ``output`` for the positions the output head sees (N, total rank)."""

    blocks: torch.Tensor | None = None
    output: torch.Tensor | None = None
    blocks_on = output_on = False  # whether any token keeps a column (else: skipped)


class AdapterRows:
    """Which adapter each cache row runs: 0 the base, ``i`` the ``i``-th of ``names``.

    The engine sets a row's entry when it admits a request there (``Request.adapter``);
    a forward pass reads it for every token, so rows of different adapters share a batch.
    """

    def __init__(self, names: list[str], columns: torch.Tensor) -> None:
        self.names = names
        self.columns = columns  # (1 + len(names), total rank): row k keeps adapter k's
        self._rows: dict[int, int] = {}

    def __getitem__(self, row: int) -> int:
        return self._rows.get(row, 0)

    def __setitem__(self, row: int, adapter: int) -> None:
        if not 0 <= adapter <= len(self.names):
            raise ValueError(f"adapter {adapter} is not one of the {len(self.names)} loaded")
        self._rows[row] = adapter

    def index(self, name: str) -> int:
        """The adapter number of ``name`` (1, 2, ...), for ``Request.adapter``."""
        return self.names.index(name) + 1


def serve_adapters(model: nn.Module, named: Iterable[tuple[str, str | Path, float]]) -> AdapterRows:
    """Load adapters ``[(name, path, scale), ...]`` side by side, each chosen per cache row.

    They become one adapter of their summed rank (as :func:`load_adapters` stacks them);
    before every pass, each token gets a mask that keeps the rank columns of its row's
    adapter (``model.lora_rows``, set by the engine) and zeroes the others, so one
    batched pass runs every row with its own adapter, or with none. A pass without a
    cache (a whole sequence) runs the base. A packed model's native step and a compiled
    decode block run past the modules, so they are turned off.
    """
    named = list(named)
    if not named:
        raise LlamalabError("no adapters to serve")
    names = [n for n, _, _ in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LlamalabError(f"--lora: two adapters are named {dup!r}; name them NAME=PATH")
    loaded = read_adapters([(p, s) for _, p, s in named], model.config)
    ranks = _stack(model, loaded)
    total = sum(ranks)
    columns = torch.zeros(1 + len(ranks), total)
    at = 0
    for k, rank in enumerate(ranks):
        columns[k + 1, at : at + rank] = 1.0
        at += rank
    rows = AdapterRows(names, columns)
    selection = _Selection()
    for name, adapter in lora_adapters(model).items():
        adapter.selection = selection
        adapter.is_output = name == "output"
    path = getattr(model, "decode_path", None)
    for attr in ("native_step", "compiled_block"):
        if path is not None and getattr(path, attr, None) is not None:
            setattr(path, attr, None)

    def choose(module: nn.Module, args: tuple, kwargs: dict) -> None:
        from llamalab.kv_cache import Segments

        tokens = args[0] if args else kwargs["tokens"]
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        if cache is None:  # a whole sequence, no row: the base
            per_token = torch.zeros(tokens.numel(), dtype=torch.long)
            keep = None
        else:
            views = cache.views if isinstance(cache, Segments) else (cache,)
            shapes = cache.shapes if isinstance(cache, Segments) else (tuple(tokens.shape),)
            parts, keep, at = [], [], 0
            for view, (B, T) in zip(views, shapes, strict=True):
                parts.append(
                    torch.tensor([rows[view.row + b] for b in range(B)]).repeat_interleave(T)
                )
                # The output head sees each row's last token of a last_only view (as
                # model.forward and the packed pass cut them), every token otherwise.
                keep.extend(
                    range(at + T - 1, at + B * T, T) if view.last_only else range(at, at + B * T)
                )
                at += B * T
            per_token = torch.cat(parts)
        picked = per_token if keep is None else per_token[keep]
        selection.blocks_on = bool(per_token.any())
        selection.output_on = bool(picked.any())
        device = module.norm.weight.device
        selection.blocks = rows.columns[per_token].to(device) if selection.blocks_on else None
        selection.output = rows.columns[picked].to(device) if selection.output_on else None

    model.register_forward_pre_hook(choose, with_kwargs=True)
    model.lora_rows = rows
    return rows
