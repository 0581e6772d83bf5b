"""Peak memory and wall time of ``llamalab.load_model(path, dtype=torch.float32)``.

What is measured
----------------
For each checkpoint ("case") a fresh Python subprocess

1. imports torch, numpy, gguf, safetensors and every llamalab module that loading uses,
   then reads ``VmRSS`` from ``/proc/self/status``: the **baseline** (what the process
   costs before it touches a checkpoint);
2. resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) so that the
   peak below belongs to the load alone, not to the imports;
3. times ``load_model(path, dtype=torch.float32)`` (the **load time**), and reads
   ``VmHWM``: the **peak RSS** while loading. A background thread also samples
   ``RssAnon``/``RssFile`` every few milliseconds, to tell how much of the peak was
   anonymous memory (tensors we allocated) and how much was file pages mapped into the
   process (``mmap``'d checkpoints count toward RSS once their pages are touched);
4. runs one tiny forward pass (8 tokens) to prove that the loaded model works, reads
   ``VmHWM`` again (the peak through the first forward: checkpoints that are memory-mapped
   rather than copied, Meta ``.pth`` and safetensors, are only paged in when first used, so
   their load peak alone understates them), and prints one JSON line.

The **weights** size is 4 bytes (float32, the target dtype) × the model's parameters
(a tied embedding counted once). The bar is *peak RSS ≤ 1.3 × weights*; the table shows
it both for the whole process (``peak / W``, which includes the ~0.25 GB that importing
torch costs, so small models cannot meet it) and for the load alone (``(peak − base) / W``).

Cases
-----
* ``smollm2-q4_1``: the embedded SmolLM2-135M GGUF (Q4_1, embedding in Q8_0), dequantized.
* a randomly initialised ~0.85B-parameter LLaMA (dim 2048, 16 layers, GQA 16/4 heads,
  FFN 5632, vocab 32000), written once under ``--workdir`` as a Meta folder by hand
  (``meta-1shard-f32``, the conversion source) and converted with
  ``llamalab.checkpoint.convert.convert`` to ``hf-f32``, ``meta-2shard-f32``,
  ``gguf-f32``, ``gguf-f16`` and ``gguf-q8_0``. Existing files are reused; ``--cleanup``
  deletes them at the end. They need about 16 GB of disk.

Cases run round-robin (every case once, then again, ``--repeats`` times) so that a
noisy neighbour on this shared 2-core machine spreads over all of them. Before each run
the parent reads the case's files once, so that load times are page-cache-warm and
comparable (``--no-warm-cache`` to skip). The table gives the median load time with its
min and max, and the largest peak seen over the repeats.

Run::

    .venv/bin/python bench/bench_load.py                  # all cases, 3 repeats
    .venv/bin/python bench/bench_load.py --cases smollm2-q4_1 --repeats 1
    .venv/bin/python bench/bench_load.py --json /tmp/bench_load.json --cleanup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

# Set before torch is imported (in this process's children): with another busy process on
# this 2-core machine, OpenMP spin-waiting makes torch many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BAR = 1.3  # peak RSS at most this many times the weights in the target dtype
DEFAULT_WORKDIR = Path("/tmp/llamalab-bench-load")
RESULT_MARKER = "BENCH_LOAD_RESULT "
GiB = 1 << 30
MiB = 1 << 20

# The ~1B-parameter model of the random cases; keep in sync with prepare().
BIG_CONFIG = {
    "dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "vocab_size": 32000,
    "ffn_hidden_dim": 5632, "context_length": 2048,
}  # fmt: skip
BIG_PARAMS = (
    2 * 32000 * 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048) + 2048
)


@dataclass(frozen=True)
class Case:
    name: str
    artifact: str | None  # file or folder name under the workdir; None: the default model
    stored: str  # what the file holds, for the table
    to: str | None = None  # convert() arguments that produce it from the Meta source
    dtype: str | None = None
    shards: int = 1


SOURCE = "meta-1shard-f32"  # written by hand; every other random case is converted from it
CASES = [
    Case("smollm2-q4_1", None, "Q4_1+Q8_0"),
    Case("meta-1shard-f32", SOURCE, "F32 .pth"),
    Case("meta-2shard-f32", "meta-2shard-f32", "F32 .pth x2", "meta", "f32", 2),
    Case("hf-f32", "hf-f32", "F32 safetensors", "hf", "f32"),
    Case("gguf-f32", "gguf-f32.gguf", "F32", "gguf", "f32"),
    Case("gguf-f16", "gguf-f16.gguf", "F16", "gguf", "f16"),
    Case("gguf-q8_0", "gguf-q8_0.gguf", "Q8_0", "gguf", "q8_0"),
]
CASES_BY_NAME = {c.name: c for c in CASES}
# Bytes per parameter on disk, to check free space before writing anything.
DISK_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


# ---------------------------------------------------------------------------
# Child process: one load, measured.
# ---------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples RSS in a thread and keeps the anon/file split of the largest sample.

    VmHWM is the exact peak; this only explains it (the sampler can miss a short spike).
    """

    def __init__(self, interval_s: float = 0.004) -> None:
        import threading

        self.interval_s = interval_s
        self.peak: dict[str, int] = read_status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            status = read_status()
            if status["VmRSS"] > self.peak["VmRSS"]:
                self.peak = status

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = read_status()
        if status["VmRSS"] > self.peak["VmRSS"]:
            self.peak = status


