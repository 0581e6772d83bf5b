"""The decode path (``kernels/decode_path.py``): chosen once at load, in one module, and
named the same way everywhere; ``model.py`` stays the reference maths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from llamalab import load_model
from llamalab.kv_cache import cache_view

SRC = Path(__file__).resolve().parent.parent / "src" / "llamalab"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_model_py_is_the_reference_and_wires_no_kernel() -> None:
    source = (SRC / "model.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 400
    # The kernels, the packed layers and the compiler are the decode path's business.
    assert "torch.ops" not in source and "torch.compile(" not in source
    imported = _imported(SRC / "model.py")
    assert not {m for m in imported if m.startswith(("llamalab.quant", "llamalab.kernels.native"))}
    # What model.py takes from the decode path: the attention over the cache and the
    # packed pass of several views, both plain torch unless a loaded path says otherwise.
    assert "llamalab.kernels.decode_path" in imported


def test_the_decode_path_does_not_import_the_model() -> None:
    """model.py imports it, so the reverse would be a cycle: it uses the model's attributes."""
    assert "llamalab.model" not in _imported(SRC / "kernels" / "decode_path.py")


def test_the_cpu_flags_are_read_in_one_place() -> None:
    readers = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "/proc/cpuinfo" in path.read_text(encoding="utf-8")
        and path.relative_to(SRC).as_posix() != "kernels/cpu.py"
    ]
    assert readers == []


def test_the_cpp_kernels_live_under_kernels_not_quant() -> None:
    native = [p for p in SRC.rglob("*") if p.suffix in (".cpp", ".cc", ".h", ".hpp")]
    assert native and all(p.relative_to(SRC).parts[0] == "kernels" for p in native), native


@pytest.fixture(scope="module")
def packed(smollm2_path):
    from llamalab.kernels.native import vnni_available

    if not vnni_available():
        pytest.skip("no kernel build runs here, or no C++ compiler for llamalab's kernels")
    return load_model(smollm2_path, packed=True)


def test_a_packed_model_gets_its_path_at_load_and_names_it(packed) -> None:
    from llamalab.kernels import isa_in_use
    from llamalab.kernels.cpu import chosen_isa
    from llamalab.quant.linear import QuantizedLinear

    path = packed.decode_path
    layers = sum(isinstance(m, QuantizedLinear) for m in packed.modules())
    assert path.describe() == {
        "isa": chosen_isa(),
        "step": "native",
        "attention": "native",
        "linear": {"vnni": layers},
    }
    assert path.isa == isa_in_use(packed) == chosen_isa()
    assert all(layer.attention.attend.__name__ == "native_attention" for layer in packed.layers)


def test_a_float_model_has_no_path_and_runs_on_torch(smollm2_path) -> None:
    from llamalab.kernels import isa_in_use
    from llamalab.kernels.decode_path import choose, native_pass_tokens

    model = load_model(smollm2_path)
    assert model.decode_path is None and isa_in_use(model) == "torch"
    assert native_pass_tokens(model) == 0
    assert choose(model, packed=False) is None
    assert all(layer.attention.attend.__name__ == "cached_attention" for layer in model.layers)


def test_compiling_is_chosen_only_where_no_native_step_runs(packed, smollm2_path) -> None:
    from llamalab.kernels.decode_path import choose

    try:
        assert choose(packed, packed=True, compile=True).step == "native"
        assert not packed.decode_path.compiles
    finally:
        choose(packed, packed=True)  # as loaded
    float_model = load_model(smollm2_path)
    path = choose(float_model, packed=False, compile=True)  # not run: compiling takes seconds
    assert float_model.decode_path is path and path.step == "compiled"
    assert path.describe()["attention"] == "torch" and path.isa == "torch"


def test_speculation_and_the_model_share_one_token_limit(packed) -> None:
    """``verifies_exactly`` promises bit-exact passes only as long as they run natively:
    the longest pass it accepts runs on the native step, one token more does not."""
    from llamalab.generation.speculative import verifies_exactly
    from llamalab.kernels.decode_path import NativeStep, native_pass_tokens

    limit = native_pass_tokens(packed)
    assert limit == NativeStep.MAX_TOKENS - 1
    assert verifies_exactly(packed, limit) and not verifies_exactly(packed, limit + 1)
    path = packed.decode_path
    step = path.native_step
    calls: list[int] = []

    def counted(h, rows, positions):
        calls.append(h.shape[0])
        return step(h, rows, positions)

    path.native_step = counted
    counted.MAX_TOKENS = step.MAX_TOKENS
    packed.setup_cache(1, 2 * limit + 2)
    try:
        with torch.inference_mode():
            for start, n in ((0, limit), (limit, limit + 1)):
                tokens = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
                packed(tokens, cache_view(torch.arange(start, start + n), last_only=True))
    finally:
        path.native_step = step
        packed.clear_cache()
    assert calls == [limit]


_PATCH_CHECK = """
import sys
sys.path.insert(0, "tests")
from conftest import without_vnni
import llamalab.kernels.native as native
with without_vnni():
    pass
import llamalab.quant.linear as linear
assert linear.vnni_available is native.vnni_available, linear.vnni_available
print("ok")
"""


def test_switching_the_kernel_off_for_a_load_does_not_leave_it_off() -> None:
    """``conftest.without_vnni`` in a process that has not imported quant/linear.py yet
    (the first test of a run, say): afterwards, loads take llamalab's kernels again."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PATCH_CHECK],
        cwd=SRC.parent.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
