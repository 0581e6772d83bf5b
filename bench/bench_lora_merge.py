"""What writing a LoRA merge in a quantized type costs, beside quantizing the base alone.

For each type (Q8_0, Q4_1): KL(float32 base + adapter || merge written in that type by
``llamalab convert --lora``), against KL(float32 base || base written in that type), over
``--tokens`` tokens of held-out English text in windows of ``--window`` (as
bench/bench_quality.py measures its paths). The float32 reference of a GGUF base is its
every weight dequantized bit-exactly; the adapter runs unmerged on it.

    python bench/bench_lora_merge.py --lora runs/changelog/adapter [--model FILE] [--tokens 4096]

A Q4_1 base written back as Q4_1 is not lossless: gguf-py's quantizer (min and max of
each block) does not find the grid llama.cpp's quantizer chose.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import DEFAULT_TEXT, read_text, windows


def logits(model, chunks):
    import torch

    with torch.inference_mode():
        return torch.cat([model(torch.tensor([ids]))[0].float() for ids in chunks])


def mean_kl(reference, other) -> float:
    log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="base (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--lora", required=True, help="the adapter (PEFT folder or GGUF)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--types", default="q8_0,q4_1")
    args = parser.parse_args()

    import torch

    import llamalab
    from llamalab.checkpoint.convert import convert
    from llamalab.train.lora import load_adapters

    if args.model is None:
        from llamalab.default_model import default_model_path

        args.model = str(default_model_path())
    tokenizer = llamalab.load_tokenizer(args.model)
    ids = tokenizer.encode(read_text(args.text), add_bos=False)[: args.tokens]
    chunks = windows(ids, args.window)
    n = sum(len(c) for c in chunks)
    base = llamalab.load_model(args.model, dtype=torch.float32)
    ref_base = logits(base, chunks)
    load_adapters(base, [(args.lora, 1.0)])
    ref_merged = logits(base, chunks)
    del base
    print(f"{Path(args.model).name} + {args.lora}: {n} tokens of {args.text}")
    print(f"adapter's own effect: KL(base || base + adapter) = {mean_kl(ref_base, ref_merged):.3e}")
    print(f"{'type':<8}{'base alone':>14}{'merge':>14}{'ratio':>8}")
    with tempfile.TemporaryDirectory(prefix="bench-lora-merge-") as tmp:
        for qtype in args.types.split(","):
            base_q = convert(args.model, Path(tmp) / f"base-{qtype}.gguf", to="gguf", dtype=qtype)
            merged_q = convert(
                args.model, Path(tmp) / f"merged-{qtype}.gguf", to="gguf", dtype=qtype,
                lora=[(args.lora, 1.0)],
            )  # fmt: skip
            kl_base = mean_kl(ref_base, logits(llamalab.load_model(base_q), chunks))
            kl_merged = mean_kl(ref_merged, logits(llamalab.load_model(merged_q), chunks))
            ratio = kl_merged / kl_base if kl_base > 0 else float("inf")
            print(f"{qtype:<8}{kl_base:>14.3e}{kl_merged:>14.3e}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
