"""The training loop: one function that reads top to bottom.

`train(cfg)` builds the model, data and optimiser, resumes from the newest whole
checkpoint in ``out_dir`` if there is one, and runs optimiser steps until
``max_steps``: each step accumulates gradients over micro-batches up to
``batch_tokens``, clips them to ``grad_clip``, and updates with AdamW at the schedule's
learning rate. Every rank runs this same function; see `parallel.py`.

Before anything is written, sizes that cannot work are refused with the key to change
(`budget.py`): a micro-batch whose activations exceed the memory, a batch larger than
the data. A newest checkpoint that does not load is passed over for the next older
one, with one line saying so. A finished run run again trains nothing and says so.

The learning rate is a function of the step and of this run's config alone
(`schedule_change` states the rule): resuming with another ``max_steps`` (or
``total_tokens``) continues on the new schedule from the saved step, and says so.

Sequences are packed: training window ``w`` of a source is ``tokens[w·L : w·L+L+1]``
(inputs and their next tokens), so a sequence may span documents, which EOS separates.
The last ``eval_tokens`` tokens of each source (at most a tenth of it) are held out and
never trained on; the held-out loss per source is measured every ``eval_every`` steps.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import torch

from llamalab.data import MixtureSampler, TokenShards
from llamalab.errors import LlamalabError
from llamalab.train.budget import (
    activation_bytes,
    available_memory,
    check_data,
    check_memory,
    ranks_on_this_host,
)
from llamalab.train.checkpoint import load_newest_checkpoint, save_checkpoint
from llamalab.train.config import TrainConfig, model_config
from llamalab.train.export import EXPORT, export_meta
from llamalab.train.metrics import METRICS, PLOT, MetricsWriter, plot_metrics, truncate_metrics
from llamalab.train.optim import build_optimizer
from llamalab.train.parallel import (
    World,
    all_reduce_mean,
    any_rank,
    apply_ac,
    apply_compile,
    apply_fsdp,
    barrier,
    close_world,
    init_weights,
    init_world,
)
from llamalab.train.run_dir import RUN_FILE
from llamalab.train.schedule import lr_at


@dataclass
class Split:
    """One source's training and held-out windows."""

    train_windows: int
    eval_start: int  # first held-out token
    eval_windows: int


