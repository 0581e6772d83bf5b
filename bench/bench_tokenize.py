"""Encode throughput of each tokenizer backend, beside the library it wraps.

For every backend, llamalab's ``Tokenizer.encode`` and the underlying library called
directly (sentencepiece / tokenizers / tiktoken) encode the same ~10 MB of text. The two
are run interleaved (llamalab, library, llamalab, ...) so machine noise hits both alike;
each figure is the median of the runs, with min and max. The overhead ratio is
llamalab's median time over the library's.

    .venv/bin/python bench/bench_tokenize.py [--mb 10] [--runs 5] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llamalab import load_tokenizer
from llamalab.errors import LlamalabError

ROOT = Path(__file__).resolve().parents[1]
VOCAB_DIR = ROOT / "tests" / "fixtures" / "tokenizer" / "llamacpp-vocab"


def corpus(megabytes: float) -> str:
    """Mixed English prose, code, digits and non-ASCII text, repeated to the size asked for."""
    parts = []
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted(ROOT.glob("*.md")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    parts.append(
        "Café crème, naïve façade — São Paulo 🌞🎉 Zürich über alles. 日本語も少し。 3.14159 1,000,000\n"
        * 50
    )
    base = "\n".join(parts)
    size = int(megabytes * 1_000_000)
    text = base * (size // len(base.encode("utf-8")) + 1)
    # Cut by bytes, on a character boundary.
    return text.encode("utf-8")[:size].decode("utf-8", errors="ignore")


def backends() -> dict[str, tuple[str, Path]]:
    found = {
        "sentencepiece (llama-spm GGUF)": ("spm", VOCAB_DIR / "ggml-vocab-llama-spm.gguf"),
        "bpe (llama-bpe GGUF)": ("bpe", VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"),
    }
    try:
        from llamalab.default_model import default_model_path

        found["bpe (SmolLM2 GGUF)"] = ("bpe", default_model_path())
    except LlamalabError:
        pass
    spec = importlib.util.find_spec("llama_models")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
        found["tiktoken (Llama 3 tokenizer.model)"] = ("tiktoken", path)
    return found


def direct_call(kind: str, tok) -> Callable[[str], list[int]]:
    """The library itself, with the same options llamalab uses (no BOS, no special parsing)."""
    lib = tok.backend
    if kind == "spm":
        return lib.encode
    if kind == "bpe":
        return lambda text: lib.encode(text, add_special_tokens=False).ids
    return lib.encode_ordinary


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fmt(megabytes: float, times: list[float]) -> str:
    """Median MB/s, then [slowest-fastest]."""
    med = megabytes / statistics.median(times)
    return f"{med:7.2f} [{megabytes / max(times):6.2f}-{megabytes / min(times):6.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="megabytes of text (default 10)")
    parser.add_argument("--runs", type=int, default=5, help="runs per side (default 5)")
    parser.add_argument(
        "--only", nargs="*", default=None, help="substrings of backend names to run"
    )
    args = parser.parse_args()
    text = corpus(args.mb)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"text: {mb:.2f} MB, {len(text):,} characters; {args.runs} interleaved runs per side")
    print(
        f"{'backend':36} {'llamalab MB/s med [min-max]':>30} {'library MB/s med [min-max]':>30} {'ratio':>6}"
    )
    for name, (kind, path) in backends().items():
        if args.only and not any(s in name for s in args.only):
            continue
        tok = load_tokenizer(path)
        lib = direct_call(kind, tok)
        # llamalab parses special-token text (this corpus quotes "<s>" and friends); the
        # libraries' plain encoders do not. Remove those strings so both do the same
        # work, while llamalab still pays for scanning for them.
        clean = text
        for special in tok.special_tokens:
            clean = clean.replace(special, "")
        ours_ids = tok.encode(clean, add_bos=False, special=True)
        lib_ids = lib(clean)
        if ours_ids != lib_ids:  # same work, or the comparison means nothing
            print(f"{name}: llamalab and the library disagree on this text", file=sys.stderr)
            return 1
        ours_t, lib_t = [], []
        ours = functools.partial(tok.encode, clean, add_bos=False, special=True)
        direct = functools.partial(lib, clean)
        for _ in range(args.runs):
            ours_t.append(timed(ours))
            lib_t.append(timed(direct))
        size = len(clean.encode("utf-8")) / 1e6
        ratio = statistics.median(ours_t) / statistics.median(lib_t)
        print(f"{name:36} {fmt(size, ours_t):>30} {fmt(size, lib_t):>30} {ratio:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
