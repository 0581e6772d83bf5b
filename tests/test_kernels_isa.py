"""Every instruction-set build of llamalab's kernels (``kernels/csrc/kernels.cpp``):
AVX-512 VNNI, AVX-VNNI (in its EVEX form where the CPU lacks the VEX one) and AVX2.

Each build's operators are ``torch.ops.llamalab_<isa>``, loaded side by side here and fed
the same packed bytes (one layout for every build). References are float32 maths on
the weights as the kernels hold them, never another build's output; where two builds
must agree bit for bit, it is because the integer sums are exact in both and the float
steps after them are the same operations in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType as T

from llamalab.errors import LlamalabError
from llamalab.kernels import compiler
from llamalab.kernels.cpu import ISAS, chosen_isa, compile_flags, isa_runs, parse_cpuinfo

RUNNABLE = [isa for isa in ISAS if isa_runs(isa)]
needs_kernels = pytest.mark.skipif(
    not RUNNABLE or compiler() is None, reason="no kernel build runs here (CPU or compiler)"
)

_TYPES = [T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0]


def _ops(isa: str):
    from llamalab.kernels import native

    return native.ops(isa)


def _source(qtype: T, shape: tuple[int, int], seed: int):
    """Stored bytes of a random weight of ``qtype`` (random K-quant blocks with small scales)."""
    rng = np.random.default_rng(seed)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
        n_blocks = shape[0] * shape[1] // block
        raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
        fields = (size - 2,) if qtype == T.Q6_K else (0, 2)  # d (and dmin): small float16
        for at in fields:
            raw[:, at : at + 2] = (
                (rng.random(n_blocks) * 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
            )
        return raw
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:, :32] += 0.3  # blocks with an offset, so the stored minimum matters
    return gguf.quants.quantize(w, qtype)


def _held(layer) -> torch.Tensor:
    """The float32 weight the kernel multiplies by (scales and zeros in float16)."""
    return layer.dequantized_weight()


def _bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each activation moves by at most half its block's int8 step (max |x| / 127 over
    16), plus a few float32 ulps of the sums' magnitudes."""
    step = x.abs().unflatten(-1, (-1, 16)).amax(-1, keepdim=True) / 127
    moved = (step / 2).expand(*step.shape[:-1], 16).flatten(-2)
    return F.linear(moved, weight.abs()) + 1e-5 * F.linear(x.abs(), weight.abs()) + 1e-5


# -- choosing the path ------------------------------------------------------------------

_AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (_AVX512, {}, "avx512"),
        (_AVX2 | {"avx_vnni"}, {}, "avxvnni"),  # Alder Lake and later
        (_AVX2, {}, "avx2"),  # Haswell, Zen 1-3
        (frozenset({"sse4_2"}), {}, "torch"),
        (frozenset({"avx2", "fma"}), {}, "torch"),  # no F16C: nothing to run
        (_AVX512, {"LLAMALAB_ISA": "avx2"}, "avx2"),
        (_AVX512, {"LLAMALAB_ISA": "avxvnni"}, "avxvnni"),  # the EVEX form runs
        (_AVX512, {"LLAMALAB_ISA": " AVX512 "}, "avx512"),
        (_AVX512, {"LLAMALAB_ISA": "torch"}, "torch"),
        (_AVX512, {"LLAMALAB_VNNI": "0"}, "torch"),
        (_AVX512, {"LLAMALAB_VNNI": "0", "LLAMALAB_ISA": "avx2"}, "avx2"),  # the explicit one
    ],
)
def test_the_path_follows_the_flags_and_the_environment(flags, env, expected) -> None:
    assert chosen_isa(flags, env) == expected


@pytest.mark.parametrize(
    ("flags", "forced", "message"),
    [
        (_AVX2, "avx512", "cannot run that path .it runs avx2"),
        (_AVX2, "avxvnni", "cannot run that path"),
        (frozenset(), "avx2", "it runs none of them"),
        (_AVX512, "sse2", "not a kernel path"),
        (_AVX512, "avx-512", "not a kernel path"),
    ],
)
def test_a_forced_path_the_cpu_cannot_run_is_one_clear_error(flags, forced, message) -> None:
    with pytest.raises(LlamalabError, match=message):
        chosen_isa(flags, {"LLAMALAB_ISA": forced})