def split_source(n_tokens: int, seq_len: int, eval_tokens: int) -> Split:
    """Hold out the end of a source: ``eval_tokens``, at most a tenth of it."""
    held = min(eval_tokens, n_tokens // 10)
    train_tokens = n_tokens - held
    return Split(
        train_windows=max(0, (train_tokens - 1) // seq_len),
        eval_start=train_tokens,
        eval_windows=max(0, (held - 1) // seq_len),
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX-512 BF16 or AMX)."""
    from llamalab.kernels.cpu import has_native_bf16

    return has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """bf16 or fp32 for the matmuls; ``auto`` picks bf16 where it is fast.

    On CUDA: any GPU with bf16 support. On CPUs: only with native bf16 instructions.
    Measured on this project's 2-core AMD EPYC with AVX-512 BF16 (torch 2.13, one
    forward+backward, interleaved, medians of 6, OMP_WAIT_POLICY=PASSIVE, machine shared),
    bf16 autocast against fp32: dim 64 × 2 layers 1.3-1.4×, dim 128 × 4 layers 1.3×,
    dim 512 × 4 layers 1.7-1.8×, dim 1024 × 2 layers 1.85-2.0× the tokens/s, on 1 and
    2 threads alike. Without those instructions bf16 runs 40-200× slower than fp32
    (DESIGN.md), so fp32 is kept there.
    Master weights, optimiser state and the loss stay fp32 either way.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _check_out_dir(out: Path, record: dict[str, Any], world: World) -> bool:
    """Create ``out`` or accept a previous run of the same model; return whether it resumes."""
    if not previous_run(out, RUN_FILE, "train"):
        return False
    run_file = out / RUN_FILE
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError):
        raise LlamalabError(f"{run_file}: unreadable; not a llamalab run?") from None
    for key in ("model", "tokenizer_sha256"):
        if old.get(key) != record[key]:
            raise LlamalabError(
                f"{out}: holds a run with another {key.replace('_', ' ')}; choose a new out_dir"
            )
    return True


def previous_run(out: Path, record: str, command: str) -> bool:
    """Whether ``out`` holds a run's ``record`` file (the caller checks it is the same run);
    without one, ``out`` must be new or an empty folder (hidden files aside)."""
    if out.exists() and not out.is_dir():
        raise LlamalabError(f"{out}: exists and is not a folder")
    if (out / record).is_file():
        return True
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise LlamalabError(
            f"{out}: folder is not empty and is not a previous `llamalab {command}` run; "
            "choose a new or empty out_dir (nothing was overwritten)"
        )
    return False


class _StopSignal:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step.

    A second signal of the same kind gets the default behaviour (stop at once).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _batch(
    shards: TokenShards, items: list[tuple[str, int]], seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack(
        [shards.sources[name].tokens[w * seq_len : w * seq_len + seq_len + 1] for name, w in items]
    ).astype(np.int64)
    t = torch.from_numpy(rows).to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]  # (B, L) inputs and next-token targets


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    shards: TokenShards,
    splits: dict[str, Split],
    cfg: TrainConfig,
    world: World,
    autocast: Any,
) -> dict[str, float]:
    """Mean held-out loss per source, every rank taking an equal share of the windows."""
    model.eval()
    out = {}
    L, B = cfg.seq_len, cfg.micro_batch_size
    for name, split in splits.items():
        per_rank = split.eval_windows // world.world_size
        if per_rank == 0:
            continue
        offset = split.eval_start
        mine = [world.rank + world.world_size * i for i in range(per_rank)]
        total = torch.zeros((), device=world.device, dtype=torch.float64)
        for i in range(0, per_rank, B):
            idx = mine[i : i + B]
            rows = np.stack(
                [shards.sources[name].tokens[offset + w * L : offset + w * L + L + 1] for w in idx]
            ).astype(np.int64)
            t = torch.from_numpy(rows).to(world.device)
            with autocast:
                loss = model(t[:, :-1], targets=t[:, 1:])
            total += loss.double() * len(idx)
        out[name] = float(all_reduce_mean(total / per_rank, world))
    model.train()
    return out


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    accum: int,
    lr: float,
    grad_clip: float,
    autocast: Any = None,
    distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step over ``accum`` micro-batches of (inputs, targets).

    The gradient is the mean over micro-batches (each loss is a mean over its tokens, and
    all micro-batches are the same size, so this is the mean over the whole batch); it is
    clipped to ``grad_clip`` in global L2 norm, then AdamW updates at ``lr``.
    Returns this rank's mean loss and the gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = None
    for micro, (x, y) in enumerate(micro_batches):
        if distributed:
            # FSDP: reduce gradients across ranks once, after the last micro-batch.
            model.set_requires_gradient_sync(micro == accum - 1)
        with autocast if autocast is not None else nullcontext():
            loss = model(x, targets=y)
        (loss / accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    if loss_sum is None:
        raise ValueError("train_step needs at least one micro-batch")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / accum, grad_norm


def train(cfg: TrainConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) the training ``cfg`` describes; return a summary of the run.

    Args:
        cfg: the validated config.
        progress: show a progress bar (default: when stderr is a terminal; otherwise
            one plain line every ``log_every`` steps).
    """
    world = init_world(cfg.device)
    try:
        return _train(cfg, world, progress)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World, progress: bool | None) -> dict[str, Any]:
    from llamalab.model import Transformer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    shards = TokenShards(cfg.data)
    mcfg = model_config(cfg, shards.vocab_size)
    L = cfg.seq_len
    per_micro = L * cfg.micro_batch_size * world.world_size
    if cfg.batch_tokens % per_micro:
        raise LlamalabError(
            f"config: batch_tokens {cfg.batch_tokens} is not a multiple of seq_len × "
            f"micro_batch_size × world size = {per_micro}"
        )
    accum = cfg.batch_tokens // per_micro
    if mcfg.tie_embeddings and world.distributed:
        raise LlamalabError("config: tie_embeddings is not supported with more than one rank yet")

    # ---- sizes, checked before anything is written or allocated: the model is built on
    # `meta` (no memory) and would one micro-batch of it fit?
    with torch.device("meta"):
        model = Transformer(mcfg)
    dtype = resolve_precision(cfg.precision, world.device)
    n_params = sum(p.numel() for p in model.parameters())
    check_memory(
        n_params=n_params,
        shards=world.world_size,
        ranks_here=1 if world.device.type == "cuda" else ranks_on_this_host(),
        activations=activation_bytes(
            dim=mcfg.dim,
            kv_dim=mcfg.n_kv_heads * (mcfg.dim // mcfg.n_heads),
            ffn_hidden_dim=mcfg.ffn_hidden_dim,
            n_layers=mcfg.n_layers,
            tokens=cfg.micro_batch_size * L,
            element_bytes=dtype.itemsize,
            checkpointing=cfg.activation_checkpointing,
        ),
        available=available_memory(world.device),
        micro_batch_size=cfg.micro_batch_size,
        seq_len=L,
    )

    # ---- data: each source's training and held-out windows, and the mixture over them
    splits = {
        name: split_source(len(src), L, cfg.eval_tokens) for name, src in shards.sources.items()
    }
    sampler = MixtureSampler(
        {n: s.train_windows for n, s in splits.items()},
        cfg.weights,
        seed=cfg.seed,
        rank=world.rank,
        world_size=world.world_size,
    )
    sampled = [n for n, w in zip(sampler.names, sampler.weights, strict=True) if w > 0]
    check_data(cfg.batch_tokens, sum(splits[n].train_windows for n in sampled) * L, cfg.data)

    record = {
        "model": mcfg.to_dict(),
        "tokenizer_sha256": shards.tokenizer_sha256,
        "config": cfg.to_dict(),
    }
    resuming = _check_out_dir(out, record, world)
    barrier(world)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    # ---- the model: transformed, then materialised on the device, each rank holding only
    # its shard, and initialised the same for any world size.
    if cfg.activation_checkpointing:
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if world.distributed:
        apply_fsdp(model, dtype if dtype != torch.float32 else None)
        autocast: Any = nullcontext()
    elif dtype != torch.float32:
        autocast = torch.autocast(world.device.type, dtype=dtype)
    else:
        autocast = nullcontext()
    model.to_empty(device=world.device)
    model.tie_weights()  # to_empty gives each module its own tensor: share the matrix again
    init_weights(model, cfg.seed, cfg.init_std)
    model.init_buffers(world.device)
    model.rope_table(L)  # every position a sequence uses, built once
    optimizer = build_optimizer(model, cfg)

    stop_step = cfg.stop_step()
    total_steps = cfg.schedule_steps()

    def say(line: str) -> None:  # before the progress bar exists, so never on its line
        if world.is_main:
            print(f"llamalab train: {line}", file=sys.stderr, flush=True)

    # ---- resume
    step, tokens = 0, 0
    ckpt = None
    loaded = load_newest_checkpoint(out, model, optimizer, world) if resuming else None
    if loaded is not None:
        ckpt, state, passed_over = loaded
        sampler.load_state_dict(state["sampler"])
        step, tokens = int(state["step"]), int(state["tokens"])
        if passed_over:
            names = ", ".join(f.name for f, _ in passed_over)
            say(
                f"cannot load {names} ({passed_over[0][1]}); resuming from {ckpt.name}, "
                "the newest checkpoint that loads"
            )
        if step < stop_step:
            for line in schedule_change(cfg, state, step):
                say(line)
    if step >= stop_step:
        # A finished run run again: nothing to train. Export if a kill interrupted it.
        export_dir = None
        if cfg.export and not (out / EXPORT).is_dir():
            export_dir = _export(model, mcfg, shards, out, world)
        return {
            "rank": world.rank,
            "step": step,
            "stop_step": stop_step,
            "already_finished": True,
            "loss": math.nan,
            "steps_run": 0,
            "elapsed_s": 0.0,
            "tokens_per_s": 0.0,
            "stopped_by": None,
            "export": str(export_dir or out / EXPORT) if cfg.export else None,
            "epochs": sampler.epochs(),
        }
    say(
        f"{n_params / 1e6:.2f}M parameters, {world.world_size} rank(s) on "
        f"{world.device.type}, {str(dtype).removeprefix('torch.')}, {accum} micro-batch(es) "
        f"of {cfg.micro_batch_size}×{L} per step" + (f", resuming from {ckpt.name}" if ckpt else "")
    )

    def batches(step: int) -> tuple[Iterator[Batch], dict[str, Any]]:
        # A generator: one micro-batch in memory at a time.
        micro_batches = (
            _batch(shards, sampler.take(cfg.micro_batch_size), L, world.device)
            for _ in range(accum)
        )
        return micro_batches, {}

    def save(step: int, tokens: int) -> None:
        # The schedule's length and stop step are kept to tell a resume that changes them.
        state = {
            "tokens": tokens,
            "sampler": sampler.state_dict(),
            "max_steps": stop_step,
            "schedule_steps": total_steps,
        }
        save_checkpoint(out, step, model, optimizer, state, world, keep=cfg.keep_checkpoints)

    steps = run_steps(
        cfg,
        model,
        optimizer,
        world,
        step=step,
        tokens=tokens,
        stop_step=stop_step,
        schedule_steps=total_steps,
        accum=accum,
        autocast=autocast,
        batches=batches,
        evaluate=lambda: evaluate(model, shards, splits, cfg, world, autocast),
        epochs=lambda _step: sampler.epochs(),
        save=save,
        saved=ckpt is not None,
        out=out,
        title=mcfg.name or "llamalab",
        progress=progress,
    )

    # ---- the end: export (full weights gathered to rank 0)
    export_dir = None
    if cfg.export and steps.stopped_by is None:
        export_dir = _export(model, mcfg, shards, out, world)
    return {
        "rank": world.rank,
        **steps.summary(),
        "export": str(export_dir) if export_dir else None,
        "epochs": sampler.epochs(),
    }


class StepSettings(Protocol):
    """The config keys :func:`run_steps` reads (a training and a fine-tuning config's)."""

    lr: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    batch_tokens: int
    eval_every: int
    log_every: int
    plot_every: int
    checkpoint_every: int


Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


@dataclass
class Steps:
    """What :func:`run_steps` did."""

    step: int  # the step reached
    stop_step: int
    loss: float  # the last step's (NaN where none ran)
    steps_run: int
    elapsed_s: float  # the loop: steps, evaluations, checkpoints
    tokens_per_s: float
    stopped_by: str | None  # the signal's name, where one stopped the run

    def summary(self) -> dict[str, Any]:
        """The run summary's fields that every training command reports."""
        return {
            "step": self.step,
            "stop_step": self.stop_step,
            "already_finished": False,
            "loss": self.loss,
            "steps_run": self.steps_run,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
            "stopped_by": self.stopped_by,
        }


def run_steps(
    cfg: StepSettings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    *,
    step: int,
    tokens: int,
    stop_step: int,
    schedule_steps: int,
    accum: int,
    autocast: Any,
    batches: Callable[[int], tuple[Iterable[Batch], dict[str, Any]]],
    evaluate: Callable[[], dict[str, float]] | None,
    epochs: Callable[[int], Any],
    save: Callable[[int, int], None],
    saved: bool,
    out: Path,
    title: str,
    progress: bool | None,
    log_eval: bool = False,
) -> Steps:
    """Optimiser steps from ``step`` to ``stop_step``, as `llamalab train` and
    `llamalab finetune` run them; every rank calls it.

    Each step takes ``batches(step)``: its ``accum`` micro-batches and the extra fields of
    its metrics record; the rate follows the schedule of ``schedule_steps``. Every step
    appends to ``out/metrics.jsonl`` (truncated to ``step`` first: a resume) and moves the
    progress bar (or, without one, says a line every ``log_every`` steps, with the eval
    losses where ``log_eval``); ``evaluate()`` runs every ``eval_every`` steps and at the
    last; ``save(step, tokens)`` writes a checkpoint every ``checkpoint_every`` steps, at
    the last, on SIGINT/SIGTERM (which then stop the loop) and at the end if the last step
    is unsaved (``saved``: ``step`` itself is). ``out/loss.png`` is drawn every
    ``plot_every`` steps and at the end, titled ``title``.
    """
    from tqdm import tqdm

    metrics_path = out / METRICS
    if world.is_main:
        if metrics_path.exists():
            truncate_metrics(metrics_path, step)
        metrics = MetricsWriter(metrics_path)
    barrier(world)
    # The bar draws itself as soon as it exists: every line said before this is printed first.
    show_bar = world.is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=stop_step, initial=step, unit="step", disable=not show_bar, dynamic_ncols=True)
    last_saved = step if saved else -1
    t_start = time.perf_counter()
    start_step = step
    stopped_by: int | None = None
    loss_value = math.nan

    with _StopSignal() as stop, _closing(bar):
        while step < stop_step:
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                peak=cfg.lr,
                warmup_steps=cfg.warmup_steps,
                total_steps=schedule_steps,
                min_ratio=cfg.min_lr_ratio,
            )
            micro_batches, extra = batches(step)
            loss_t, grad_norm = train_step(
                model,
                optimizer,
                micro_batches,
                accum=accum,
                lr=lr,
                grad_clip=cfg.grad_clip,
                autocast=autocast,
                distributed=world.distributed,
            )
            step += 1
            tokens += cfg.batch_tokens
            loss_value = float(all_reduce_mean(loss_t, world))
            dt = time.perf_counter() - t0
            rec: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                **extra,
                "tokens_per_s": cfg.batch_tokens / dt,
                "elapsed_s": time.perf_counter() - t_start,
                "epochs": epochs(step),
            }
            if (
                evaluate is not None
                and cfg.eval_every
                and (step % cfg.eval_every == 0 or step == stop_step)
            ):
                rec["eval_loss"] = evaluate()
            if not math.isfinite(loss_value):
                raise LlamalabError(f"step {step}: the loss is {loss_value}; stopping")
            if world.is_main:
                metrics.write(rec)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:,.0f}"
                )
                if not show_bar and (step % cfg.log_every == 0 or step == stop_step):
                    evals = rec.get("eval_loss", {}) if log_eval else {}
                    print(
                        f"step {step}/{stop_step} loss {loss_value:.4f} lr {lr:.2e}"
                        + "".join(f" val {v:.4f}" for v in evals.values())
                        + f" {rec['tokens_per_s']:,.0f} tok/s",
                        file=sys.stderr,
                    )
                if cfg.plot_every and step % cfg.plot_every == 0:
                    plot_metrics(metrics_path, out / PLOT, title=title)
            stopping = any_rank(stop.received is not None, world)
            if step % cfg.checkpoint_every == 0 or stopping or step == stop_step:
                save(step, tokens)
                last_saved = step
            if stopping:
                stopped_by = stop.received or signal.SIGTERM
                break
    elapsed = time.perf_counter() - t_start
    if step > last_saved and step > 0:  # e.g. a run resumed at its last step
        save(step, tokens)
    if world.is_main:
        metrics.close()
        plot_metrics(metrics_path, out / PLOT, title=title)
    done = step - start_step
    return Steps(
        step=step,
        stop_step=stop_step,
        loss=loss_value,
        steps_run=done,
        elapsed_s=elapsed,
        tokens_per_s=done * cfg.batch_tokens / elapsed if elapsed > 0 else 0.0,
        stopped_by=signal.Signals(stopped_by).name if stopped_by else None,
    )


