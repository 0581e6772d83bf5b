"""Per-rank peak memory of tensor parallelism: N gloo ranks against one process.

What is measured
----------------
The same checkpoint is loaded and run twice, each time in fresh processes:

1. **one process**: ``load_model(path, dtype)``, the whole model;
2. **N ranks** under ``torchrun`` (gloo, CPUs): ``parallel.loading.load_sharded``, each
   rank reading only its slices.

Each process reads ``VmRSS`` after its imports (the **baseline**: torch alone costs a few
hundred MB), loads the model (timed), runs a prefill of ``--prompt`` tokens and
``--decode`` decode steps (timed: the ranks' steps include their all-reduces), and reads
``VmHWM``, the kernel's **peak RSS** of the whole process. The table gives each rank's
peak against the single process's, the figure the target is set on (at most 0.6x with
2 ranks), and the same with the baselines taken off.

The runs go one after the other (never the single process beside the ranks): the
machine's memory must hold the larger of the two, not their sum. Decode timings on a
shared machine with fewer cores than ranks × threads are indicative only.

Run::

    .venv/bin/python bench/bench_tp.py                       # the 0.9B random model, 2 ranks
    .venv/bin/python bench/bench_tp.py --ranks 4 --dtype bfloat16 --json /tmp/tp.json
    .venv/bin/python bench/bench_tp.py --packed --model artifacts/bench-models/random-0.9b-Q4_0.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "artifacts" / "bench-models" / "random-0.9b-F16.gguf"


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _bytes_held(model) -> int:
    """Bytes of the model's weights: its parameters (a DTensor's local shard) and the
    tensors packed layers keep as plain attributes (each storage counted once)."""
    import torch

    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        t = t.to_local() if hasattr(t, "to_local") else t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.nbytes

    for p in model.parameters():
        add(p)
    for module in model.modules():
        for value in vars(module).values():
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, torch.Tensor) and not isinstance(part, torch.nn.Parameter):
                    add(part)
    return total


def worker(args: argparse.Namespace) -> None:
    """One measured process: the single one, or one rank (``$WORLD_SIZE`` set)."""
    import torch

    from llamalab.checkpoint.load import load_model
    from llamalab.kv_cache import cache_view
    from llamalab.parallel.loading import load_sharded

    dtype = getattr(torch, args.dtype)
    ranked = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ranked:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if ranked:
        model = load_sharded(args.model, mesh, dtype=dtype, packed=args.packed)
    else:
        model = load_model(args.model, dtype=dtype, packed=args.packed)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    tokens = torch.arange(args.prompt).remainder(vocab).unsqueeze(0)
    with torch.inference_mode():
        model.setup_cache(1, args.prompt + args.decode)
        model(tokens, cache_view(torch.arange(args.prompt), last_only=True))
        t0 = time.perf_counter()
        for step in range(args.decode):
            pos = args.prompt + step
            model(tokens[:, :1], cache_view(torch.tensor([pos])))
        decode_s = time.perf_counter() - t0
    held = _bytes_held(model)
    result = {
        "rank": int(os.environ.get("RANK", "0")),
        "baseline": base,
        "peak": _status("VmHWM"),
        "weights_held": held,
        "load_s": load_s,
        "decode_ms_per_token": 1000 * decode_s / max(1, args.decode),
    }
    name = f"rank{result['rank']}.json" if ranked else "single.json"
    (Path(args.out) / name).write_text(json.dumps(result))
    if ranked:
        dist.barrier()
        dist.destroy_process_group()


def _launch(args: argparse.Namespace, out: Path, ranks: int) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    inner = [
        __file__, "--worker", "--model", str(args.model), "--dtype", args.dtype,
        "--prompt", str(args.prompt), "--decode", str(args.decode), "--out", str(out),
        *(["--packed"] if args.packed else []),
    ]  # fmt: skip
    if ranks == 1:
        env.pop("WORLD_SIZE", None)
        cmd = [sys.executable, *inner]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", *inner,
        ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--packed", action="store_true", help="keep the linear layers packed (CPU; GGUF blocks)"
    )
    p.add_argument("--prompt", type=int, default=16, help="prefill tokens")
    p.add_argument("--decode", type=int, default=8, help="decode steps timed")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _launch(args, out, 1)
        _launch(args, out, args.ranks)
        single = json.loads((out / "single.json").read_text())
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    gb = 1e9
    form = "packed" if args.packed else args.dtype
    print(f"{args.model.name}, {form}, {args.ranks} gloo ranks against one process")
    print(f"{'':10} {'peak GB':>8} {'x one':>6} {'base GB':>8} {'peak-base':>9} {'x one':>6} "
          f"{'weights GB':>10} {'load s':>7} {'ms/token':>9}")  # fmt: skip
    for label, r in [("one", single)] + [(f"rank {x['rank']}", x) for x in ranks]:
        net = (r["peak"] - r["baseline"]) / (single["peak"] - single["baseline"])
        print(
            f"{label:10} {r['peak'] / gb:8.2f} {r['peak'] / single['peak']:6.2f} "
            f"{r['baseline'] / gb:8.2f} {(r['peak'] - r['baseline']) / gb:9.2f} {net:6.2f} "
            f"{r['weights_held'] / gb:10.2f} {r['load_s']:7.1f} {r['decode_ms_per_token']:9.1f}"
        )
    worst = max(r["peak"] for r in ranks) / single["peak"]
    print(f"largest rank peak / single-process peak: {worst:.2f} (target <= 0.6 at 2 ranks)")
    if args.json is not None:
        args.json.write_text(json.dumps({"single": single, "ranks": ranks, "ratio": worst}))


if __name__ == "__main__":
    main()
