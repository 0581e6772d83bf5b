"""Linear kernels on this CPU: per SmolLM2 shape, and a whole SmolLM2 decode / prefill step.

    .venv/bin/python bench/bench_kernels.py [--rounds 7] [--skip-model] [--skip-shapes]
    .venv/bin/python bench/bench_kernels.py --isa all [--rounds 7]

``--isa`` (a comma list of avx512, avxvnni, avx2, or ``all`` that this CPU runs) measures
llamalab's own kernels instead, build against build on the same packed bytes, rounds
interleaved: per layer (SmolLM2's shapes, each GGUF type) the microseconds of one call
and, for one row, the packed bytes read per second; then SmolLM2's whole decode step
(``NativeStep``, the embedding and output layer included) in tokens per second.

Variants (all with float32 activations unless named otherwise):

  f32           F.linear on float32 weights (what the loader builds today)
  fp16-fbgemm   llamalab.quant.linear.QuantizedLinear: float16 weights, fbgemm, f32 math
  int8dyn       fbgemm dynamic int8 (per-channel int8 weights, activations quantized per tensor)
  int8pack      aten._weight_int8pack_mm, int8 weights + per-channel scales
  int4pack      aten._weight_int4pack_mm_for_cpu, group 32 (exactly Q4_1's form)
  int4pack-bf16 the same kernel with bfloat16 activations (its only vectorised path)
  dequant+f32   unpack Q4_1-style nibbles to float32 every call, then F.linear

Weights are cold, as in a real decode step: each timed call uses the next of
enough distinct copies to exceed the last-level cache.  Variants are interleaved
round by round; each cell is the median [min-max] over rounds of the mean time of
one call.  Slow scalar kernels are measured once at M=512 on small shapes only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*quantize_per_channel.*")

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (in, out)
COLD_BYTES = 256 << 20  # copies of each weight, so a round reads more than any cache


def fmt(times: list[float], scale: float = 1e6) -> str:
    med = statistics.median(times) * scale
    return f"{med:9.4g} [{min(times) * scale:.4g}-{max(times) * scale:.4g}]"


def shape_variants(k: int, n: int, m: int) -> dict[str, Callable[[torch.Tensor], object]]:
    """One factory per variant: each returns a closure over one fresh weight copy."""
    from llamalab.quant.linear import QuantizedLinear

    def f32():
        w = torch.randn(n, k) * 0.02
        return lambda x: F.linear(x, w)

    def fp16():
        layer = QuantizedLinear.from_float(torch.randn(n, k) * 0.02, kernel="fp16")
        return layer

    def int8dyn():
        w = torch.randn(n, k) * 0.02
        scales = w.abs().amax(1) / 127
        wq = torch.quantize_per_channel(w, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(wq, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)

    def int8pack():
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        s = torch.rand(n) * 1e-3
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s)

    def int4pack(dtype):
        def make():
            q = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            sz = (torch.rand(k // 32, n, 2) * 1e-2).to(dtype)
            if dtype == torch.float32:
                return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
            return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(dtype), packed, 32, sz
            ).float()

        return make

    def dequant():
        nib = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8)
        d, mn = torch.rand(n, k // 32, 1), torch.rand(n, k // 32, 1)

        def run(x):
            q = torch.cat([nib & 15, nib >> 4], dim=-1).float()
            return F.linear(x, (q * d + mn).view(n, k))

        return run

    variants = {
        "f32": f32,
        "fp16-fbgemm": fp16,
        "int8dyn": int8dyn,
        "int4pack-bf16": int4pack(torch.bfloat16),
    }
    slow = {"int8pack": int8pack, "int4pack": int4pack(torch.float32), "dequant+f32": dequant}
    # The scalar kernels take seconds per call at M=512 or on the 49152-row matrix.
    if m == 1 or n * k <= 576 * 1536:
        variants.update(slow)
    return variants


def time_calls(fns: list[Callable], x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)](x)
    return (time.perf_counter() - start) / calls


def bench_shapes(rounds: int) -> None:
    print("\n== per shape: microseconds per call, median [min-max] over rounds ==")
    for m in (1, 512):
        for k, n in SHAPES:
            x = torch.randn(m, k)
            variants = shape_variants(k, n, m)
            copies = max(1, min(32, COLD_BYTES // (n * k * 4)))
            pools = {}
            for name, make in variants.items():
                first = make()
                first(x)  # warm up (allocations, first-call dispatch)
                single = time_calls([first], x, 1)
                # Scalar kernels get one copy and one call: enough to see they lose.
                pools[name] = (
                    [first] if single > 0.2 else [first] + [make() for _ in range(copies - 1)]
                )
            calls = {
                name: max(1, min(len(fns) * 2, int(0.05 / max(time_calls(fns, x, 1), 1e-6))))
                for name, fns in pools.items()
            }
            results: dict[str, list[float]] = {name: [] for name in pools}
            for r in range(rounds):
                for name, fns in pools.items():
                    if r and time_calls(fns[:1], x, 1) > 1.0:
                        continue  # one round of a >1 s call is enough
                    results[name].append(time_calls(fns, x, calls[name]))
            base = statistics.median(results["f32"])
            print(f"M={m:<4d} {k:>5d} -> {n:<6d}")
            for name, times in results.items():
                print(
                    f"    {name:14s} {fmt(times)} us   x{base / statistics.median(times):5.2f} vs f32"
                )
            sys.stdout.flush()


# ---------------------------------------------------------------------------
# Whole model.
# ---------------------------------------------------------------------------


def gguf_weights(path):
    """Canonical name -> GGUFWeight for every tensor of a GGUF file."""
    import gguf

    from llamalab.checkpoint.names import from_format
    from llamalab.quant.linear import GGUFWeight

    reader = gguf.GGUFReader(path, "r")
    out = {}
    for t in reader.tensors:
        name = from_format(t.name, "gguf")
        if name is not None:
            out[name] = GGUFWeight(t.data, t.tensor_type, tuple(int(s) for s in reversed(t.shape)))
    return out


class Int4Bf16Linear(torch.nn.Module):
    """Q4_1 on int4pack (scale d, zero m + 8d): activations and output in bf16."""

    def __init__(self, w) -> None:
        super().__init__()
        from llamalab.gguf.dequant import _as_bytes, _unpack_q4_1

        n, k = w.shape
        d, mn, q = _unpack_q4_1(_as_bytes(w.data).view(-1, 20))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(n, k).to(torch.int32), 2
        )
        zero = mn + 8 * d  # d * (q - 8) + zero == d * q + m
        self.sz = (
            torch.stack([d.view(n, k // 32), zero.view(n, k // 32)], -1)
            .transpose(0, 1)
            .contiguous()
        )
        self.sz = self.sz.to(torch.bfloat16)

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).bfloat16(), self.packed, 32, self.sz
        )
        return y.float().view(*shape[:-1], -1)


class Int8DynLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        n = w.shape[0]
        scales = (w.abs().amax(1) / 127).clamp_min(1e-12)
        wq = torch.quantize_per_channel(
            w, scales.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8
        )
        self.packed = torch.ops.quantized.linear_prepack(wq, None)

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


def build_models(path) -> dict[str, torch.nn.Module]:
    from llamalab import load_model
    from llamalab.quant.linear import QuantizedLinear, quantizable_linears, quantize_model

    raw = gguf_weights(path)
    models = {"f32": load_model(path)}
    models["fp16-fbgemm"] = load_model(path)
    quantize_model(models["fp16-fbgemm"], raw)
    for label, make in (("int4pack-bf16", Int4Bf16Linear), ("int8dyn", None)):
        model = load_model(path)
        for name in quantizable_linears(model):
            parent, _, child = name.rpartition(".")
            host = model.get_submodule(parent) if parent else model
            w = raw.get(f"{name}.weight")
            if name == "output":  # Q8_0 token_embd: not 4-bit; use the fp16 layer for it
                setattr(host, child, QuantizedLinear.from_gguf(*raw["tok_embeddings.weight"]))
            elif make is not None:
                setattr(host, child, make(w))
            else:
                setattr(host, child, Int8DynLinear(model.get_submodule(name).weight.detach()))
        models[label] = model
    # The floor: every linear replaced by a no-op that returns zeros of the right
    # shape, i.e. what the rest of the step (norms, RoPE, attention, cache, Python)
    # costs.  No kernel choice can make a step faster than this.
    model = load_model(path)
    for name in quantizable_linears(model):
        parent, _, child = name.rpartition(".")
        host = model.get_submodule(parent) if parent else model
        setattr(host, child, _NoOpLinear(model.get_submodule(name).out_features))
    models["no-op linears"] = model
    return models


class _NoOpLinear(torch.nn.Module):
    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


@torch.inference_mode()
def bench_model(rounds: int, steps: int) -> None:
    from llamalab.default_model import default_model_path
    from llamalab.kv_cache import cache_view

    path = default_model_path()
    models = build_models(path)
    prompt = torch.randint(0, 49152, (1, 512))
    for model in models.values():
        model.setup_cache(1, 1024)
    pos0 = 64
    decode: dict[str, list[float]] = {n: [] for n in models}
    prefill: dict[str, list[float]] = {n: [] for n in models}
    kv_len = 128  # callers round kv_len up; decode of the first 128 positions
    for name, model in models.items():  # fill the first 64 slots of each cache
        view = cache_view(torch.arange(pos0), kv_len=kv_len, last_only=True)
        model(prompt[:, :pos0], cache=view)
    tok = prompt[:, pos0 : pos0 + 1]
    for name, model in models.items():
        model(tok, cache=cache_view(torch.tensor([pos0]), kv_len=kv_len))
    for r in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for s in range(steps):
                model(tok, cache=cache_view(torch.tensor([pos0 + s]), kv_len=kv_len))
            decode[name].append((time.perf_counter() - start) / steps)
    for r in range(max(3, rounds // 2)):
        for name, model in models.items():
            start = time.perf_counter()
            model(prompt, cache=cache_view(torch.arange(512), kv_len=512, last_only=True))
            prefill[name].append(time.perf_counter() - start)
    print("\n== whole SmolLM2-135M step, batch 1 ==")
    print(
        f"decode (1 token, KV cache at {pos0}): ms per token, median [min-max]; tokens/s from the median"
    )
    for name, t in decode.items():
        print(f"    {name:14s} {fmt(t, 1e3)} ms   {1 / statistics.median(t):6.1f} tok/s")
    print("prefill (512 tokens): s per prompt, median [min-max]; tokens/s from the median")
    for name, t in prefill.items():
        print(f"    {name:14s} {fmt(t, 1.0)} s    {512 / statistics.median(t):6.1f} tok/s")


# ---------------------------------------------------------------------------
# llamalab's own kernels, one build against another.
# ---------------------------------------------------------------------------

ISA_TYPES = ["Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"]
ISA_SHAPES = [(576, 1536), (1536, 576), (576, 49152)]  # (in, out): gate/up, down, output


def _packed_layer(qtype_name: str, k: int, n: int):
    """A QuantizedLinear on llamalab's kernels holding a random weight of the type."""
    import gguf
    import numpy as np
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as T

    from llamalab.quant.linear import QuantizedLinear

    qtype = T[qtype_name]
    rng = np.random.default_rng(k + n)
    if qtype_name.endswith("_K"):
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
        for at in (size - 2,) if qtype == T.Q6_K else (0, 2):  # small float16 d (and dmin)
            raw[:, at : at + 2] = (
                (rng.random(len(raw)) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
    else:
        raw = gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qtype)
    return QuantizedLinear.from_gguf(raw, qtype, (n, k), kernel="vnni")


def bench_isa_layers(isas: list[str], rounds: int) -> None:
    from llamalab.kernels import native

    ops = {isa: native.ops(isa).vnni_linear for isa in isas}
    print(
        "\n== llamalab's kernels per layer: microseconds per call, median [min-max]; "
        "GB/s of packed weight read at M=1 =="
    )
    for qtype in ISA_TYPES:
        for k, n in ISA_SHAPES:
            if qtype.endswith("_K") and k % 256:
                k = 768  # K-quant blocks span 256 columns: SmolLM2's 576 cannot hold them
            layer = _packed_layer(qtype, k, n)
            buffer, layout = layer._vnni
            # Distinct copies of the bytes, so each call reads them from memory, not cache.
            copies = [buffer] + [
                buffer.clone() for _ in range(max(0, min(31, COLD_BYTES // buffer.numel()) - 1))
            ]
            for m in (1, 64):
                x = torch.randn(m, k)
                results: dict[str, list[float]] = {isa: [] for isa in isas}
                fns = {
                    isa: [lambda x, b=b, op=op, n=n, lay=layout: op(x, b, n, *lay) for b in copies]
                    for isa, op in ops.items()
                }
                for fn in fns.values():
                    fn[0](x)  # warm up
                calls = max(len(copies), int(0.05 / max(time_calls(fns[isas[0]], x, 1), 1e-6)))
                for _ in range(rounds):
                    for isa in isas:  # interleaved: a burst of load hits every build alike
                        results[isa].append(time_calls(fns[isa], x, calls))
                print(f"{qtype} M={m:<3d} {k:>5d} -> {n:<6d} ({buffer.numel() / 1e6:.2f} MB)")
                for isa, times in results.items():
                    rate = (
                        f"   {buffer.numel() / statistics.median(times) / 1e9:6.1f} GB/s"
                        if m == 1
                        else ""
                    )
                    print(f"    {isa:8s} {fmt(times)} us{rate}")
                sys.stdout.flush()


@torch.inference_mode()
def bench_isa_model(isas: list[str], rounds: int, steps: int) -> None:
    from llamalab import load_model
    from llamalab.default_model import default_model_path
    from llamalab.kernels.decode_path import NativeStep
    from llamalab.kv_cache import cache_view

    model = load_model(default_model_path(), packed=True)
    stepper = {isa: NativeStep.for_model(model, isa=isa) for isa in isas}
    model.setup_cache(1, 1024)
    prompt = torch.randint(0, model.config.vocab_size, (1, 512))
    pos0 = 64
    model(prompt[:, :pos0], cache=cache_view(torch.arange(pos0), last_only=True))
    tok = prompt[:, pos0 : pos0 + 1]
    decode: dict[str, list[float]] = {isa: [] for isa in isas}
    prefill: dict[str, list[float]] = {isa: [] for isa in isas}
    for r in range(rounds + 1):
        for isa in isas:
            model.decode_path.native_step = stepper[isa]
            start = time.perf_counter()
            for s in range(steps):
                model(tok, cache=cache_view(torch.tensor([pos0 + s])))
            if r:  # the first round warms up
                decode[isa].append((time.perf_counter() - start) / steps)
            start = time.perf_counter()
            model(
                prompt[:, :60], cache=cache_view(torch.arange(60), last_only=True)
            )  # one native chunk
            if r:
                prefill[isa].append(time.perf_counter() - start)
    print("\n== whole SmolLM2-135M Q4_1 step on each build, batch 1 ==")
    print(
        f"decode (1 token, KV cache at {pos0}): ms per token, median [min-max]; tokens/s from the median"
    )
    for isa, t in decode.items():
        print(f"    {isa:8s} {fmt(t, 1e3)} ms   {1 / statistics.median(t):6.1f} tok/s")
    print(
        "prompt chunk (60 tokens, one native call): ms, median [min-max]; tokens/s from the median"
    )
    for isa, t in prefill.items():
        print(f"    {isa:8s} {fmt(t, 1e3)} ms   {60 / statistics.median(t):6.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--isa", help="llamalab's kernel builds to compare: a comma list, or all")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    if args.isa:
        from llamalab.kernels.cpu import ISAS, isa_runs

        isas = [i for i in ISAS if isa_runs(i)] if args.isa == "all" else args.isa.split(",")
        print(f"builds: {', '.join(isas)}; load: {os.getloadavg()}")
        if not args.skip_shapes:
            bench_isa_layers(isas, args.rounds)
        if not args.skip_model:
            bench_isa_model(isas, args.rounds, args.steps)
        print(f"load after: {os.getloadavg()}")
        return
    if not args.skip_shapes:
        bench_shapes(args.rounds)
    if not args.skip_model:
        bench_model(args.rounds, args.steps)


if __name__ == "__main__":
    main()
