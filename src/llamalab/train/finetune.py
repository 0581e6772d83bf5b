"""Fine-tuning a loaded checkpoint on instruction data: LoRA (float or packed base) or full.

    model = "SmolLM2-135M-Instruct.Q4_1.gguf"   # any checkpoint llamalab loads
    data = "data/train.jsonl"                   # chat, Alpaca, ShareGPT or text lines
    out_dir = "runs/lora"
    method = "lora"                             # or "full"
    rank = 8
    alpha = 16
    targets = ["wq", "wv"]

It runs on the pieces of ``llamalab train``: the same TOML validation and ``--set``
overrides (`config.py`), the optimiser step (`loop.train_step`), schedule, metrics file
and plot, progress bar, DCP checkpoints (`checkpoint.py`) and stop signals. What differs
is the batch source (instruction items packed into rows, `data/instruct.py`), the
trainable parameters (the adapters, or every weight with ``method = "full"``) and what
is exported: ``out_dir/adapter/``, a PEFT folder with ``SHA256SUMS``, written with each
checkpoint and at the end (``out_dir/export/``, a Meta folder, for a full fine-tune).

Packing (``packing = true``, the default): the items are packed once into rows of
``seq_len`` positions (best fit, longest first), and attention is kept inside each item:
every attention layer gets a block-diagonal causal mask and each item's positions start
at 0 again (`DocumentMasked`), so an item's loss and gradients are what it would give
alone, and the loss still covers the assistant's tokens only. ``packing = false`` puts
each item in a row of its own, padded.

Data order is a function of the seed and the step alone (a seeded permutation of the
rows per epoch), so a resumed run reads the same rows as an uninterrupted one; with the
random state restored from the checkpoint (dropout), its losses are the same.
``out_dir`` records the run (``finetune.json``); running again with the same model,
data and settings resumes, anything else is refused before training starts.

Under ``torchrun --nproc_per_node N -m llamalab finetune CONFIG`` (gloo on CPUs) every
rank holds the whole model (a packed base stays packed on each) and the step's
micro-batches are dealt out among the ranks; the trained weights' gradients (the
adapters, or every weight with ``method = "full"``) are averaged across ranks by
`DistributedDataParallel` after the last micro-batch. So N processes take the same
steps as one with the same ``batch_tokens`` and ``micro_batch_size``. Rank 0 alone
writes ``finetune.json``, metrics, the plot and the adapter; every rank writes its share
of each DCP checkpoint, which any number of processes resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import sys
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError
from llamalab.files import file_sha256
from llamalab.train.config import (
    OPTIMISER_RANGES,
    PRECISIONS,
    RUN_COUNTS,
    check_choice,
    check_numbers,
    check_optional_counts,
    check_paths,
    check_whole_numbers,
    failure,
    parse_assignment,
    read_config_file,
    require_keys,
)

if TYPE_CHECKING:
    import torch

    from llamalab.train.documents import DocumentMasked

METHODS = ("lora", "full")
BASES = ("auto", "packed", "float")
ACTIVATIONS = ("auto", "float32", "bfloat16")
# Saved tensors smaller than this stay as they are: the adapters' own weights and their
# low-rank products, whose rounding the gradients would feel, and too small to matter.
COMPACT_MIN_NUMEL = 1 << 16
RUN_RECORD = "finetune.json"
ADAPTER = "adapter"
# What makes a run this run: a resume may change how long it trains, how often it saves,
# evaluates and logs, and the threads, never what it trains on or what it trains.
IDENTITY = (
    "model",
    "data",
    "method",
    "rank",
    "alpha",
    "dropout",
    "targets",
    "seq_len",
    "batch_tokens",
    "micro_batch_size",
    "seed",
    "val_fraction",
    "overflow",
    "base",
    "weight_decay",
    "precision",
    "packing",
)
# What a run recorded before a key joined IDENTITY did: it ran without packing.
IDENTITY_BEFORE = {"packing": False}


@dataclass
class FinetuneConfig:
    """A fine-tuning run; see the module docstring for the file format."""

    model: str
    data: str
    out_dir: str
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])
    base: str = "auto"  # packed: a GGUF base keeps its stored quantization (LoRA only)
    lr: float = 2.0e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None
    seq_len: int = 512
    batch_tokens: int = 4096  # tokens per optimiser step: batch_tokens / seq_len rows
    micro_batch_size: int = 1  # rows per forward pass
    overflow: str = "truncate"  # or "drop": what happens to an item longer than seq_len
    packing: bool = True  # items share rows, attention kept inside each (module docstring)
    val_fraction: float = 0.1
    seed: int = 0
    precision: str = "fp32"
    threads: int | None = None
    # Keep each block's input alone and recompute the rest of its activations in backward:
    # far less memory (rows × seq_len × dim per block instead of ~25 times that), one more
    # forward pass of the blocks.
    recompute: bool = False
    # What backward's saved activations are kept in: "auto" is bfloat16 on a packed base
    # where the CPU has bfloat16 arithmetic (its backward multiplies in bfloat16 already),
    # else float32. bfloat16 halves their memory, most of a step's.
    activations: str = "auto"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 50
    log_every: int = 10
    plot_every: int = 50
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        fail = failure(self.source)
        check_paths(self, ("model", "data", "out_dir"), fail)
        check_choice(self, "method", METHODS, fail)
        check_choice(self, "base", BASES, fail)
        if self.method == "full" and self.base == "packed":
            raise fail("method full trains every weight, so the base cannot stay packed")
        if self.overflow not in ("truncate", "drop"):
            raise fail(f"overflow must be truncate or drop, got {self.overflow!r}")
        if not isinstance(self.packing, bool):
            raise fail(f"packing must be true or false, got {self.packing!r}")
        if not isinstance(self.recompute, bool):
            raise fail(f"recompute must be true or false, got {self.recompute!r}")
        check_choice(self, "precision", PRECISIONS, fail)
        check_choice(self, "activations", ACTIVATIONS, fail)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise fail(f"rank must be a whole number ≥ 1, got {self.rank!r}")
        from llamalab.train.lora import TARGETS

        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not isinstance(self.targets, list) or not self.targets:
            raise fail(f"targets must be a list of module names among {' '.join(TARGETS)}")
        for t in self.targets:
            if t not in TARGETS:
                raise fail(f"unknown target module {t!r}; choose among {' '.join(TARGETS)}")
        check_whole_numbers(self, RUN_COUNTS, fail)
        check_optional_counts(self, ("max_steps", "threads"), fail)
        check_numbers(
            self,
            {
                "alpha": (0, math.inf),
                "dropout": (0, 0.999),
                **OPTIMISER_RANGES,
                "val_fraction": (0, 0.9),
            },
            fail,
        )
        if self.alpha <= 0:
            raise fail(f"alpha must be a positive number, got {self.alpha!r}")
        if self.epochs is not None:
            e = self.epochs
            if isinstance(e, bool) or not isinstance(e, int | float) or not 0 < e < 1e6:
                raise fail(f"epochs must be a positive number, got {e!r}")
            self.epochs = float(e)
        if (self.max_steps is None) == (self.epochs is None):
            raise fail("set one of max_steps or epochs")
        per_micro = self.seq_len * self.micro_batch_size
        if self.batch_tokens % per_micro:
            raise fail(
                f"batch_tokens {self.batch_tokens} is not a multiple of seq_len × "
                f"micro_batch_size = {per_micro}"
            )

    @property
    def rows_per_step(self) -> int:
        """Rows of ``seq_len`` per optimiser step (over all ranks)."""
        return self.batch_tokens // self.seq_len

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-able), without ``source``."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"source"}


def load_finetune_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """Read a TOML fine-tuning config, apply ``--set key=value`` overrides, validate."""
    path = Path(path)
    data = read_config_file(path, FIELDS)
    for assignment in overrides:
        key, value = parse_assignment(assignment)
        if key not in FIELDS:
            raise LlamalabError(f"--set: unknown config key {key!r}")
        data[key] = value
        if key in ("max_steps", "epochs"):  # one replaces the other
            data.pop("epochs" if key == "max_steps" else "max_steps", None)
    require_keys(data, ("model", "data", "out_dir"), path)
    return FinetuneConfig(**data, source=str(path))


# -- data order ---------------------------------------------------------------------


def rows_of_step(step: int, rows: int, n_items: int, seed: int) -> list[int]:
    """The training items of optimiser step ``step`` (from 0): the next ``rows`` of an
    endless sequence of seeded permutations, one per epoch."""
    out = []
    for k in range(step * rows, (step + 1) * rows):
        epoch, at = divmod(k, n_items)
        out.append(_epoch_order(n_items, seed, epoch)[at])
    return out


@functools.lru_cache(maxsize=2)  # a step spans at most two epochs: one shuffle per epoch
def _epoch_order(n_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def _check_out_dir(out: Path, record: dict[str, Any]) -> bool:
    """Create nothing; accept an empty/new folder or this very run (True: resume)."""
    from llamalab.train.loop import previous_run

    if not previous_run(out, RUN_RECORD, "finetune"):
        return False
    run_file = out / RUN_RECORD
    try:
        old = json.loads(run_file.read_text())
        old_cfg, old_id = old["config"], old["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LlamalabError(f"{run_file}: unreadable; not a llamalab finetune run?") from None
    for key, value in record["identity"].items():
        if old_id.get(key, IDENTITY_BEFORE.get(key)) != value:
            was = old_cfg.get(key, old_id.get(key, IDENTITY_BEFORE.get(key)))
            now = record["config"].get(key, value)
            raise LlamalabError(
                f"{out}: holds another fine-tuning run ({key} was {was!r}, now {now!r}); "
                "choose a new out_dir (nothing was overwritten)"
            )
    return True


# -- the run ------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) the fine-tuning ``cfg`` describes; return a summary of the run.

    Every input is checked (data, model, out_dir) before anything is written. Under
    torchrun every rank calls it (see the module docstring).
    """
    from llamalab.train.parallel import close_world, init_world

    world = init_world("cpu")
    try:
        return _finetune(cfg, world, progress)
    finally:
        close_world(world)


