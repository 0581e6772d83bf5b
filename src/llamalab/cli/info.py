"""``llamalab info``: what a checkpoint or preset is, and what it takes to run it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llamalab.config import PRESETS, ModelConfig

DESCRIPTION = (
    "Describe a checkpoint (GGUF file, Hugging Face folder, Meta folder) or a preset: format, "
    "architecture, parameter count, tensor types, tokenizer, memory needed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref",
        nargs="?",
        default=None,
        help="checkpoint path or preset name (default: the default model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    report = describe(args.ref)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 4) -> int:
    """Keys and values of every layer for one token."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value


def _config_fields(config: ModelConfig) -> dict[str, Any]:
    params = config.num_parameters()
    scaling = config.rope_scaling
    return {
        "architecture": "llama",
        "parameters": params,
        "n_layers": config.n_layers,
        "dim": config.dim,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "ffn_hidden_dim": config.ffn_hidden_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling.kind if scaling else None,
        "norm_eps": config.norm_eps,
        "tied_embeddings": config.tie_embeddings,
        "kv_cache_bytes_per_token_f32": kv_cache_bytes_per_token(config),
        "memory_f32_bytes": params * 4,
        "memory_bf16_bytes": params * 2,
    }


def describe(ref: str | None) -> dict[str, Any]:
    """A JSON-ready description of a preset name or checkpoint path (None: the default model)."""
    if ref is None:
        from llamalab.default_model import default_model_path

        ref = str(default_model_path())
    if ref in PRESETS:
        report = {"format": "preset", "name": ref, **_config_fields(PRESETS[ref])}
        report["tensor_types"] = {}
        report["tokenizer"] = None
        report["weights_bytes"] = None
        return report

    from llamalab.checkpoint.load import open_checkpoint, validate

    reader = open_checkpoint(ref)
    try:
        validate(reader)
        config = reader.config
        report = {"format": reader.format, "path": str(Path(ref).resolve()), "name": config.name}
        report.update(_config_fields(config))
        report["tensor_types"] = reader.stored_types()
        report["tokenizer"] = reader.tokenizer_kind()
        report["weights_bytes"] = reader.weights_nbytes()
        if reader.format == "meta":
            report["shards"] = reader.num_shards
    finally:
        reader.close()
    return report


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe`'s report."""
    ctx = report["context_length"]
    kv = report["kv_cache_bytes_per_token_f32"]
    types = ", ".join(f"{k} ×{v}" for k, v in sorted(report["tensor_types"].items())) or "-"
    lines = [
        (
            "format",
            report["format"] + (f" ({report['shards']} shards)" if "shards" in report else ""),
        ),
        ("name", report.get("name") or "-"),
        ("architecture", report["architecture"]),
        ("parameters", f"{report['parameters']:,}"),
        ("layers", report["n_layers"]),
        ("dim / ffn", f"{report['dim']} / {report['ffn_hidden_dim']}"),
        (
            "heads / kv heads",
            f"{report['n_heads']} / {report['n_kv_heads']} (head dim {report['head_dim']})",
        ),
        ("vocabulary", report["vocab_size"]),
        ("context length", ctx),
        (
            "rope",
            f"theta {report['rope_theta']:g}"
            + (f", {report['rope_scaling']} scaling" if report["rope_scaling"] else ""),
        ),
        ("tied embeddings", "yes" if report["tied_embeddings"] else "no"),
        ("tensor types", types),
        ("tokenizer", report["tokenizer"] or "-"),
        ("weights on disk", _size(report["weights_bytes"])),
        (
            "memory, float32",
            f"{_size(report['memory_f32_bytes'])} + KV cache {_size(kv * ctx)} at full context",
        ),
        (
            "memory, bfloat16",
            f"{_size(report['memory_bf16_bytes'])} + KV cache {_size(kv // 2 * ctx)} at full context",
        ),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
