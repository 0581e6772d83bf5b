"""Constrained decoding: does sampled JSON validate, and what does the grammar cost per token?

Two parts, on the default model (SmolLM2-135M-Instruct) unless ``--model`` says otherwise:

1. Validity: ``--samples`` completions at temperature 1.0 (no top-k, top-p or min-p
   filtering, so every token the grammar allows can be drawn) for each of three schemas
   (nested objects, enums, arrays with bounds), batched as the server batches them.
   Every completion is parsed with ``json.loads`` and checked with ``jsonschema``.
2. Overhead: one sequence decodes ``--tokens`` tokens with and without a grammar, the two
   runs interleaved ``--runs`` times; the figures are median [min, max] decode tokens/s.
   The grammar is a JSON string of at least 4,000 characters, so the constrained run
   never ends before the unconstrained one. The time inside the grammar itself (mask and
   advance per token) is reported separately.

    .venv/bin/python bench/bench_grammar.py [--samples 50] [--runs 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_structured_output import SCHEMAS

from llamalab.default_model import default_model_path
from llamalab.generation import Engine, Grammar, Request, SamplingParams
from llamalab.runtime import load_runtime

HOT = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def validity(engine: Engine, samples: int, batch: int) -> int:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Reply with JSON."}])
    failures = 0
    for name, schema in SCHEMAS.items():
        grammar = Grammar.json_schema(schema)
        valid = 0
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, samples, batch):
            requests = [
                Request(prompt, max_tokens=200, sampling=replace(HOT, seed=i), grammar=grammar)
                for i in range(start, min(samples, start + batch))
            ]
            for seq in engine.generate_batch(requests):
                tokens += len(seq.ids)
                try:
                    jsonschema.validate(json.loads(seq.text), schema)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                    print(f"  INVALID ({seq.finish_reason}): {seq.text!r}: {exc}")
        failures += samples - valid
        print(
            f"{name:15s} {valid}/{samples} parse and validate "
            f"({tokens / samples:.0f} tokens each, {time.perf_counter() - t0:.0f} s)"
        )
    return failures


class TimedConstraint:
    """Wraps a Constraint to time its mask and advance calls."""

    spent = 0.0
    calls = 0

    def __init__(self, inner) -> None:
        self.inner = inner

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.inner.mask(logits)
        TimedConstraint.spent += time.perf_counter() - t0
        TimedConstraint.calls += 1
        return out

    def advance(self, token: int) -> None:
        t0 = time.perf_counter()
        self.inner.advance(token)
        TimedConstraint.spent += time.perf_counter() - t0

    @property
    def complete(self) -> bool:
        return self.inner.complete


def overhead(engine: Engine, runs: int, tokens: int) -> None:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Write a long story."}])
    greedy = SamplingParams(temperature=0)
    long_string = Grammar.json_schema({"type": "string", "minLength": 4000})
    original = engine.grammars.constraint
    engine.grammars.constraint = lambda g: TimedConstraint(original(g))  # type: ignore[method-assign]
    speeds: dict[str, list[float]] = {"free": [], "grammar": []}
    for _ in range(runs):
        for kind, measured in speeds.items():
            request = Request(
                prompt,
                max_tokens=tokens,
                sampling=greedy,
                ignore_eos=kind == "free",
                grammar=long_string if kind == "grammar" else None,
            )
            (seq,) = engine.generate_batch([request])
            assert len(seq.ids) == tokens, (kind, seq.finish_reason, len(seq.ids))
            measured.append(seq.timing.as_dict()["decode_tokens_per_s"])
    for kind, values in speeds.items():
        print(
            f"decode, {kind:8s} {statistics.median(values):6.1f} tok/s "
            f"[{min(values):.1f}, {max(values):.1f}] over {runs} runs of {tokens} tokens"
        )
    ratio = statistics.median(speeds["grammar"]) / statistics.median(speeds["free"])
    per_token_us = 1e6 * TimedConstraint.spent / max(TimedConstraint.calls, 1)
    print(f"grammar / free: {ratio:.3f}; inside the grammar: {per_token_us:.0f} µs per token")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = load_runtime(args.model or str(default_model_path()))
    print(f"llguidance {version('llguidance')}, torch threads {torch.get_num_threads()}")
    engine = Engine(model, tokenizer, max_batch=args.batch, max_seq_len=512)
    failures = validity(engine, args.samples, args.batch)
    overhead(engine, args.runs, args.tokens)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