def _say(line: str) -> None:
    print(f"llamalab finetune: {line}", file=sys.stderr, flush=True)


def _finetune(cfg: FinetuneConfig, world: Any, progress: bool | None) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn

    from llamalab.checkpoint.load import load_model, open_checkpoint
    from llamalab.data.instruct import (
        IGNORE,
        load_instruct,
        pack_examples,
        split_validation,
        to_packed_rows,
        to_rows,
        trained_tokens,
    )
    from llamalab.default_model import resolve_model_path
    from llamalab.tokenizer import load_tokenizer
    from llamalab.train.checkpoint import load_newest_checkpoint, save_checkpoint
    from llamalab.train.documents import DocumentMasked, replicate
    from llamalab.train.loop import Batch, resolve_precision, run_steps
    from llamalab.train.optim import build_optimizer
    from llamalab.train.parallel import barrier

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)

    def say(line: str) -> None:
        if world.is_main:
            _say(line)

    # ---- inputs, all checked before anything is written: model header, data, out_dir
    model_path = resolve_model_path(cfg.model)
    reader = open_checkpoint(model_path)
    try:
        mcfg, fmt = reader.config, reader.format
    finally:
        reader.close()
    L, micro_size = cfg.seq_len, cfg.micro_batch_size
    if L > mcfg.context_length:
        raise LlamalabError(
            f"config: seq_len {L} exceeds the model's context length {mcfg.context_length}"
        )
    data_path = Path(cfg.data)
    tokenizer = load_tokenizer(model_path)
    data = load_instruct(data_path, tokenizer, L, overflow=cfg.overflow)
    if not data.examples:
        raise LlamalabError(f"{data_path}: no item has a token to train on at seq_len {L}")
    train_items, val_items = split_validation(data.examples, cfg.val_fraction, cfg.seed)

    # A unit is one row's items: several when packed, one otherwise.
    def units_of(items: list) -> list[list]:
        if not cfg.packing:
            return [[e] for e in items]
        return [[items[i] for i in row] for row in pack_examples(items, L)]

    units, val_units = units_of(train_items), units_of(val_items)
    rows = cfg.rows_per_step
    if rows > len(units):
        made = "pack into" if cfg.packing else "make"
        raise LlamalabError(
            f"config: batch_tokens {cfg.batch_tokens} is {rows} rows of seq_len {L}, more "
            f"than the {len(units)} rows the {len(train_items)} training items {made}; "
            "lower batch_tokens"
        )
    micro_per_step = rows // micro_size
    if micro_per_step % world.world_size:
        raise LlamalabError(
            f"config: batch_tokens {cfg.batch_tokens} is {micro_per_step} micro-batches of "
            f"{micro_size}×{L}, which {world.world_size} processes cannot share evenly; "
            "change batch_tokens or micro_batch_size"
        )
    if cfg.max_steps is not None:
        stop_step = cfg.max_steps
    else:
        stop_step = max(1, math.ceil(cfg.epochs * len(units) / rows))
    packed_base = cfg.method == "lora" and (
        cfg.base == "packed" or (cfg.base == "auto" and fmt == "gguf")
    )
    identity = {k: getattr(cfg, k) for k in IDENTITY}
    identity["model"] = str(model_path.resolve())
    identity["data"] = str(data_path.resolve())
    identity["data_sha256"] = file_sha256(data_path)
    identity["model_config"] = mcfg.to_dict()
    record = {"identity": identity, "config": cfg.to_dict(), "data": data.summary()}
    resuming = _check_out_dir(out, record)

    # ---- the model and what trains
    model = load_model(model_path, dtype=torch.float32, packed=packed_base)
    if cfg.method == "lora":
        from llamalab.train.lora import apply_lora, lora_adapters

        apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, targets=cfg.targets, seed=cfg.seed)
        # Checkpoints and the optimiser see the adapters alone, never the frozen base.
        trainable: nn.Module = nn.ModuleDict(
            {name.replace(".", "-"): a for name, a in lora_adapters(model).items()}
        )
    else:
        model.requires_grad_(True)
        trainable = model
    model.train()
    # What a batch's first tensor feeds: packed rows carry their document ids.
    runner: nn.Module = DocumentMasked(model) if cfg.packing else model
    if cfg.recompute:
        recompute_blocks(model, runner if cfg.packing else None)
    stepper = replicate(runner) if world.distributed else runner
    dtype = resolve_precision(cfg.precision, world.device)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else None
    if _compact_activations(cfg, packed_base):
        autocast = _Forward(autocast, BFloat16Activations())
    optimizer = build_optimizer(trainable, cfg)
    n_trainable = sum(p.numel() for p in trainable.parameters() if p.requires_grad)

    barrier(world)  # every rank has checked out_dir before rank 0 writes into it
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    # Dropout draws from torch's generator: seeded here (each rank its own stream),
    # restored by a resume below.
    torch.manual_seed(cfg.seed + world.rank)
    step = 0
    loaded = load_newest_checkpoint(out, trainable, optimizer, world) if resuming else None
    ckpt = None
    if loaded is not None:
        ckpt, state, passed_over = loaded
        step = int(state["step"])
        if passed_over:
            names = ", ".join(f.name for f, _ in passed_over)
            say(f"cannot load {names} ({passed_over[0][1]}); resuming from {ckpt.name}")

    def to_batch(chosen: list[list]) -> Batch:
        if not cfg.packing:
            return to_rows([u[0] for u in chosen], L, pad_id=0)
        x, y, documents = to_packed_rows(chosen, L, pad_id=0)
        return torch.stack((x, documents), dim=1), y

    # Each rank evaluates every world_size-th micro-batch; sums are added across ranks.
    val_mine = [val_units[i : i + micro_size] for i in range(0, len(val_units), micro_size)][
        world.rank :: world.world_size
    ]

    def evaluate() -> float:
        """Mean validation loss per trained token."""
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)  # loss × tokens, tokens
        with torch.no_grad():
            for chosen in val_mine:
                x, y = to_batch(chosen)
                n = int((y != IGNORE).sum())
                with autocast if autocast is not None else nullcontext():
                    loss = runner(x, targets=y)
                sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        if world.distributed:
            dist.all_reduce(sums)
        model.train()
        return float(sums[0] / sums[1])

    def export() -> Path:
        return _export(model, cfg, out, tokenizer, mcfg, str(model_path))

    if step >= stop_step:
        if world.is_main and not (out / _export_name(cfg)).is_dir():
            export()
        barrier(world)
        return {"rank": world.rank, "step": step, "stop_step": stop_step,
                "already_finished": True, "out_dir": str(out),
                "export": str(out / _export_name(cfg))}  # fmt: skip

    say(f"{data.summary()}; {len(train_items)} train, {len(val_items)} validation")
    if cfg.packing:
        filled = sum(len(e) - 1 for e in train_items) / (len(units) * L)
        say(f"packed into {len(units)} training rows of {L} ({filled:.0%} filled)")
    where = "packed" if packed_base else "float32"
    procs = f", {world.world_size} processes" if world.distributed else ""
    say(
        f"{cfg.method} on {model_path.name} ({where} base), {n_trainable / 1e6:.3f}M trainable "
        f"parameters, {rows} rows of {L} per step{procs}, {stop_step} steps"
        + (f", resuming from {ckpt.name}" if ckpt else "")
    )

    def batches(at: int) -> tuple[list[Batch], dict[str, Any]]:
        chosen = [units[i] for i in rows_of_step(at, rows, len(units), cfg.seed)]
        micro = [chosen[i : i + micro_size] for i in range(0, rows, micro_size)]
        mine = [to_batch(m) for m in micro[world.rank :: world.world_size]]
        return mine, {"trained_tokens": sum(trained_tokens(u) for u in chosen)}

    def save(at: int, tokens: int) -> None:
        save_checkpoint(
            out, at, trainable, optimizer, {"max_steps": stop_step}, world,
            keep=cfg.keep_checkpoints,
        )  # fmt: skip
        if cfg.method == "lora" and world.is_main:
            export()

    steps = run_steps(
        cfg,
        stepper,
        optimizer,
        world,
        step=step,
        tokens=step * cfg.batch_tokens,
        stop_step=stop_step,
        schedule_steps=stop_step,
        accum=micro_per_step // world.world_size,
        autocast=autocast,
        batches=batches,
        evaluate=(lambda: {"validation": evaluate()}) if val_units else None,
        epochs=lambda at: at * rows / len(units),
        save=save,
        saved=ckpt is not None,
        out=out,
        title=f"{cfg.method} {model_path.name}",
        progress=progress,
        log_eval=True,
    )
    exported = None
    if steps.stopped_by is None:
        if cfg.method == "full":
            exported = export() if world.is_main else out / _export_name(cfg)
            barrier(world)
        else:
            exported = out / ADAPTER
    return {
        "rank": world.rank,
        **steps.summary(),
        "export": str(exported) if exported else None,
        "out_dir": str(out),
    }


