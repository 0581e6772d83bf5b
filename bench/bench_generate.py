"""Generation speed on SmolLM2-135M: llamalab beside llama.cpp and transformers, interleaved.

For each engine, in a fresh process each time (so peak memory is its own):
- prefill: a 512-token prompt, tokens/s;
- time to first token: from handing over the prompt to having the first new token;
- decode: 128 further tokens one at a time (greedy, EOS ignored), tokens/s;
- peak resident memory of the process (VmHWM).

Engines run round-robin, ``--repeats`` times each, and the table reports medians with
min/max. llama.cpp (llama-cpp-python, which compiles for ~20 minutes) is optional: it is
skipped with a note when not installed. All engines use the same thread count.

    python bench/bench_generate.py --repeats 5 [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
# llamalab: as `serve` runs it (on CPUs with AVX-512 VNNI the native step, elsewhere the
# compiled decode step, compiled before the clock starts); llamalab-eager: as `generate`
# runs it by default (the native step too where there is one: then the two are the same).
ENGINES = ("llamalab", "llamalab-eager", "llamalab-float32", "llama.cpp", "transformers-float32")


def prompt_ids() -> list[int]:
    """512 real-text tokens (llamalab's tokenizer equals llama.cpp's on this model)."""
    import llamalab
    from llamalab.default_model import default_model_path

    text = (
        "The history of the llama begins in the high Andes, where wild guanacos were domesticated "
        "thousands of years ago. Herders valued them for wool, meat and as pack animals that could "
        "carry loads across mountain passes where no cart could go. "
    )
    ids = llamalab.load_tokenizer(default_model_path()).encode(text * 40, add_bos=False)
    return ids[:PROMPT_TOKENS]


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_llamalab(ids: list[int], dtype: str, model_path: str, compile: bool) -> dict:
    from llamalab.generation import GREEDY, Engine, Request
    from llamalab.runtime import load_runtime

    model, tokenizer = load_runtime(model_path, dtype, progress=False, compile=compile)
    engine = Engine(model, tokenizer, max_seq_len=1024)
    list(engine.generate(Request(ids[:16], max_tokens=4, sampling=GREEDY)))  # warm-up
    start = time.perf_counter()
    seq, _ = engine.submit(
        # Plain decoding, one token a step, as llama.cpp's loop below: prompt lookup
        # (on by default) is measured by bench_speculative.py.
        Request(ids, max_tokens=DECODE_TOKENS + 1, sampling=GREEDY, ignore_eos=True, lookup=None)
    )
    ttft = time.perf_counter() - start
    t0 = time.perf_counter()
    while not seq.finished:
        engine.step()
    decode_s = time.perf_counter() - t0
    return {
        "prefill_tps": len(ids) / seq.timing.prefill_s,
        "ttft_s": ttft,
        "decode_tps": DECODE_TOKENS / decode_s,
    }


def run_llamacpp(ids: list[int], threads: int, model_path: str) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=model_path, n_ctx=1024, n_batch=512, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the context's logits for the last evaluated token
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    llm.eval(ids[:16])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    token = int(np.argmax(last_logits()))
    ttft = time.perf_counter() - start
    prefill_s = ttft
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
    decode_s = time.perf_counter() - t0
    return {
        "prefill_tps": len(ids) / prefill_s,
        "ttft_s": ttft,
        "decode_tps": DECODE_TOKENS / decode_s,
    }


def run_transformers(ids: list[int], model_path: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    path = Path(model_path)
    model = LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        model(torch.tensor([ids[:16]]))  # warm-up
        start = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        ttft = time.perf_counter() - start
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[0, -1].argmax().view(1, 1)
        decode_s = time.perf_counter() - t0
    return {"prefill_tps": len(ids) / ttft, "ttft_s": ttft, "decode_tps": DECODE_TOKENS / decode_s}


def child(engine: str, threads: int, ids_file: str, model_path: str) -> None:
    if engine != "llama.cpp":  # llama.cpp gets its threads as an argument, and no torch
        import torch

        torch.set_num_threads(threads)
    # The prompt was tokenized by the parent: a peer's peak RSS must not include our tokenizer.
    with open(ids_file) as f:
        ids = json.load(f)
    if engine == "llamalab":
        result = run_llamalab(ids, "auto", model_path, compile=True)
    elif engine == "llamalab-eager":
        result = run_llamalab(ids, "auto", model_path, compile=False)
    elif engine == "llamalab-float32":
        result = run_llamalab(ids, "float32", model_path, compile=False)
    elif engine == "llama.cpp":
        result = run_llamacpp(ids, threads, model_path)
    else:
        result = run_transformers(ids, model_path)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def resolve_model(name: str | None) -> str:
    if name is None:
        from llamalab.default_model import default_model_path

        return str(default_model_path())
    if name.startswith("random-0.9b-"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from random_model import ensure

        return str(ensure()[name.removeprefix("random-0.9b-")])
    return name


def available(engine: str) -> bool:
    if engine != "llama.cpp":
        return True
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}–{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument(
        "--model",
        default=None,
        help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1); bench/random_model.py "
        "makes the 0.9B files, and 'random-0.9b-Q4_0' or 'random-0.9b-Q4_K_M' names them",
    )
    parser.add_argument(
        "--llamacpp-python",
        default=sys.executable,
        help="the Python that runs llama.cpp: another environment's, e.g. one whose "
        "llama-cpp-python was built for AVX2 only (-DGGML_AVX512=OFF)",
    )
    parser.add_argument(
        "--isa", default=None, help="run llamalab with LLAMALAB_ISA set to this (avx2, ...)"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    if args.child:
        child(args.child, args.threads, args.ids_file, model_path)
        return

    engines = [e for e in args.engines.split(",") if e]
    missing = [
        e for e in engines if not (e == "llama.cpp" and args.llamacpp_python != sys.executable)
    ]
    missing = [e for e in missing if not available(e)]
    for e in missing:
        print(
            f"note: {e} is not installed (pip install llama-cpp-python; it compiles for ~20 min); skipped"
        )
    engines = [e for e in engines if e not in missing]
    # Every engine runs as its users run it: with no OpenMP or llamalab variable of ours.
    # (Under OMP_WAIT_POLICY=PASSIVE, OpenMP threads sleep between operations, which cuts
    # ggml's decode to about a third and torch's int4 decode by about 40%.)
    ours = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LLAMALAB_COMPILE", "LLAMALAB_INT4")
    plain = {k: v for k, v in os.environ.items() if k not in ours}
    envs = {e: plain for e in engines}
    if args.isa:  # llamalab's own variable, for llamalab's runs only
        envs.update({e: {**plain, "LLAMALAB_ISA": args.isa} for e in engines if e != "llama.cpp"})
    results: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompt_ids(), f)
    ids_file = f.name
    for r in range(args.repeats):
        for engine in engines:  # round-robin: every engine sees the same machine noise
            out = subprocess.run(
                [args.llamacpp_python if engine == "llama.cpp" else sys.executable,
                 __file__, "--child", engine, "--threads", str(args.threads),
                 "--ids-file", ids_file, "--model", model_path],
                capture_output=True, text=True, env=envs[engine], check=False,
            )  # fmt: skip
            if out.returncode != 0:
                print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1}/{args.repeats} {engine}: {results[engine][-1]}", file=sys.stderr)
    os.unlink(ids_file)

    print(f"\n{Path(model_path).name}, {args.threads} threads, {PROMPT_TOKENS}-token prompt, "
          f"{DECODE_TOKENS} decode tokens; median [min–max] of {args.repeats} runs\n")  # fmt: skip
    header = (
        f"{'engine':<22}{'prefill tok/s':>26}{'decode tok/s':>26}{'TTFT s':>26}{'peak RSS MB':>26}"
    )
    print(header)
    for engine, runs in results.items():
        if not runs:
            continue
        cols = [summary([r[k] for r in runs]) for k in ("prefill_tps", "decode_tps")]
        ttft = [r["ttft_s"] for r in runs]
        rss = [r["peak_rss_mb"] for r in runs]
        ttft_s = f"{statistics.median(ttft):8.3f} [{min(ttft):.3f}–{max(ttft):.3f}]"
        print(f"{engine:<22}{cols[0]:>26}{cols[1]:>26}{ttft_s:>26}{summary(rss):>26}")
    base = results.get("llamalab")
    if base:
        ours = statistics.median(r["decode_tps"] for r in base)
        for peer in ("llama.cpp", "transformers-float32"):
            if results.get(peer):
                theirs = statistics.median(r["decode_tps"] for r in results[peer])
                print(f"decode speed, llamalab / {peer}: {ours / theirs:.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