@contextmanager
def _closing(bar: Any) -> Iterator[None]:
    """Close the progress bar however the loop ends, so an error starts a line of its own."""
    try:
        yield
    finally:
        bar.close()


def _export(
    model: torch.nn.Module, mcfg: Any, shards: TokenShards, out: Path, world: World
) -> Path | None:
    """Gather the full weights (a collective call) and write ``out/export`` on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    export_dir = export_meta(full, mcfg, shards.tokenizer_folder, out) if world.is_main else None
    barrier(world)
    return export_dir


def schedule_change(cfg: TrainConfig, state: dict[str, Any], step: int) -> list[str]:
    """What a resume tells about a changed ``max_steps`` or schedule length (or nothing).

    The rule: the learning rate is a function of the step and of *this* config only
    (``lr_at(step, warmup_steps, schedule_steps())``), as in torchtitan and LitGPT, where
    the schedule is rebuilt from the job's step count on every start. A resume with
    another schedule length therefore continues on the new curve from the saved step:
    a longer one lifts the rate back up the cosine. To train on past the end while the
    rate stays where the saved schedule left it, keep the schedule's length with
    ``total_tokens`` (the old steps × batch_tokens) and raise only ``max_steps``.
    """
    saved_stop, saved_len = state.get("max_steps"), state.get("schedule_steps")
    if saved_stop is None or saved_len is None:  # a checkpoint from before they were kept
        return []
    stop, length = cfg.stop_step(), cfg.schedule_steps()
    if saved_stop == stop and saved_len == length:
        return []
    lines = []
    if saved_stop != stop:
        lines.append(f"warning: max_steps is {stop}, the checkpoint's run had {saved_stop}")
    if saved_len == length:
        lines.append(f"the learning-rate schedule is unchanged ({length} steps, from total_tokens)")
        return lines

    def rate(total: int) -> float:
        return lr_at(
            step,
            peak=cfg.lr,
            warmup_steps=min(cfg.warmup_steps, total),
            total_steps=total,
            min_ratio=cfg.min_lr_ratio,
        )

    lines.append(
        f"warning: the learning-rate schedule now ends at step {length}, not {saved_len}; "
        "the rate follows this config's schedule from the saved step, so step "
        f"{step + 1} runs at {rate(length):.3g} instead of {rate(saved_len):.3g}. "
        f"To keep the saved schedule, add --set total_tokens={saved_len * cfg.batch_tokens}"
    )
    return lines