def test_the_avxvnni_build_takes_the_encoding_the_cpu_has() -> None:
    assert "-mavxvnni" in compile_flags("avxvnni", _AVX2 | {"avx_vnni"})
    evex = compile_flags("avxvnni", _AVX512)
    assert "-mavxvnni" not in evex and "-mavx512vnni" in evex
    assert not any("avx512" in f for f in compile_flags("avx2", _AVX512))


def test_cpuinfo_is_read_for_flags_and_cores() -> None:
    text = (
        "processor\t: 0\nphysical id\t: 0\ncore id\t: 0\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nphysical id\t: 0\ncore id\t: 0\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 2\nphysical id\t: 1\ncore id\t: 0\nflags\t\t: fpu avx2 fma\n"
    )
    info = parse_cpuinfo(text)
    assert info.flags == {"fpu", "avx2", "fma"}
    assert info.cores == {0: ("0", "0"), 1: ("0", "0"), 2: ("1", "0")}
    assert parse_cpuinfo("") == (frozenset(), {})
    assert parse_cpuinfo("processor : x\ncore id : 1\n").cores == {}  # garbage, not a crash


# -- matrix products --------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("qtype", _TYPES)
def test_matrix_products_within_the_activation_bound(isa: str, qtype: T) -> None:
    from llamalab.quant.linear import QuantizedLinear

    shape = (96, 512)
    layer = QuantizedLinear.from_gguf(_source(qtype, shape, seed=len(qtype.name)), qtype, shape)
    assert layer.kernel == "vnni"
    buffer, layout = layer._vnni
    weight = _held(layer)
    op = _ops(isa).vnni_linear
    torch.manual_seed(0)
    # One row (decode), a few (blocks of four and a tail) and a prefill chunk of 64+.
    rows = {m: torch.randn(m, shape[1]) for m in (1, 3, 6, 70)}
    for m, x in rows.items():
        y, ref = op(x, buffer, shape[0], *layout), F.linear(x, weight)
        assert y.shape == ref.shape and y.dtype == torch.float32
        excess = (y - ref).abs() - _bound(x, weight)
        assert float(excess.max()) <= 0.0, f"{m} rows: max excess {float(excess.max())}"
        assert float((y - ref).abs().max()) > 0.0  # int8 activations show: not vacuous
    # Rows are independent: a batch equals its rows one at a time, bit for bit.
    x = rows[70]
    batch = op(x, buffer, shape[0], *layout)
    singles = torch.cat([op(x[i : i + 1], buffer, shape[0], *layout) for i in range(len(x))])
    assert torch.equal(batch, singles)


