"""The training config: one flat TOML file, validated, with ``--set key=value`` overrides.

    model = "llama-7b"            # a preset, or a [model] table (preset = ... plus fields)
    data = "data/debian"          # a `llamalab data prepare` folder
    out_dir = "runs/llama-7b"
    seq_len = 2048
    batch_tokens = 4_194_304      # tokens per optimiser step, all ranks together
    total_tokens = 1_000_000_000_000
    lr = 3.0e-4
    [weights]                     # sampling proportions per source (default: by size)
    books = 0.045

Unknown keys are errors that name the key. ``--set`` takes the same keys
(``--set max_steps=20``, ``--set model.dim=128``, ``--set weights.books=0.5``); its value
is read as a TOML value (``true``, ``3e-4``, ``"text"``) or else as a string.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.files import read_text_bounded

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
MAX_CONFIG_BYTES = 1 << 20
# The keys a training and a fine-tuning config share, with their bounds (checked in this
# order): whole numbers and their least values, then the optimiser's numbers and ranges.
RUN_COUNTS = {
    "seq_len": 1,
    "batch_tokens": 1,
    "micro_batch_size": 1,
    "warmup_steps": 0,
    "checkpoint_every": 1,
    "keep_checkpoints": 1,
    "eval_every": 0,
    "log_every": 1,
    "plot_every": 0,
    "seed": 0,
}
OPTIMISER_RANGES = {
    "lr": (0, 1),
    "min_lr_ratio": (0, 1),
    "weight_decay": (0, 10),
    "beta1": (0, 1),
    "beta2": (0, 1),
    "eps": (0, 1),
    "grad_clip": (0, math.inf),
}


@dataclass
class TrainConfig:
    """Everything a training run needs; see the module docstring for the file format."""

    model: str | dict[str, Any]
    data: str
    out_dir: str
    weights: dict[str, float] | None = None
    seed: int = 0
    seq_len: int = 2048
    batch_tokens: int = 4 * 1024 * 1024
    micro_batch_size: int = 1  # sequences per rank per forward pass
    max_steps: int | None = None  # stop after this many steps (default: the schedule's end)
    total_tokens: int | None = None  # the schedule's length (default: max_steps' tokens)
    lr: float = 3.0e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_std: float = 0.02
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 100
    eval_tokens: int = 65536  # held out at the end of each source (at most a tenth of it)
    log_every: int = 10
    plot_every: int = 50
    export: bool = True
    source: str = field(default="", compare=False)  # the file it came from, for messages

    def __post_init__(self) -> None:
        fail = failure(self.source)
        if not isinstance(self.model, str | dict):
            raise fail(f"model must be a preset name or a table, got {self.model!r}")
        check_paths(self, ("data", "out_dir"), fail)
        check_whole_numbers(self, {**RUN_COUNTS, "eval_tokens": 0}, fail)
        check_optional_counts(self, ("max_steps", "total_tokens", "threads"), fail)
        if self.max_steps is None and self.total_tokens is None:
            raise fail("set max_steps or total_tokens")
        if self.micro_batch_size * self.seq_len > self.batch_tokens:
            raise fail(
                f"micro_batch_size {self.micro_batch_size} × seq_len {self.seq_len} is more "
                f"tokens than batch_tokens {self.batch_tokens}, a whole step's; "
                "lower micro_batch_size"
            )
        if self.warmup_steps > self.schedule_steps():
            length = "total_tokens / batch_tokens" if self.total_tokens else "max_steps"
            raise fail(
                f"warmup_steps {self.warmup_steps} is longer than the run's schedule of "
                f"{self.schedule_steps()} steps ({length}): the rate would never reach its "
                "peak or decay; lower warmup_steps or lengthen the run"
            )
        check_numbers(self, {**OPTIMISER_RANGES, "init_std": (0, 10)}, fail)
        for key in ("activation_checkpointing", "compile", "export"):
            if not isinstance(getattr(self, key), bool):
                raise fail(f"{key} must be true or false, got {getattr(self, key)!r}")
        check_choice(self, "precision", PRECISIONS, fail)
        check_choice(self, "device", DEVICES, fail)
        if self.weights is not None:
            if not isinstance(self.weights, dict) or not self.weights:
                raise fail("weights must be a table of source = proportion")
            for name, w in self.weights.items():
                ok = isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
                if not ok or w < 0:
                    raise fail(f"weights.{name} must be a number ≥ 0, got {w!r}")
            if not any(self.weights.values()):
                raise fail("weights are all 0")

    def schedule_steps(self) -> int:
        """Optimiser steps over which the learning rate warms up and decays."""
        if self.total_tokens is not None:
            return max(1, math.ceil(self.total_tokens / self.batch_tokens))
        assert self.max_steps is not None
        return self.max_steps

    def stop_step(self) -> int:
        """The step count at which training stops."""
        return self.max_steps if self.max_steps is not None else self.schedule_steps()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (TOML/JSON-able), without ``source``."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# -- checks shared by every config dataclass (this one and finetune's) ------------------


Fail = Callable[[str], LlamalabError]  # a message -> the error to raise


def failure(source: str) -> Fail:
    """A maker of errors that name the config file ``source`` (if any)."""
    where = f"config {source}: " if source else "config: "
    return lambda msg: LlamalabError(where + msg)


def check_paths(cfg: object, keys: Iterable[str], fail: Fail) -> None:
    """Each of ``keys`` is a non-empty string."""
    for key in keys:
        if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
            raise fail(f"{key} must be a path, got {getattr(cfg, key)!r}")


def _is_whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_whole_numbers(cfg: object, lows: dict[str, int], fail: Fail) -> None:
    """Each key is a whole number (not a bool) at least its value in ``lows``."""
    for key, low in lows.items():
        v = getattr(cfg, key)
        if not _is_whole(v) or v < low:
            raise fail(f"{key} must be a whole number ≥ {low}, got {v!r}")


def check_optional_counts(cfg: object, keys: Iterable[str], fail: Fail) -> None:
    """Each of ``keys`` is unset (None) or a whole number ≥ 1."""
    for key in keys:
        v = getattr(cfg, key)
        if v is not None and (not _is_whole(v) or v < 1):
            raise fail(f"{key} must be a whole number ≥ 1, got {v!r}")


def check_numbers(cfg: object, ranges: dict[str, tuple[float, float]], fail: Fail) -> None:
    """Each key is a finite number within its (low, high) range; a whole number given for
    one is stored as a float."""
    for key, (low, high) in ranges.items():
        v = getattr(cfg, key)
        if _is_whole(v):
            v = float(v)
            setattr(cfg, key, v)
        if not isinstance(v, float) or not math.isfinite(v) or not low <= v <= high:
            raise fail(f"{key} must be a number from {low} to {high}, got {v!r}")


def check_choice(cfg: object, key: str, choices: tuple[str, ...], fail: Fail) -> None:
    """``key`` is one of ``choices``."""
    if getattr(cfg, key) not in choices:
        raise fail(f"{key} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"source"}
TABLE_KEYS = ("model", "weights")  # keys whose value may be a table (``--set model.dim=``)


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """A ``--set key=value``'s key and its value (read by :func:`parse_value`)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LlamalabError(f"--set expects key=value, got {assignment!r}")
    return key, parse_value(text.strip())


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key=value`` to the raw config dict (validated later, with the rest)."""
    key, value = parse_assignment(assignment)
    head, dot, sub = key.partition(".")
    if head not in FIELDS:
        raise LlamalabError(f"--set: unknown config key {head!r}")
    if not dot:
        data[head] = value
        return
    if head not in TABLE_KEYS or not sub:
        raise LlamalabError(f"--set: {head!r} is not a table; use --set {head}=VALUE")
    table = data.get(head)
    if head == "model" and isinstance(table, str):
        table = {"preset": table}
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise LlamalabError(f"--set: {head!r} is not a table")
    data[head] = {**table, sub: value}


def read_config_file(path: Path, fields: set[str]) -> dict[str, Any]:
    """The TOML table in ``path``, every key of it among ``fields``."""
    if not os.path.lexists(path):
        raise LlamalabError(f"{path}: no such config file")
    # Bounded, and a FIFO or a device is named for what it is rather than read.
    text = read_text_bounded(path, MAX_CONFIG_BYTES, "config")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LlamalabError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - fields)
    if unknown:
        raise LlamalabError(f"{path}: unknown config key {unknown[0]!r}")
    return data


def require_keys(data: dict[str, Any], keys: Iterable[str], path: Path) -> None:
    """Each of ``keys`` is set, in the file or by ``--set``."""
    for key in keys:
        if key not in data:
            raise LlamalabError(
                f"{path}: missing {key} (set it in the file or with --set {key}=...)"
            )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML training config, apply ``--set`` overrides, validate."""
    path = Path(path)
    data = read_config_file(path, FIELDS)
    for assignment in overrides:
        apply_override(data, assignment)
    require_keys(data, ("data", "out_dir"), path)
    if "model" not in data:
        raise LlamalabError(f"{path}: missing model")
    cfg = TrainConfig(**data, source=str(path))
    model_config(cfg, 1)  # model keys and shapes are checked now, before any data is read
    return cfg


