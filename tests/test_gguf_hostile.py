"""Forged GGUF headers and metadata: one clear error line, fast, in little memory.

Files are built byte by byte here (the gguf package's writer refuses most of these forgeries),
either from scratch or by re-encoding a real tiny model's header with some values changed.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_hf_model, run_cli

from llamalab.checkpoint.convert import convert
from llamalab.config import MAX_CONTEXT_LENGTH
from llamalab.errors import LlamalabError
from llamalab.gguf import header as header_module
from llamalab.gguf.header import read_header

# GGUF value types (gguf spec).
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FORMAT = dict(
    zip([U8, I8, U16, I16, U32, I32, F32, BOOL, U64, I64, F64], "BbHhIif?Qqd", strict=True)
)
_NUMPY = {vtype: np.dtype("<" + fmt).str for vtype, fmt in _FORMAT.items()}
GGML_F32 = 0


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: int, value, sub: int | None = None) -> bytes:
    """The bytes of one metadata value of GGUF type ``vtype`` (arrays of element type ``sub``)."""
    if vtype == STRING:
        return gguf_string(value)
    if vtype != ARRAY:
        return struct.pack("<" + _FORMAT[vtype], value)
    head = struct.pack("<IQ", sub, len(value))
    if sub in _NUMPY:
        return head + np.asarray(value, dtype=_NUMPY[sub]).tobytes()
    return head + b"".join(encode_value(sub, v) for v in value)


def kv(key: str, vtype: int, value, sub: int | None = None) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + encode_value(vtype, value, sub)


def build(
    kvs: list[bytes],
    tensors: list[tuple[str, tuple[int, ...], int, int]] = (),
    data: bytes = b"",
    *,
    alignment: int = 32,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF v3 file: ``tensors`` are (name, dims innermost first, ggml type, relative offset)."""
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    n_kv = len(kvs) if n_kv is None else n_kv
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    out += b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        out += gguf_string(name) + struct.pack(
            f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset
        )
    out += bytes(-len(out) % alignment)
    return out + data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    make_hf_model("grouped-query").save_pretrained(root / "hf")
    return convert(root / "hf", root / "tiny.gguf", to="gguf", dtype="f32")


def reencode(src: Path, dst: Path, changes: dict[str, tuple | None]) -> Path:
    """Rewrite ``src`` with metadata values replaced by (type, value[, element type]) or removed."""
    header = read_header(src)
    kvs = []
    for key, value in header.metadata.items():
        vtype, sub = header.types[key]
        if key in changes:
            if changes[key] is None:
                continue
            vtype, value, *rest = changes[key]
            sub = rest[0] if rest else None
        kvs.append(kv(key, vtype, value, sub))
    kvs += [
        kv(key, *change) for key, change in changes.items() if change and key not in header.metadata
    ]
    base = min(t.offset for t in header.tensors)
    table = [
        (t.name, tuple(reversed(t.shape)), int(t.qtype), t.offset - base) for t in header.tensors
    ]
    dst.write_bytes(build(kvs, table, src.read_bytes()[base:]))
    return dst