@needs_kernels
@pytest.mark.parametrize("qtype", [t for t in _TYPES if t != T.Q8_0])
def test_builds_agree_bit_for_bit_below_8_bits(qtype: T) -> None:
    """Below 8 bits every build forms the same exact int32 sums and the same float steps."""
    from llamalab.quant.linear import QuantizedLinear

    shape = (48, 256)
    layer = QuantizedLinear.from_gguf(_source(qtype, shape, seed=7), qtype, shape)
    buffer, layout = layer._vnni
    x = torch.randn(5, shape[1])
    outs = [_ops(isa).vnni_linear(x, buffer, shape[0], *layout) for isa in RUNNABLE]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def _extreme_buffer(bits: int, group: int, offset: int, q: torch.Tensor):
    """A packed weight of quants q (out, in), every scale 1, zeros as the layout has them."""
    from llamalab.quant.linear import pack_vnni
    from llamalab.quant.plan import VnniLayout

    out, k = q.shape
    scale = torch.ones(out, k // group)
    zero = -offset * scale if offset else torch.full((out, k // group), -0.5)
    layout = VnniLayout(bits, group, offset)
    buffer = pack_vnni(q.to(torch.uint8), scale, zero, layout)
    weight = q.float() * 1.0 + zero.repeat_interleave(group, 1)
    return buffer, layout, weight


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize(
    ("bits", "group", "offset"),
    [(4, 32, 8), (4, 32, 0), (6, 32, 16), (6, 32, 0), (6, 16, 32), (8, 32, 128)],
)
def test_extreme_quants_and_activations_do_not_saturate(isa, bits, group, offset) -> None:
    """Every weight at its largest (or smallest) quant, every activation at +-127 after
    quantization: where vpmaddubsw's int16 pairs would saturate, the sums go wrong by
    thousands. Against exact float maths (the activations are exactly +-1 times d)."""
    out, k = 32, 256
    top = (1 << bits) - 1
    patterns = {
        "all max": torch.full((out, k), top),
        "all zero": torch.zeros(out, k, dtype=torch.long),
        "alternating": torch.tensor([top, 0]).repeat(out, k // 2),
    }
    signs = {
        "all +": torch.ones(3, k),
        "all -": -torch.ones(3, k),
        "mixed": torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(3, k // 4),
    }
    op = _ops(isa).vnni_linear
    for pname, q in patterns.items():
        buffer, layout, weight = _extreme_buffer(bits, group, offset, q)
        for sname, x in signs.items():
            y = op(x, buffer, out, *layout)
            ref = (x.double() @ weight.double().T).float()
            # x is exactly +-127 steps of 1/127: only float rounding of d is left.
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-3), (pname, sname, y[0, 0], ref[0, 0])


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE)
def test_bad_matrix_calls_are_refused(isa: str) -> None:
    op = _ops(isa).vnni_linear
    w = torch.zeros(16 * 64 // 2 + 16 * 2 * 2, dtype=torch.uint8)  # 16 x 64, Q4_0-like
    x = torch.randn(1, 64)
    assert op(x, w, 16, 4, 32, 8).shape == (1, 16)
    with pytest.raises(RuntimeError, match="weight bytes"):
        op(x, w[:-1], 16, 4, 32, 8)
    with pytest.raises(RuntimeError, match="bits/group/offset"):
        op(x, w, 16, 5, 32, 8)
    with pytest.raises(RuntimeError, match="shape"):
        op(torch.randn(1, 48), w, 16, 4, 32, 8)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), w, 16, 4, 32, 8)


# -- attention --------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (16, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1, 13, 300])
def test_decode_attention_equals_sdpa(isa, heads, head_dim, length) -> None:
    n_heads, n_kv = heads
    torch.manual_seed(length)
    q = torch.randn(2, n_heads, 1, head_dim) * 2
    k = (torch.randn(2, n_kv, 512, head_dim) * 2)[:, :, :length]
    v = torch.randn(2, n_kv, 512, head_dim)[:, :, :length]
    out = _ops(isa).decode_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("isa", RUNNABLE)
def test_bad_attention_calls_are_refused(isa: str) -> None:
    op = _ops(isa).decode_attention
    k = torch.randn(1, 2, 10, 32)
    with pytest.raises(RuntimeError, match="head_dim"):
        op(torch.randn(1, 4, 1, 32), k, k)
    with pytest.raises(RuntimeError, match="shapes"):
        op(torch.randn(1, 4, 2, 64), k, k)


def test_loading_a_build_the_cpu_cannot_run_is_refused(monkeypatch) -> None:
    from llamalab.kernels import native

    monkeypatch.setattr(native, "isa_runs", lambda isa: False)
    with pytest.raises(LlamalabError, match="cannot run"):
        native.load("avx2")
    with pytest.raises(LlamalabError, match="no native kernels"):
        native.load("sse2")


# -- whole commands ---------------------------------------------------------------------


def _generate(smollm2_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "llamalab", "generate", "-m", str(smollm2_path), "-n", "6",
            "--temperature", "0", "--json", "The capital of France is"]  # fmt: skip
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLAMALAB_")}
    full.update({"OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_NO_SERVER": "1", **env})
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=300, env=full)


@needs_kernels
@pytest.mark.parametrize("isa", [*RUNNABLE, "torch"])
def test_generate_runs_and_names_each_path(smollm2_path, isa: str) -> None:
    """The whole model (prefill, native decode step, output layer) on each path: the
    same greedy text as the float32 model's opening words, and the path in the timing."""
    done = _generate(smollm2_path, {"LLAMALAB_ISA": isa})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["timing"]["isa"] == isa
    assert "Paris" in out["text"], out["text"]


def test_generate_refuses_a_path_that_is_not_one(smollm2_path) -> None:
    done = _generate(smollm2_path, {"LLAMALAB_ISA": "avx1024"})
    assert done.returncode == 1
    expected = (
        "llamalab: error: LLAMALAB_ISA='avx1024' is not a kernel path: give one of "
        "avx512, avxvnni, avx2, torch"
    )
    assert done.stderr.strip().splitlines() == [expected]


_EVEX_CHECK = """
import torch
from llamalab.kernels import cpu, native
evex = cpu.cpu_flags() - {"avx_vnni"}
flags = cpu.compile_flags("avxvnni", evex)
assert "-mavxvnni" not in flags, flags
native.compile_flags = lambda isa: cpu.compile_flags(isa, evex)
assert native.load("avxvnni") and native.load("avx512")
import test_kernels_isa as t
for args in [(4, 32, 8), (6, 16, 32), (8, 32, 128)]:
    t.test_extreme_quants_and_activations_do_not_saturate("avxvnni", *args)
from llamalab.quant.linear import pack_vnni
from llamalab.quant.plan import VnniLayout
q = torch.randint(0, 64, (48, 256))
buffer = pack_vnni(q.to(torch.uint8), torch.rand(48, 8), torch.rand(48, 8), VnniLayout(6, 32, 0))
x = torch.randn(5, 256)
a = torch.ops.llamalab_avxvnni.vnni_linear(x, buffer, 48, 6, 32, 0)
b = torch.ops.llamalab_avx512.vnni_linear(x, buffer, 48, 6, 32, 0)
assert torch.equal(a, b)
print("ok")
"""


@needs_kernels
@pytest.mark.skipif(not isa_runs("avx512"), reason="the EVEX form needs AVX-512 VL and VNNI")
def test_the_evex_form_of_the_256_bit_vnni_build() -> None:
    """Where the CPU has both encodings, the other one (AVX-512 VL + VNNI's EVEX form of
    256-bit vpdpbusd, which the build takes where AVX-VNNI is missing) is built and run
    too, in a process of its own (each build's namespace is registered once)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_ISA": "torch"}
    tests = os.path.dirname(__file__)
    done = subprocess.run(
        [sys.executable, "-c", _EVEX_CHECK],
        check=False, capture_output=True, text=True, timeout=600, env=env, cwd=tests,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_info_names_the_path(smollm2_path) -> None:
    for isa in ["torch", *RUNNABLE[-1:]]:
        env = {**os.environ, "LLAMALAB_ISA": isa}
        argv = [sys.executable, "-m", "llamalab", "info", "--json", str(smollm2_path)]
        done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        expected = isa if isa == "torch" or compiler() is not None else "torch"
        assert json.loads(done.stdout)["isa"] == expected


_TAKEN_CHECK = """
import warnings
import torch
lib = torch.library.Library("llamalab", "DEF")  # another library got there first
lib.define("vnni_linear(Tensor x) -> Tensor")
from llamalab.kernels import isa_in_use, loaded_isa, native
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    assert native.vnni_available() is False
assert any("taken" in str(w.message) for w in seen), [str(w.message) for w in seen]
assert loaded_isa() == "torch"
print("ok")
"""


@needs_kernels
def test_a_taken_namespace_falls_back_to_torch_without_a_crash() -> None:
    """torch refuses a namespace defined twice; that must not escape the C++ hook as an
    exception (ctypes would abort the process)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_ISA": RUNNABLE[-1]}
    done = subprocess.run(
        [sys.executable, "-c", _TAKEN_CHECK],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