def child(path: str) -> None:
    # Import everything that loading can use, so that the baseline includes it.
    t0 = time.perf_counter()
    import gguf  # noqa: F401
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    import llamalab
    import llamalab.checkpoint.gguf_format
    import llamalab.checkpoint.hf_format
    import llamalab.checkpoint.load
    import llamalab.checkpoint.meta_format
    import llamalab.gguf.dequant
    import llamalab.model

    import_s = time.perf_counter() - t0
    baseline = read_status()
    peak_reset = reset_peak()

    with RssSampler() as sampler:
        t0 = time.perf_counter()
        model = llamalab.load_model(path, dtype=torch.float32)
        load_s = time.perf_counter() - t0
    after_load = read_status()  # VmHWM here is the peak of the load

    params = list(model.parameters())  # shared (tied) parameters are listed once
    n_params = sum(p.numel() for p in params)
    weights_bytes = sum(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})

    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 8))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(tokens)
    forward_s = time.perf_counter() - t0
    after_forward = read_status()  # memory-mapped weights are paged in by their first use
    if logits.shape != (1, 8, model.config.vocab_size) or not bool(torch.isfinite(logits).all()):
        raise SystemExit(
            f"forward pass failed: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}"
        )

    result = {
        "import_s": import_s,
        "load_s": load_s,
        "forward_s": forward_s,
        "baseline_rss": baseline["VmRSS"],
        "baseline": {k: baseline[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "peak_rss": after_load["VmHWM"],
        "peak_reset": peak_reset,
        "sampled_peak": {k: sampler.peak[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "after_load": {k: after_load[k] for k in ("VmRSS", "RssAnon", "RssFile")},
        "after_forward_rss": after_forward["VmRSS"],
        "peak_through_forward": after_forward["VmHWM"],
        "n_params": n_params,
        "weights_bytes": weights_bytes,
        "param_dtypes": dtypes,
        "torch_threads": torch.get_num_threads(),
    }
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# Preparing the random-model checkpoints (in a subprocess, so the parent stays small).
# ---------------------------------------------------------------------------


def prepare(workdir: Path, names: list[str]) -> None:
    """Write the source Meta folder (if missing), then convert it to each requested case."""
    import torch

    from llamalab.checkpoint.convert import convert
    from llamalab.checkpoint.meta_format import params_for
    from llamalab.checkpoint.names import canonical_names
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / SOURCE
    if not source.exists():
        t0 = time.perf_counter()
        config = ModelConfig(**BIG_CONFIG)
        torch.manual_seed(0)
        model = Transformer(config)
        model.reset_parameters()
        state = model.state_dict()
        # Untied output (tie_embeddings=False) so output.weight is its own tensor; the rotary
        # table is a non-persistent buffer, so it is not in the state dict: exactly the
        # canonical names, as in a Meta checkpoint.
        expected = canonical_names(config.n_layers, config.tie_embeddings)
        if sorted(state) != sorted(expected):
            raise SystemExit(f"unexpected state_dict keys: {sorted(set(state) ^ set(expected))}")
        partial = workdir / f".{SOURCE}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        (partial / "params.json").write_text(json.dumps(params_for(config), indent=2) + "\n")
        torch.save(state, partial / "consolidated.00.pth")
        partial.rename(source)
        n = sum(p.numel() for p in model.parameters())
        del model, state
        print(
            f"  wrote {source} ({n / 1e9:.3f}B parameters) in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    for name in names:
        case = CASES_BY_NAME[name]
        if case.to is None or (workdir / case.artifact).exists():
            continue
        t0 = time.perf_counter()
        convert(source, workdir / case.artifact, to=case.to, dtype=case.dtype, shards=case.shards)
        print(f"  converted {name} in {time.perf_counter() - t0:.0f} s", flush=True)


def disk_needed(workdir: Path, cases: list[Case]) -> int:
    """Bytes still to be written for ``cases`` (0 for those already there)."""
    todo = [c for c in cases if c.artifact is not None and not (workdir / c.artifact).exists()]
    if todo and not (workdir / SOURCE).exists():
        todo.append(CASES_BY_NAME[SOURCE])
    return int(sum(BIG_PARAMS * DISK_BYTES_PER_PARAM[c.dtype or "f32"] for c in set(todo)))


# ---------------------------------------------------------------------------
# Parent: schedule, run, summarise.
# ---------------------------------------------------------------------------


def case_path(case: Case, workdir: Path) -> Path:
    if case.artifact is not None:
        return workdir / case.artifact
    # A stdlib-only module: the parent never imports torch, so it stays small.
    from llamalab.default_model import default_model_path

    return default_model_path()


def warm_page_cache(path: Path) -> None:
    """Read every file of a checkpoint once, so the load does not wait for the disk."""
    buf = bytearray(16 * MiB)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_child(path: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line.removeprefix(RESULT_MARKER))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def summarise(name: str, case: Case, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    summary: dict = {"case": name, "stored": case.stored, "runs": runs}
    if not ok:
        summary["error"] = runs[-1]["error"] if runs else "not run"
        return summary
    weights = ok[0]["weights_bytes"]
    worst = max(ok, key=lambda r: r["peak_rss"])
    load = [r["load_s"] for r in ok]
    summary |= {
        "n_params": ok[0]["n_params"],
        "weights_bytes": weights,
        "load_s_median": statistics.median(load),
        "load_s_min": min(load),
        "load_s_max": max(load),
        "baseline_rss": worst["baseline_rss"],
        "peak_rss": worst["peak_rss"],
        "peak_minus_baseline": worst["peak_rss"] - worst["baseline_rss"],
        "peak_over_weights": worst["peak_rss"] / weights,
        "load_peak_over_weights": (worst["peak_rss"] - worst["baseline_rss"]) / weights,
        # Growth over the baseline (which holds torch's shared libraries as file pages).
        "anon_growth_at_peak": worst["sampled_peak"]["RssAnon"] - worst["baseline"]["RssAnon"],
        "file_growth_at_peak": worst["sampled_peak"]["RssFile"] - worst["baseline"]["RssFile"],
        "rss_growth_after_load": worst["after_load"]["VmRSS"] - worst["baseline"]["VmRSS"],
        "fwd_peak_over_weights": max(r["peak_through_forward"] - r["baseline_rss"] for r in ok)
        / weights,
        "failed_runs": len(runs) - len(ok),
    }
    summary["meets_bar_total"] = summary["peak_over_weights"] <= BAR
    summary["meets_bar_load"] = summary["load_peak_over_weights"] <= BAR
    return summary


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def print_table(summaries: list[dict]) -> None:
    head = (
        f"{'case':<16} {'stored':<16} {'params':>7} {'W GB':>6} {'load s (min-max)':>20} "
        f"{'base GB':>7} {'peak GB':>7} {'pk-base':>7} {'peak/W':>9} {'(pk-base)/W':>12} "
        f"{'anon+@pk':>8} {'file+@pk':>8} {'kept':>6} {'+fwd/W':>6}"
    )
    print(head)
    print("-" * len(head))
    for s in summaries:
        if "error" in s:
            print(f"{s['case']:<16} {s['stored']:<16} ERROR: {s['error']}")
            continue
        load = f"{s['load_s_median']:.2f} ({s['load_s_min']:.2f}-{s['load_s_max']:.2f})"
        print(
            f"{s['case']:<16} {s['stored']:<16} {s['n_params'] / 1e6:>6.0f}M {gb(s['weights_bytes']):>6} "
            f"{load:>20} {gb(s['baseline_rss']):>7} {gb(s['peak_rss']):>7} "
            f"{gb(s['peak_minus_baseline']):>7} {s['peak_over_weights']:>8.3f}{' ' if s['meets_bar_total'] else '!'} "
            f"{s['load_peak_over_weights']:>11.3f}{' ' if s['meets_bar_load'] else '!'} "
            f"{gb(s['anon_growth_at_peak']):>8} {gb(s['file_growth_at_peak']):>8} {gb(s['rss_growth_after_load']):>6} "
            f"{s['fwd_peak_over_weights']:>6.2f}"
        )
    print(
        f"\nW = parameters x 4 bytes (float32). '!' marks a ratio above the bar ({BAR}x). "
        "peak = VmHWM during load_model (max over repeats);\n"
        "base = VmRSS after imports; anon+/file+@pk = growth of RssAnon (allocated memory) and RssFile\n"
        "(mmap'd checkpoint pages) over the baseline at the largest sampled RSS; "
        "kept = RSS growth still held once load_model returned;\n"
        "+fwd/W = (peak through the first forward pass - base) / W: mmap'd weights (Meta, HF) are only\n"
        "paged in when first used, so their load peak alone understates them. Sizes in GB (1e9 bytes)."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3, help="loads per case, round-robin (default 3)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"scratch folder for the random-model checkpoints (default {DEFAULT_WORKDIR})",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES_BY_NAME),
        help="comma-separated subset of: " + ", ".join(CASES_BY_NAME),
    )
    p.add_argument(
        "--cleanup", action="store_true", help="delete the random-model checkpoints afterwards"
    )
    p.add_argument("--json", type=Path, help="also write every run and the summary here")
    p.add_argument(
        "--no-warm-cache", action="store_true", help="do not read each checkpoint before loading it"
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per load subprocess")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_prepare", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cleanup(workdir: Path) -> None:
    for case in CASES:
        if case.artifact is None:
            continue
        path = workdir / case.artifact
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    try:
        workdir.rmdir()  # only if nothing else is left in it
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        child(args._child)
        return 0
    if args._prepare:
        prepare(args.workdir, args._prepare.split(","))
        return 0

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES_BY_NAME]
    if unknown:
        print(
            f"unknown case(s): {', '.join(unknown)}; choose from {', '.join(CASES_BY_NAME)}",
            file=sys.stderr,
        )
        return 2
    cases = [CASES_BY_NAME[n] for n in names]

    random_cases = [c for c in cases if c.artifact is not None]
    if random_cases:
        needed = disk_needed(args.workdir, random_cases)
        if needed:
            args.workdir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(args.workdir).free
            if free < needed + 2 * GiB:
                print(
                    f"{args.workdir}: {gb(free)} GB free, the checkpoints need about {gb(needed)} GB",
                    file=sys.stderr,
                )
                return 1
            print(
                f"Writing the random-model checkpoints under {args.workdir} (about {gb(needed)} GB) ...",
                flush=True,
            )
            prep = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--workdir",
                    str(args.workdir),
                    "--_prepare",
                    ",".join(c.name for c in random_cases),
                ],
                check=False,
            )
            if prep.returncode:
                print("preparing the checkpoints failed", file=sys.stderr)
                return 1

    paths = {c.name: case_path(c, args.workdir) for c in cases}
    runs: dict[str, list[dict]] = {c.name: [] for c in cases}
    print(
        f"{len(cases)} case(s) x {args.repeats} repeat(s), round-robin; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for rep in range(args.repeats):
        for case in cases:
            if not args.no_warm_cache:
                warm_page_cache(paths[case.name])
            try:
                result = run_child(paths[case.name], args.timeout)
            except subprocess.TimeoutExpired:
                result = {"error": f"timed out after {args.timeout:.0f} s"}
            result["repeat"] = rep
            runs[case.name].append(result)
            if "error" in result:
                print(
                    f"  [{rep + 1}/{args.repeats}] {case.name:<16} ERROR {result['error']}",
                    flush=True,
                )
            else:
                print(
                    f"  [{rep + 1}/{args.repeats}] {case.name:<16} load {result['load_s']:6.2f} s  "
                    f"peak {gb(result['peak_rss'])} GB  (base {gb(result['baseline_rss'])})",
                    flush=True,
                )

    summaries = [summarise(c.name, c, runs[c.name]) for c in cases]
    print()
    print_table(summaries)
    if args.json:
        report = {
            "bar": BAR,
            "repeats": args.repeats,
            "warm_cache": not args.no_warm_cache,
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "paths": {k: str(v) for k, v in paths.items()},
            "cases": summaries,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.cleanup:
        cleanup(args.workdir)
        print(f"removed the random-model checkpoints under {args.workdir}")
    return 1 if any("error" in s for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