def assert_one_error_line(path: Path, *needles: str, timeout: float = 120) -> None:
    """``llamalab info PATH`` exits 1 with one ``llamalab: error: PATH: ...`` line, no traceback."""
    started = time.monotonic()
    result = run_cli("info", str(path), timeout=timeout)
    assert time.monotonic() - started < timeout
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"llamalab: error: {path}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_reencoded_file_is_unchanged_and_valid(tiny, tmp_path):
    # The forging helper itself must produce a file that loads as the original does.
    copy = reencode(tiny, tmp_path / "copy.gguf", {})
    assert copy.read_bytes() == tiny.read_bytes()
    result = run_cli("info", str(copy), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_layers"] == 2


def test_header_larger_than_the_first_read(tiny, monkeypatch):
    # Headers longer than the first read are read on in growing steps and parse the same.
    whole = read_header(tiny)
    monkeypatch.setattr(header_module, "_FIRST_READ", 64)
    monkeypatch.setattr(header_module, "_last_header", None)
    piecewise = read_header(tiny)
    assert piecewise is not whole
    assert piecewise.tensors == whole.tensors and piecewise.types == whole.types
    assert piecewise.metadata.keys() == whole.metadata.keys()
    for key, value in whole.metadata.items():
        assert np.array_equal(piecewise.metadata[key], value), key


# --- header structure ---------------------------------------------------------------------------


def test_deeply_nested_arrays(tmp_path):
    depth = 5000
    value = struct.pack("<IQ", U32, 0)  # the innermost: an empty array of uint32
    for _ in range(depth):
        value = struct.pack("<IQ", ARRAY, 1) + value
    path = tmp_path / "nested.gguf"
    path.write_bytes(build([gguf_string("x") + struct.pack("<I", ARRAY) + value]))
    assert_one_error_line(path, "metadata key 'x'", "nested")
    # One level of arrays of arrays (what llama.cpp reads) stays readable.
    ok = tmp_path / "ok.gguf"
    pairs = struct.pack("<IQ", ARRAY, 2) + encode_value(ARRAY, [1, 2], U32)
    pairs += encode_value(ARRAY, [3], U32)
    arch = kv("general.architecture", STRING, "llama")
    ok.write_bytes(build([arch, gguf_string("pairs") + struct.pack("<I", ARRAY) + pairs]))
    read = read_header(ok).metadata["pairs"]
    assert [list(p) for p in read] == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("vtype", "value", "shown"),
    [
        (U32, 0, "0"),
        (U32, 48, "48"),
        (STRING, "abc", "'abc'"),
        (U64, 32, "32"),
        (F32, 32.0, "32.0"),
    ],
)
def test_alignment_must_be_a_uint32_power_of_two(tmp_path, vtype, value, shown):
    path = tmp_path / "align.gguf"
    path.write_bytes(
        build([kv("general.architecture", STRING, "llama"), kv("general.alignment", vtype, value)])
    )
    assert_one_error_line(path, "general.alignment", "power of two", shown)


