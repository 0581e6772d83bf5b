"""How far each packed path's next-token distribution is from the float32 model's, beside llama.cpp.

The reference is llamalab's float32 model of the same GGUF file (every weight
dequantized bit-exactly). Over ``--tokens`` tokens of held-out English text, cut into
windows of ``--window`` tokens, for every position:

- KL(reference || path) of the next-token distributions, averaged;
- the perplexity of the text under the path;
- how often the path's top token is the reference's.

Paths: llamalab ``auto`` as prefill runs it (whole windows) and as decode runs it (one
token at a time through the KV cache: the native step), on every instruction-set build of
llamalab's kernels this CPU runs (``LLAMALAB_ISA=avx512|avxvnni|avx2``); the kernels as
``llamalab eval`` runs them (two int8 passes over activations, prefill); torch's int4
kernel (``LLAMALAB_ISA=torch``, where the CPU has AVX-512 BF16) and its fp16 one
(``LLAMALAB_ISA=torch LLAMALAB_INT4=0``); and llama.cpp (llama-cpp-python,
``logits_all=True``, its defaults otherwise: f16 KV cache, 8-bit activations for 4-bit
matmuls).

    python bench/bench_quality.py [--model FILE] [--text FILE_OR_DIR] [--tokens 4096]

The default text is the ``books`` source of the Debian mixture (``make data-debian``),
whose texts no model here was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# The books of the Debian text mixture, as `make data-debian` writes them in the checkout.
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "debian-text" / "text" / "books"


def read_text(path: Path, limit: int = 400_000) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts, size = [], 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= limit:
            break
    return "\n".join(parts)[:limit]


def windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]


def llamalab_logits(model_path: str, chunks: list[list[int]], how: str):
    """Logits (positions, vocab) over every window, float32."""
    import torch

    from llamalab.kv_cache import cache_view
    from llamalab.runtime import load_runtime

    dtype = "float32" if how == "float32" else "auto"
    model, _ = load_runtime(model_path, dtype, progress=False, compile=how == "decode")
    if how == "eval":
        from llamalab.kernels.native import set_activation_passes

        set_activation_passes(2)
    out = []
    with torch.inference_mode():
        for ids in chunks:
            if how != "decode":
                out.append(model(torch.tensor([ids]))[0].float())
                continue
            model.setup_cache(1, len(ids))
            rows = []
            for pos, token in enumerate(ids):
                view = cache_view(torch.tensor([pos]), kv_len=pos + 1)
                rows.append(model(torch.tensor([[token]]), cache=view)[0, -1].float())
            out.append(torch.stack(rows))
    return torch.cat(out)


def llamacpp_logits(model_path: str, chunks: list[list[int]], vocab: int):
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(
        model_path=model_path, n_ctx=len(chunks[0]), n_batch=512, logits_all=True, verbose=False
    )
    out = []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(np.array(llm.scores[: len(ids), :vocab], dtype=np.float32)))
    return torch.cat(out)


def child(args) -> None:
    """Compute one path's logits and save them (each path in its own process)."""
    import torch

    chunks = json.loads(Path(args.ids_file).read_text())
    if args.child == "llama.cpp":
        vocab = int(os.environ["BENCH_VOCAB"])
        logits = llamacpp_logits(args.model, chunks, vocab)
    else:
        logits = llamalab_logits(args.model, chunks, args.child)
    torch.save(logits, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)"
    )
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from llamalab.default_model import default_model_path

        args.model = str(default_model_path())
    if args.child:
        child(args)
        return

    import tempfile

    import torch

    import llamalab

    tokenizer = llamalab.load_tokenizer(args.model)
    ids = tokenizer.encode(read_text(args.text), add_bos=False)[: args.tokens]
    chunks = windows(ids, args.window)
    if not chunks:
        raise SystemExit(f"{args.text}: fewer than {args.window} tokens of text")
    n = sum(len(c) for c in chunks)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    (tmp / "ids.json").write_text(json.dumps(chunks))
    from llamalab.kernels.cpu import ISAS, has_native_bf16, isa_runs

    paths = {"float32": {}}
    for isa in (i for i in ISAS if isa_runs(i)):
        for how in ("prefill", "decode"):
            paths[f"llamalab {isa} ({how})"] = {"how": how, "env": {"LLAMALAB_ISA": isa}}
    paths["llamalab eval (2 passes, prefill)"] = {"how": "eval"}
    if has_native_bf16():
        paths["llamalab torch int4 (decode)"] = {"how": "decode", "env": {"LLAMALAB_ISA": "torch"}}
    paths["llamalab torch fp16 (prefill)"] = {
        "how": "prefill",
        "env": {"LLAMALAB_ISA": "torch", "LLAMALAB_INT4": "0"},
    }
    paths["llama.cpp"] = {"how": "llama.cpp"}
    ours = ("OMP_WAIT_POLICY", "LLAMALAB_INT4", "LLAMALAB_VNNI", "LLAMALAB_ISA")
    plain = {k: v for k, v in os.environ.items() if k not in ours}
    results = {}
    for name, spec in paths.items():
        how = spec.get("how", "float32")
        if how == "llama.cpp":
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:
                print("note: llama-cpp-python is not installed; llama.cpp skipped")
                continue
        out = tmp / f"{len(results)}.pt"
        env = {**plain, **spec.get("env", {}), "BENCH_VOCAB": str(tokenizer.vocab_size)}
        command = [sys.executable, __file__, "--child", how, "--model", args.model,
                   "--ids-file", str(tmp / "ids.json"), "--out", str(out)]  # fmt: skip
        subprocess.run(command, env=env, check=True)
        results[name] = torch.load(out)[:, : tokenizer.vocab_size]
        print(f"done: {name}", file=sys.stderr)

    reference = results["float32"].log_softmax(-1)
    targets = torch.tensor([t for c in chunks for t in c[1:] + [-1]])
    scored = targets >= 0  # the last position of a window has no next token in the text
    print(f"\n{Path(args.model).name}: {n} tokens of {args.text} in windows of {args.window}\n")
    print(f"{'path':<34}{'mean KL':>12}{'perplexity':>12}{'top-1 = float32':>18}")
    for name, logits in results.items():
        log_q = logits.log_softmax(-1)
        kl = (reference.exp() * (reference - log_q)).sum(-1).mean()
        nll = -log_q[scored].gather(1, targets[scored].unsqueeze(1)).mean()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
        print(f"{name:<34}{float(kl):>12.2e}{float(nll.exp()):>12.3f}{float(agree):>17.1%}")


if __name__ == "__main__":
    main()