def _compact_activations(cfg: FinetuneConfig, packed_base: bool) -> bool:
    """Whether backward's saved activations are kept in bfloat16 (the ``activations`` key)."""
    if cfg.activations != "auto":
        return cfg.activations == "bfloat16"
    from llamalab.kernels.cpu import has_native_bf16

    return packed_base and has_native_bf16()


class BFloat16Activations:
    """Keep the float32 activations that autograd saves for backward in bfloat16, and give
    them back in float32 there: half their memory, at bfloat16's rounding of the inputs of
    the gradients' products (the forward pass and the loss are unchanged). A context
    manager around each forward pass (``torch.autograd.graph.saved_tensors_hooks``).

    Parameters, non-float32 tensors and small ones (``COMPACT_MIN_NUMEL``) stay as they
    are. One tensor saved by several operations (a block's normalised input feeds q, k and
    v and their adapters) is converted once: the copies are remembered by the tensor's
    identity, held weakly, for one forward pass.
    """

    def __init__(self) -> None:
        self._copies: dict[int, tuple[weakref.ref, Any]] = {}
        self._hooks = None

    def __enter__(self) -> None:
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc) -> None:
        self._copies.clear()
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)

    def _pack(self, t):
        import torch

        if (
            t.dtype != torch.float32
            or t.numel() < COMPACT_MIN_NUMEL
            or isinstance(t, torch.nn.Parameter)
            or (t.requires_grad and t.is_leaf)
        ):
            return t
        seen = self._copies.get(id(t))
        if seen is not None and seen[0]() is t:
            return seen[1]
        # Wrapped, so that backward widens only what was narrowed here: a tensor saved in
        # bfloat16 already (under autocast) comes back as it was.
        copy = (t.to(torch.bfloat16),)
        self._copies[id(t)] = (weakref.ref(t), copy)
        return copy

    @staticmethod
    def _unpack(t):
        return t[0].float() if isinstance(t, tuple) else t