def test_valid_custom_alignment_is_honoured(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    path = tmp_path / "align64.gguf"
    path.write_bytes(
        build([kv("general.alignment", U32, 64)], [("t", (4,), GGML_F32, 0)], data, alignment=64)
    )
    (record,) = read_header(path).tensors
    assert record.offset % 64 == 0 and record.n_bytes == 16
    assert path.read_bytes()[record.offset :] == data


def _run_measured(path: Path) -> dict:
    """Parse ``path`` in a fresh interpreter; report the error, the time and the peak memory."""
    code = (
        "import json, resource, sys, time\n"
        "from llamalab.errors import LlamalabError\n"
        "from llamalab.gguf.header import read_header\n"
        "t = time.monotonic()\n"
        "try:\n"
        "    read_header(sys.argv[1]); error = None\n"
        "except LlamalabError as exc:\n"
        "    error = str(exc)\n"
        "seconds = time.monotonic() - t\n"
        # ru_maxrss survives exec on Linux (it would report pytest's own peak): use VmHWM.
        "try:\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "    peak = int(status.split()[0]) / 1024\n"
        "except (OSError, IndexError):\n"
        "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'error': error, 'seconds': seconds, 'peak_mib': peak}))\n"
    )
    command = [sys.executable, "-c", code, str(path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "claim",
    [
        gguf_string("big") + struct.pack("<IQ", STRING, 40 << 30),  # a 40 GB string value
        gguf_string("big") + struct.pack("<IIQ", ARRAY, U64, 1 << 60),  # 2^60 uint64s
        gguf_string("big") + struct.pack("<IIQ", ARRAY, STRING, 1 << 60),  # 2^60 strings
        gguf_string("big") + struct.pack("<IIQ", ARRAY, ARRAY, 1 << 60),  # 2^60 arrays
        struct.pack("<Q", 40 << 30),  # a 40 GB key
        # In an array of strings: a 40 GB one, one of 2^64 - 1 bytes, each first of two or last.
        gguf_string("big") + struct.pack("<IIQQ", ARRAY, STRING, 2, 40 << 30),
        gguf_string("big") + struct.pack("<IIQQ", ARRAY, STRING, 2, (1 << 64) - 1),
        gguf_string("big") + struct.pack("<IIQQ", ARRAY, STRING, 1, (1 << 64) - 1),
    ],
    ids=["string", "numbers", "strings", "arrays", "key", "in-array", "in-array-2^64", "last"],
)
def test_lengths_beyond_the_file_fail_fast_in_little_memory(tmp_path, claim):
    path = tmp_path / "claims.gguf"
    head = build([kv("general.architecture", STRING, "llama"), claim])
    # A 1 GiB file (sparse: it costs no disk) that the header claims far more than.
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(1 << 30)
    report = _run_measured(path)
    assert report["error"] is not None and "truncated" in report["error"], report
    assert report["seconds"] < 2, report
    assert report["peak_mib"] < 200, report  # the interpreter, numpy, one 4 MiB read; not 1 GiB
    assert_one_error_line(path, "truncated")


@pytest.mark.parametrize(("n_kv", "n_tensors"), [(1 << 62, 0), (0, 1 << 62), (10_000_000, 0)])
def test_counts_beyond_the_file_fail_fast(tmp_path, n_kv, n_tensors):
    path = tmp_path / "counts.gguf"
    path.write_bytes(build([], n_kv=n_kv, n_tensors=n_tensors) + bytes(4096))
    report = _run_measured(path)
    assert report["error"] is not None and "does not fit in the file" in report["error"], report
    assert report["seconds"] < 2, report
    assert_one_error_line(path, "count")


_ARCH = kv("general.architecture", STRING, "llama")
_FOUR_FLOATS = np.zeros(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("kvs", "tensors", "data", "needle"),
    [
        ([_ARCH, _ARCH], [], b"", "'general.architecture' appears twice"),
        (
            [_ARCH, gguf_string("x") + struct.pack("<I", 13) + bytes(8)],
            [],
            b"",
            "unknown GGUF value type 13",
        ),
        ([_ARCH, gguf_string("x") + struct.pack("<IIQ", ARRAY, 99, 1)], [], b"", "element type 99"),
        (
            [_ARCH],
            [("t", (4,), GGML_F32, 0), ("t", (4,), GGML_F32, 32)],
            _FOUR_FLOATS * 3,
            "appears twice",
        ),
        ([_ARCH], [("t", (1, 1, 1, 1, 4), GGML_F32, 0)], _FOUR_FLOATS, "5 dimensions"),
        ([_ARCH], [("t", (), GGML_F32, 0)], _FOUR_FLOATS, "0 dimensions"),
        ([_ARCH], [("t", (4, 0), GGML_F32, 0)], _FOUR_FLOATS, "empty dimension"),
        ([_ARCH], [("t", (4,), 1000, 0)], _FOUR_FLOATS, "unknown GGML type 1000"),
        ([_ARCH], [("t", (4,), GGML_F32, 4)], _FOUR_FLOATS * 2, "not a multiple of the alignment"),
        ([_ARCH], [("t", (4,), GGML_F32, 64)], _FOUR_FLOATS, "truncated: tensor t ends at byte"),
        ([_ARCH], [("t", (1 << 40, 1 << 40), GGML_F32, 0)], _FOUR_FLOATS, "truncated: tensor t"),
        ([_ARCH], [("t", (5,), 8, 0)], _FOUR_FLOATS * 2, "do not divide into Q8_0 blocks"),
    ],
    ids=[
        "dup-key",
        "value-type",
        "element-type",
        "dup-tensor",
        "5-dims",
        "0-dims",
        "zero-dim",
        "ggml-type",
        "misaligned",
        "past-end",
        "huge-shape",
        "partial-block",
    ],
)
def test_malformed_header_structure(tmp_path, kvs, tensors, data, needle):
    path = tmp_path / "bad.gguf"
    path.write_bytes(build(kvs, tensors, data))
    with pytest.raises(LlamalabError, match="^" + str(path).replace("\\", "\\\\") + ": ") as caught:
        read_header(path)
    assert needle in str(caught.value)
    assert_one_error_line(path, needle)


# --- model values -------------------------------------------------------------------------------


def test_block_count_must_match_the_tensor_table(tiny, tmp_path):
    huge = reencode(tiny, tmp_path / "blocks.gguf", {"llama.block_count": (U32, 4_000_000_000)})
    started = time.monotonic()
    assert_one_error_line(huge, "llama.block_count is 4000000000", "holds 2 blocks")
    assert time.monotonic() - started < 60  # it grew by 45 MB/s, for ever
    for count in (1, 3):
        wrong = reencode(
            tiny, tmp_path / f"blocks{count}.gguf", {"llama.block_count": (U32, count)}
        )
        assert_one_error_line(wrong, f"llama.block_count is {count}", "holds 2 blocks")
    result = run_cli("convert", str(huge), str(tmp_path / "out"), "--to", "hf", timeout=120)
    assert (
        result.returncode == 1
        and "block_count" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "change", "needles"),
    [
        (
            "llama.context_length",
            (U64, 1 << 40),
            ("context_length", str(MAX_CONTEXT_LENGTH), str(1 << 40)),
        ),
        ("llama.context_length", (U32, 0), ("llama.context_length must be a positive integer",)),
        ("llama.attention.layer_norm_rms_epsilon", (F32, math.nan), ("norm_eps", "nan")),
        ("llama.attention.layer_norm_rms_epsilon", (F32, math.inf), ("norm_eps", "inf")),
        ("llama.attention.layer_norm_rms_epsilon", (F32, 0.0), ("norm_eps",)),
        ("llama.attention.layer_norm_rms_epsilon", (F32, 1.5), ("norm_eps", "below 1")),
        (
            "llama.attention.layer_norm_rms_epsilon",
            (STRING, "1e-5"),
            ("must be a number", "'1e-5'"),
        ),
        ("llama.rope.freq_base", (F32, -1.0), ("rope_theta",)),
        ("llama.rope.freq_base", (F64, 1e300), None),  # finite and positive: accepted
        ("llama.rope.freq_base", (F64, math.nan), ("rope_theta", "nan")),
        (
            "llama.block_count",
            (STRING, "2"),
            ("llama.block_count must be a positive integer", "'2'"),
        ),
        ("llama.block_count", (BOOL, True), ("llama.block_count must be a positive integer",)),
        (
            "llama.embedding_length",
            (F32, 64.0),
            ("llama.embedding_length must be a positive integer",),
        ),
        (
            "llama.embedding_length",
            (U32, 128),
            ("token_embd.weight has shape [320, 64]", "[320, 128]"),
        ),
        ("llama.attention.head_count", (U32, 0), ("head_count must be a positive integer",)),
        ("llama.attention.head_count", (U32, 3), ("not divisible by n_heads 3",)),
        ("llama.attention.head_count_kv", (U32, 4), ("blk.0.attn_k.weight has shape [32, 64]",)),
        ("llama.feed_forward_length", (U32, 4_000_000_000), ("ffn_hidden_dim",)),
        ("llama.feed_forward_length", (U32, 128), ("blk.0.ffn_gate.weight", "[128, 64]")),
        ("llama.vocab_size", (U32, 1 << 30), ("vocab_size",)),
        ("llama.vocab_size", (ARRAY, [320], U32), ("llama.vocab_size must be", "an array of 1")),
        ("llama.rope.scaling.type", (U32, 1), ("rope.scaling.type must be a string",)),
    ],
)
def test_model_values_are_range_and_type_checked(tiny, tmp_path, key, change, needles):
    path = reencode(tiny, tmp_path / "values.gguf", {key: change})
    if needles is None:
        assert run_cli("info", str(path)).returncode == 0
    else:
        assert_one_error_line(path, *needles)


@pytest.mark.parametrize(
    "changes",
    [
        {"llama.rope.scaling.type": (STRING, "linear"), "llama.rope.scaling.factor": (F32, 0.0)},
        {
            "llama.rope.scaling.type": (STRING, "linear"),
            "llama.rope.scaling.factor": (F32, math.nan),
        },
        {"llama.rope.scaling.type": (STRING, "linear"), "llama.rope.scaling.factor": (STRING, "2")},
    ],
)
def test_rope_scaling_factor_is_checked(tiny, tmp_path, changes):
    path = reencode(tiny, tmp_path / "rope.gguf", changes)
    assert_one_error_line(path, "factor")