def model_config(cfg: TrainConfig, vocab_size: int):
    """The run's :class:`~llamalab.config.ModelConfig`, sized for a tokenizer of ``vocab_size``.

    A preset keeps its vocabulary (it must hold the tokenizer's); a table without
    ``vocab_size`` takes the tokenizer's. ``context_length`` defaults to ``seq_len``.
    """
    from llamalab.config import ModelConfig, ffn_hidden_dim, get_preset

    spec = {"preset": cfg.model} if isinstance(cfg.model, str) else dict(cfg.model)
    preset = spec.pop("preset", None)
    multiple_of = spec.pop("multiple_of", 256)
    if preset is not None:
        base = get_preset(str(preset)).to_dict()
        base.pop("name")
        if "dim" in spec and "ffn_hidden_dim" not in spec:
            spec["ffn_hidden_dim"] = ffn_hidden_dim(spec["dim"], multiple_of)
    else:
        base = {"vocab_size": vocab_size, "context_length": cfg.seq_len}
        if "dim" in spec and "ffn_hidden_dim" not in spec:
            base["ffn_hidden_dim"] = ffn_hidden_dim(spec["dim"], multiple_of)
    unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(ModelConfig)} - {"name"})
    if unknown:
        raise LlamalabError(f"config: unknown model key {unknown[0]!r}")
    merged = {**base, **spec}
    try:
        mc = ModelConfig.from_dict(merged)
    except TypeError as exc:
        raise LlamalabError(f"config: model: {exc}") from None
    if mc.vocab_size < vocab_size:
        raise LlamalabError(
            f"config: the model's vocab_size {mc.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size}"
        )
    if mc.context_length < cfg.seq_len:
        raise LlamalabError(
            f"config: seq_len {cfg.seq_len} exceeds the model's context length {mc.context_length}"
        )
    return mc