class _Forward:
    """Several context managers entered around each forward pass, as one."""

    def __init__(self, *contexts) -> None:
        self.contexts = [c for c in contexts if c is not None]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def recompute_blocks(model: torch.nn.Module, documents: DocumentMasked | None = None) -> None:
    """Make each block of ``model`` keep only its input for backward and recompute its
    activations there (``torch.utils.checkpoint``, dropout's random state replayed), in
    place; module names and state are unchanged. Passes without gradients run as before.

    ``documents``: the wrapper that runs ``model`` on packed rows. Its attention mask and
    rotation are in force only during its forward, so each block's recomputation in
    backward is given the ones its forward pass saw.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    def recomputed(forward, *args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        seen = documents._current if documents is not None else None

        def run(*args, **kwargs):
            if documents is None:
                return forward(*args, **kwargs)
            before, documents._current = documents._current, seen
            try:
                return forward(*args, **kwargs)
            finally:
                documents._current = before

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    for layer in model.layers:
        layer.forward = functools.partial(recomputed, layer.forward)


def _export_name(cfg: FinetuneConfig) -> str:
    from llamalab.train.export import EXPORT

    return ADAPTER if cfg.method == "lora" else EXPORT


def _export(model, cfg: FinetuneConfig, out: Path, tokenizer, mcfg, base: str) -> Path:
    """``out/adapter`` (a PEFT folder) or, for a full fine-tune, ``out/export`` (a Meta
    folder with the base's tokenizer), each with ``SHA256SUMS``."""
    import shutil
    import tempfile

    from llamalab.checkpoint.verify import write_checksums
    from llamalab.train.export import export_meta, staged_folder

    if cfg.method == "lora":
        from llamalab.train.lora import export_gguf_adapter, save_peft_adapter

        with staged_folder(out, ADAPTER) as stage:
            save_peft_adapter(model, stage, base_model=base)
            write_checksums(stage)
        export_gguf_adapter(model, out)  # llama.cpp's adapter.gguf beside the PEFT folder
        return out / ADAPTER

    from llamalab.tokenizer.export import write_tokenizer_files

    tok_dir = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer-"))
    try:
        write_tokenizer_files(tokenizer, tok_dir, context_length=mcfg.context_length)
        return export_meta(model.state_dict(), mcfg, tok_dir, out)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
