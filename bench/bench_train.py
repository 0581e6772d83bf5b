"""Training throughput: `llamalab train` against a plain transformers loop, same model and batch.

Both sides train the same LLaMA (``configs/train/small.toml``'s model unless ``--config``
says otherwise) on the same token shards, with the same batch (micro-batches of
``micro_batch_size`` sequences, accumulated to ``batch_tokens``), AdamW and gradient
clipping. The reference is the loop a user would write around
``transformers.LlamaForCausalLM``: eager, SDPA attention, ``loss.backward()`` per
micro-batch, ``clip_grad_norm_``, ``optimizer.step()``. Each side runs in a fresh process,
alternating, ``--runs`` times per thread count and precision; a run's figure is its median
tokens/s over the steps after ``--warmup``. Reported: median [min, max] over runs, the
ratio of medians, and MFU: model FLOPs per token (6 × parameters outside the input
embedding + 12 × layers × dim × seq_len, the usual estimate) × tokens/s over the peak that torch's own matmul reaches on
this machine at that precision and thread count (measured here, a 2048³ matmul).

    .venv/bin/python bench/bench_train.py [--data DIR] [--runs 3] [--steps 12] [--threads 1 2]

Without ``--data`` it prepares a small set from this Python's standard library (a 4,000
piece tokenizer) in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import in_fresh_process

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- workers
def worker_llamalab(
    config: str, data: str, out: str, steps: int, threads: int, precision: str, compile: bool
):
    from llamalab.train.config import load_config
    from llamalab.train.loop import train

    sets = [f"data={data}", f"out_dir={out}", f"max_steps={steps}", f"threads={threads}"]
    sets += [f"compile={'true' if compile else 'false'}"]
    sets += [f"precision={precision}", "eval_every=0", "checkpoint_every=100000"]
    sets += ["export=false", "log_every=1000000", "plot_every=0"]
    # Sources are sampled by size: the speed does not depend on the mixture.
    train(replace(load_config(config, sets), weights=None), progress=False)
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["tokens_per_s"] for line in lines]


def worker_transformers(config: str, data: str, steps: int, threads: int, precision: str):
    import contextlib

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamalab.data.shards import TokenShards
    from llamalab.train.config import load_config, model_config

    torch.set_num_threads(threads)
    cfg = replace(load_config(config, [f"data={data}"]), weights=None)
    shards = TokenShards(Path(data))
    mc = model_config(cfg, shards.vocab_size)
    hf = LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.dim,
        intermediate_size=mc.ffn_hidden_dim,
        num_hidden_layers=mc.n_layers,
        num_attention_heads=mc.n_heads,
        num_key_value_heads=mc.n_kv_heads,
        max_position_embeddings=mc.context_length,
        rms_norm_eps=mc.norm_eps,
        rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    seq, micro = cfg.seq_len, cfg.micro_batch_size
    accum = cfg.batch_tokens // (seq * micro)
    tokens = np.concatenate([np.asarray(s.tokens[: 1 << 20]) for s in shards.sources.values()])
    rng = np.random.default_rng(0)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    speeds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(accum):
            starts = rng.integers(0, len(tokens) - seq - 1, micro)
            batch = torch.from_numpy(
                np.stack([tokens[s : s + seq + 1] for s in starts]).astype(np.int64)
            )
            with autocast:
                loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:]).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(cfg.batch_tokens / (time.perf_counter() - t0))
    return speeds


def worker_peak(threads: int, precision: str) -> float:
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------------------- driver
def in_process(kind: str, *args: object):
    """Run one of this script's workers in a fresh interpreter (``_common.in_fresh_process``)."""
    return in_fresh_process("bench_train", kind, *args)


def small_data(folder: Path) -> Path:
    from llamalab.data import parse_sources, prepare
    from llamalab.tokenizer.trainer import train_tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    text = folder / "text"
    text.mkdir()
    for f in sorted(lib.glob("*.py"))[:120]:
        (text / f"{f.stem}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    train_tokenizer([text], 4000, folder / "tok", threads=2)
    prepare(parse_sources([f"code={text}"]), folder / "tok", folder / "data", progress=False)
    return folder / "data"


def model_flops_per_token(config: str, data: str) -> tuple[float, int]:
    import torch

    from llamalab.data.shards import TokenShards
    from llamalab.model import Transformer
    from llamalab.train.config import load_config, model_config

    cfg = load_config(config, [f"data={data}"])
    mc = model_config(cfg, TokenShards(Path(data)).vocab_size)
    with torch.device("meta"):
        model = Transformer(mc)
    params = sum(p.numel() for p in model.parameters())
    # The input embedding is a lookup, not a matmul: its rows count no FLOPs (torchtitan's
    # rule), unless the output projection shares them.
    matmul_params = params if mc.tie_embeddings else params - model.tok_embeddings.weight.numel()
    return 6 * matmul_params + 12 * mc.n_layers * mc.dim * cfg.seq_len, params


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.0f} [{min(values):.0f}, {max(values):.0f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "train" / "small.toml"))
    parser.add_argument("--data", default=None, help="a `llamalab data prepare` folder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument(
        "--compile",
        action="store_true",
        help="llamalab with compile = true (its first steps"
        " compile: raise --warmup to leave them out)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = args.data or str(small_data(Path(tmp)))
        flops, params = model_flops_per_token(args.config, data)
        print(f"model: {params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP per token")
        for threads in args.threads:
            for precision in args.precision:
                peak = in_process("peak", threads, precision)
                ours: list[float] = []
                theirs: list[float] = []
                for run in range(args.runs):
                    out = str(Path(tmp) / f"run-{threads}-{precision}-{run}")
                    got = in_process(
                        "llamalab", args.config, data, out, args.steps, threads, precision,
                        args.compile,
                    )  # fmt: skip
                    ours.append(statistics.median(got[args.warmup :]))
                    got = in_process(
                        "transformers", args.config, data, args.steps, threads, precision
                    )
                    theirs.append(statistics.median(got[args.warmup :]))
                ratio = statistics.median(ours) / statistics.median(theirs)
                print(
                    f"{threads} thread(s), {precision}: llamalab {summary(ours)} tok/s "
                    f"(MFU {statistics.median(ours) * flops / peak:.1%}), transformers "
                    f"{summary(theirs)} tok/s (MFU {statistics.median(theirs) * flops / peak:.1%})"
                    f"; ratio {ratio:.2f}; matmul peak {peak / 1e9:.0f} GFLOP/s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
