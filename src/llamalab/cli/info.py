"""``llamalab info``: what a checkpoint or preset is, and what it takes to run it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from llamalab.cli.options import model_ref, positive_int
from llamalab.config import PRESETS, ModelConfig
from llamalab.runtime import DTYPE_CHOICES

DESCRIPTION = (
    "Describe a checkpoint (GGUF file, Hugging Face folder, Meta folder) or a preset: format, "
    "architecture, parameter count, tensor types, tokenizer, memory needed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref",
        nargs="?",
        type=model_ref,
        default=None,
        help="checkpoint path or preset name (default: the default model)",
    )
    # -m as every other command names the model; the positional form stays for `info PATH`.
    p.add_argument(
        "-m",
        "--model",
        type=model_ref,
        default=None,
        help="checkpoint path or preset name (as REF)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # The same defaults as `generate`, so the memory figure is what running it takes.
    p.add_argument(
        "-c",
        "--ctx",
        type=positive_int,
        default=2048,
        help="context to size the KV cache for (default: %(default)s, as generate)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weight form to size the memory for (default: auto, as generate)",
    )


def run(args: argparse.Namespace) -> int:
    from llamalab.errors import LlamalabError
    from llamalab.kernels import planned_isa

    if args.ref is not None and args.model is not None and args.ref != args.model:
        raise LlamalabError("give the model once: as an argument or with -m, not both")
    ref = args.model if args.model is not None else args.ref
    report = describe(ref, ctx=args.ctx, dtype=args.dtype)
    # The kernel path a load would take: avx512, avxvnni, avx2 or torch (llamalab.kernels).
    report["isa"] = planned_isa() if args.dtype == "auto" else "torch"
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


def run_memory(
    config: ModelConfig, ctx: int, dtype: str, stored: dict[str, tuple[str, int]] | None = None
) -> dict[str, Any]:
    """What running the model takes: weights in the form ``dtype`` loads, plus the KV cache.

    ``auto`` on the CPU packs every linear layer (the output layer included, even when it
    shares the embedding's values): 4-bit GGUF types in 4 bits where the CPU runs that
    kernel, the rest as float16 (``quant/plan.py``). A GGUF file's embedding stays in its
    stored type; otherwise the embedding and norms are float32. ``stored`` maps each
    tensor to its stored type and size (a GGUF file's); without it every linear counts as
    float16. ``float32`` holds every weight in float32. The cache is float32 on the CPU
    and holds ``ctx`` tokens (never more than the model's context).
    """
    from llamalab.checkpoint.names import expected_shapes
    from llamalab.quant.plan import packed_linear_bytes

    shapes = expected_shapes(config)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    embedding = sizes.pop("tok_embeddings.weight")
    norms = sum(n for name, n in sizes.items() if name.endswith("norm.weight"))
    if dtype == "auto":
        stored = stored or {}
        kind = lambda name: stored.get(name, ("F16", 0))[0]
        linears = [name for name in sizes if not name.endswith("norm.weight")]
        weights = sum(packed_linear_bytes(kind(name), shapes[name]) for name in linears)
        embedding_type, embedding_bytes = stored.get("tok_embeddings.weight", ("F32", 0))
        if config.tie_embeddings:  # the output layer is packed as one more linear
            weights += packed_linear_bytes(embedding_type, shapes["tok_embeddings.weight"])
        weights += 4 * norms + (4 * embedding if embedding_type == "F32" else embedding_bytes)
    else:
        weights = 4 * config.num_parameters()
    tokens = min(ctx, config.context_length)
    kv = kv_cache_bytes_per_token(config) * tokens
    return {"dtype": dtype, "ctx": tokens, "weights_bytes": weights, "kv_cache_bytes": kv,
            "total_bytes": weights + kv}  # fmt: skip


def _tokenizer_fields(ref: str) -> dict[str, Any]:
    """BOS, EOS, the stop tokens and the chat template of a checkpoint's tokenizer."""
    from llamalab.errors import LlamalabError
    from llamalab.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(ref)
    except LlamalabError as exc:
        return {"tokenizer_error": str(exc)}

    def token(i: int | None) -> dict[str, Any] | None:
        return None if i is None else {"id": i, "text": tok.id_to_piece(i)}

    template = tok.chat_template
    return {
        "bos": token(tok.bos_id),
        "eos": token(tok.eos_id),
        "stop_tokens": [token(i) for i in sorted(tok.stop_ids)],
        "chat_template": None
        if template is None
        else {"origin": template.name, "source": template.source},
    }


def describe(ref: str | None, *, ctx: int = 2048, dtype: str = "auto") -> dict[str, Any]:
    """A JSON-ready description of a preset name or checkpoint path (None: the default model).

    ``ctx`` and ``dtype`` size the memory figure as ``generate`` with those options would.
    """
    if ref is None:
        from llamalab.default_model import default_model_path

        ref = str(default_model_path())
    if ref in PRESETS:
        config = PRESETS[ref]
        report = {"format": "preset", "name": ref, **_config_fields(config)}
        report["tensor_types"] = {}
        report["tokenizer"] = None
        report["weights_bytes"] = None
        report["run_memory"] = run_memory(config, ctx, dtype)
        return report

    from llamalab.checkpoint.load import open_checkpoint, validate
    from llamalab.files import refuse_special

    refuse_special(ref)  # a FIFO or a device: say so, rather than "not a regular file"
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
        stored = None
        if reader.format == "gguf":  # only GGUF weights are packed from their stored form
            infos = {name: reader.info(name) for name in reader.names()}
            stored = {name: (info.stored_type, info.nbytes) for name, info in infos.items()}
    finally:
        reader.close()
    report["run_memory"] = run_memory(config, ctx, dtype, stored)
    report.update(_tokenizer_fields(ref))
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
        *_tokenizer_lines(report),
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
    if "path" in report:
        lines.insert(1, ("path", report["path"]))
    run = report["run_memory"]
    lines.append(
        (
            f"to run ({run['dtype']}, ctx {run['ctx']})",
            (
                f"{_size(run['total_bytes'])}: weights {_size(run['weights_bytes'])}"
                f" + KV cache {_size(run['kv_cache_bytes'])}"
            ),
        )
    )
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _tokenizer_lines(report: dict[str, Any]) -> list[tuple[str, str]]:
    if "tokenizer_error" in report:
        return [("tokenizer error", report["tokenizer_error"])]
    if "bos" not in report:
        return []

    def shown(token: dict[str, Any] | None) -> str:
        return "-" if token is None else f"{token['text']!r} ({token['id']})"

    template = report["chat_template"]
    if template is None:
        template_line = "-"
    else:
        first = template["source"].strip().splitlines()[0] if template["source"].strip() else ""
        more = " ..." if len(template["source"].strip().splitlines()) > 1 else ""
        template_line = f"{template['origin']}: {first[:60]}{'...' if len(first) > 60 else more}"
    return [
        ("bos / eos", f"{shown(report['bos'])} / {shown(report['eos'])}"),
        ("stop tokens", ", ".join(shown(t) for t in report["stop_tokens"]) or "-"),
        ("chat template", template_line),
    ]
