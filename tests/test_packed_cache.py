"""The packed-weight cache: a model's packed layers written once, mapped on later loads.

A hit must give exactly the fresh pack's logits; a file that does not match its model
(another version of the model file, a cut or corrupted cache file, a forged header) is
rebuilt, never trusted; a folder that cannot be written leaves the load working.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import make_hf_model

from llamalab.checkpoint.convert import convert
from llamalab.checkpoint.load import load_model
from llamalab.errors import LlamalabError
from llamalab.kernels.native import vnni_available
from llamalab.kv_cache import cache_view
from llamalab.quant import packed_cache
from llamalab.quant.linear import PackedEmbedding, QuantizedLinear

pytestmark = pytest.mark.skipif(not vnni_available(), reason="the packed kernels do not run here")

TOKENS = torch.tensor([[3, 17, 250, 9, 41, 300, 2]])


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    folders = []
    for seed in (0, 1):
        folder = root / f"hf{seed}"
        make_hf_model("grouped-query", seed=seed).save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture
def model_file(hf_folders, tmp_path):
    return convert(hf_folders[0], tmp_path / "model.gguf", to="gguf", dtype="q8_0")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "packed"
    monkeypatch.setenv("LLAMALAB_PACKED_CACHE", str(folder))
    return folder


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.setup_cache(1, 16)
    with torch.no_grad():
        return model(TOKENS, cache_view(torch.arange(TOKENS.shape[1])))


def fresh_logits(path, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("LLAMALAB_PACKED_CACHE", "0")
        return logits(load_model(path, packed=True))


def no_packing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was packed")

    monkeypatch.setattr(QuantizedLinear, "_from_vnni_bytes", refuse)


def cache_files(folder):
    """The cache files in ``folder``, and any other file but their CRC stamps."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.endswith(packed_cache.STAMP_SUFFIX))


def test_hit_gives_the_fresh_packs_logits_from_the_mapped_file(model_file, cache, monkeypatch):
    expected = fresh_logits(model_file, monkeypatch)
    first = logits(load_model(model_file, packed=True))  # packs, writes, maps the file
    (written,) = cache_files(cache)
    with monkeypatch.context() as m:
        no_packing(m)
        model = load_model(model_file, packed=True)
    assert torch.equal(first, expected)
    assert torch.equal(logits(model), expected)
    # Every packed layer (q/k/v and w1/w3 joined) and the embedding's rows are views of one
    # storage: the file's mapping, not copies.
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {m.kernel for m in layers} == {"vnni"}
    storages = {m._vnni[0].untyped_storage().data_ptr() for m in layers}
    assert isinstance(model.tok_embeddings, PackedEmbedding)
    storages.add(model.tok_embeddings._rows.untyped_storage().data_ptr())
    assert len(storages) == 1
    assert model.layers[0].attention.wqkv is not None
    assert cache_files(cache) == [written]


def test_another_version_of_the_model_file_is_rebuilt(hf_folders, model_file, cache, monkeypatch):
    load_model(model_file, packed=True)
    # The same name, other weights (same shapes, so the same size and tensor table).
    other = convert(hf_folders[1], model_file.parent / "other.gguf", to="gguf", dtype="q8_0")
    assert other.stat().st_size == model_file.stat().st_size
    os.replace(other, model_file)
    expected = fresh_logits(model_file, monkeypatch)
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)
    # Only the modification time differs: rebuilt all the same, then a hit.
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(packed_cache.CacheMismatch, match="another version of the model file"):
        packed_cache.PackedFile.open(cache_files(cache)[0], _identity(model_file))
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)
    with monkeypatch.context() as m:
        no_packing(m)
        assert torch.equal(logits(load_model(model_file, packed=True)), expected)


CORRUPTIONS = {
    "empty": lambda d: b"",
    "cut in the prefix": lambda d: d[:20],
    "cut in the header": lambda d: d[:100],
    "cut in the data": lambda d: d[: len(d) // 2],
    "one byte short": lambda d: d[:-1],
    "one byte more": lambda d: d + b"\0",
    "a data byte flipped": lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:],
    "a header byte flipped": lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:],
    "not a cache file": lambda d: b"GGUF" + d[4:],
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_cut_or_corrupted_cache_file_is_rebuilt(model_file, cache, monkeypatch, how):
    expected = fresh_logits(model_file, monkeypatch)
    load_model(model_file, packed=True)
    (path,) = cache_files(cache)
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))
    with pytest.raises(packed_cache.CacheMismatch):
        packed_cache.PackedFile.open(path, _identity(model_file))
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)
    assert packed_cache.PackedFile.open(path, _identity(model_file)).entries  # rebuilt


def _no_crc(monkeypatch) -> None:
    def refuse(*args):
        raise AssertionError("the CRC was computed")

    monkeypatch.setattr(packed_cache.zlib, "crc32", refuse)


def test_the_crc_is_computed_once_per_version_of_the_cache_file(model_file, cache, monkeypatch):
    """The writer stamps the file it wrote; a later open that finds the same file skips the
    CRC; a stamp that is missing, edited, or not a regular file means the CRC again."""
    load_model(model_file, packed=True)
    (path,) = cache_files(cache)
    stamp = path.with_name(path.name + packed_cache.STAMP_SUFFIX)
    assert stamp.is_file()
    with monkeypatch.context() as m:
        _no_crc(m)
        assert packed_cache.PackedFile.open(path, _identity(model_file)).entries
    recorded = stamp.read_text()
    for bad in (None, recorded.replace('"data_crc32": ', '"data_crc32": 1'), "x" * 5000, "fifo"):
        stamp.unlink(missing_ok=True)
        if bad == "fifo":
            os.mkfifo(stamp)
        elif bad is not None:
            stamp.write_text(bad)
        with monkeypatch.context() as m:
            _no_crc(m)
            with pytest.raises(AssertionError, match="the CRC was computed"):
                packed_cache.PackedFile.open(path, _identity(model_file))
    stamp.unlink(missing_ok=True)
    packed_cache.PackedFile.open(path, _identity(model_file))  # checked in full: stamped
    assert stamp.read_text() == recorded


def test_a_data_byte_changed_after_the_stamp_is_found(model_file, cache, monkeypatch):
    """The same inode, size and header, one data byte rewritten in place: its mtime and
    ctime move, so the stamp no longer matches and the CRC finds the change."""
    load_model(model_file, packed=True)
    (path,) = cache_files(cache)
    packed_cache.PackedFile.open(path, _identity(model_file))
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(packed_cache.CacheMismatch, match="CRC-32 mismatch"):
        packed_cache.PackedFile.open(path, _identity(model_file))


def _identity(model_file):
    from llamalab.checkpoint.load import open_checkpoint

    reader = open_checkpoint(model_file)
    return packed_cache.model_identity(model_file, reader.data_start)


def _forge(path, edit) -> None:
    """Rewrite a cache file's header through ``edit`` with a matching SHA-256: a file that
    passes the hash yet lies about its entries."""
    data = path.read_bytes()
    magic, length, _ = packed_cache._PREFIX.unpack_from(data, 0)
    start = packed_cache._PREFIX.size
    header = json.loads(data[start : start + length])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    data_offset = packed_cache._aligned(start + length)
    assert start + len(raw) <= data_offset, "keep the forged header within the page"
    prefix = packed_cache._PREFIX.pack(magic, len(raw), hashlib.sha256(raw).digest())
    padding = b"\0" * (packed_cache._aligned(start + len(raw)) - start - len(raw))
    path.write_bytes(prefix + raw + padding + data[data_offset:])


def _entry(key, value, index=-1):
    """Set one field of an entry (the last is the embedding's rows, the first a packed layer)."""

    def edit(header):
        header["entries"][index][key] = value

    return edit


FORGERIES = {
    "entry past the end": _entry("offset", 1 << 40),
    "entry longer than its shape": _entry("nbytes", 1 << 20),
    "negative offset": _entry("offset", -64),
    "entry of another shape": _entry("shape", [4096, 4096]),
    "unknown kind": _entry("kind", "pickle"),
    "unknown type": _entry("type", "Q9_9"),
    "another layout": _entry("layout", [4, 32, 8], 0),
    "a layout on rows": _entry("layout", [8, 32, 128]),
    "a layer of another shape": _entry("shape", [64, 32], 0),
    "a layer of another type": _entry("type", "Q4_0", 0),
    "repeated name": lambda h: h["entries"].append(dict(h["entries"][0])),
    "data size beyond the file": lambda h: h.update(data_bytes=h["data_bytes"] + 4096),
    "another format": lambda h: h.update(format=99),
    "no entries key": lambda h: h.pop("entries"),
    "entries not a list": lambda h: h.update(entries=7),
}


def test_entries_that_do_not_fit_the_model_are_packed_again(model_file, cache, monkeypatch):
    """A header that hashes right and whose entries are well formed, but of another shape
    than the model's tensors (q and the output swapped): those layers are packed afresh."""
    expected = fresh_logits(model_file, monkeypatch)
    load_model(model_file, packed=True)
    (path,) = cache_files(cache)

    def swap(header):
        entries = {e["name"]: e for e in header["entries"]}
        a, b = entries["layers.0.attention.wk"], entries["output"]
        a["name"], b["name"] = "output", "layers.0.attention.wk"

    _forge(path, swap)
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)


@pytest.mark.parametrize("how", list(FORGERIES))
def test_a_forged_header_is_refused_before_any_read(model_file, cache, monkeypatch, how):
    load_model(model_file, packed=True)
    (path,) = cache_files(cache)
    identity = _identity(model_file)
    packed_cache.PackedFile.open(path, identity)  # the real file passes
    _forge(path, FORGERIES[how])
    with pytest.raises(packed_cache.CacheMismatch):
        packed_cache.PackedFile.open(path, identity)
    expected = fresh_logits(model_file, monkeypatch)
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)


def test_a_folder_that_cannot_be_written_leaves_the_load_working(
    model_file, tmp_path, monkeypatch, capfd
):
    expected = fresh_logits(model_file, monkeypatch)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # read-only for root too: no folder can be made here
    monkeypatch.setenv("LLAMALAB_PACKED_CACHE", str(blocked / "packed"))
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)
    err = capfd.readouterr().err
    assert "llamalab: note: cannot write the packed weights" in err
    assert err.count("\n") == 1


def test_a_full_disk_leaves_no_partial_file(model_file, cache, monkeypatch, capfd):
    expected = fresh_logits(model_file, monkeypatch)
    real = packed_cache._bytes
    calls = []

    def filling(data):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(data)

    monkeypatch.setattr(packed_cache, "_bytes", filling)
    assert torch.equal(logits(load_model(model_file, packed=True)), expected)
    assert "No space left on device" in capfd.readouterr().err
    assert cache_files(cache) == []  # the temporary file is gone, no cache file made


def test_a_cache_file_replaced_while_mapped_leaves_the_model_intact(model_file, cache, monkeypatch):
    load_model(model_file, packed=True)
    model = load_model(model_file, packed=True)  # maps the file
    before = logits(model)
    (path,) = cache_files(cache)
    # Another process rebuilds it: a new file renamed over the old one, as write_packed does.
    shutil.copyfile(path, path.with_suffix(".new"))
    os.replace(path.with_suffix(".new"), path)
    assert torch.equal(logits(model), before)


def test_a_model_file_changed_or_cut_after_the_load(hf_folders, model_file, cache, monkeypatch):
    load_model(model_file, packed=True)
    model = load_model(model_file, packed=True)
    before = logits(model)
    # The loaded model holds no map of the model file: rewriting it changes nothing here.
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    assert torch.equal(logits(model), before)
    # A cut model file is refused by its header checks, cache or not.
    with pytest.raises(LlamalabError, match="truncated"):
        load_model(model_file, packed=True)


def _tied_gguf_with_f16_embedding(path, vocab_source):
    """A 1-layer tied model: Q8_0 block matrices, an F16 embedding (a type the kernels do
    not take, so the output layer projected from it is not on them)."""
    import gguf
    import numpy as np
    from gguf.constants import GGMLQuantizationType as T

    from llamalab.checkpoint import names as tensor_names
    from llamalab.checkpoint.gguf_format import add_model_metadata
    from llamalab.checkpoint.names import expected_shapes
    from llamalab.config import ModelConfig
    from llamalab.tokenizer.gguf_vocab import add_vocab_to_gguf

    n_vocab = len(gguf.GGUFReader(vocab_source).fields["tokenizer.ggml.tokens"].data)
    config = ModelConfig(
        name="tiny", dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=n_vocab,
        ffn_hidden_dim=128, norm_eps=1e-5, rope_theta=10000.0, context_length=256,
        tie_embeddings=True,
    )  # fmt: skip
    writer = gguf.GGUFWriter(path, "llama")
    add_model_metadata(writer, config)
    add_vocab_to_gguf(writer, vocab_source)
    rng = np.random.default_rng(0)
    for name, shape in expected_shapes(config).items():
        gguf_name = tensor_names.to_format(name, "gguf")
        if name.endswith("norm.weight"):
            writer.add_tensor(gguf_name, np.ones(shape, dtype=np.float32))
        elif name == "tok_embeddings.weight":
            writer.add_tensor(gguf_name, (rng.standard_normal(shape) * 0.02).astype(np.float16))
        else:
            weight = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_tied_output_the_cache_does_not_hold_is_built_from_the_file(
    tmp_path, cache, monkeypatch, smollm2_path
):
    """The cache holds the F16 embedding's rows and no output layer; a later load builds
    the output from the model file (it read the rows as a packed layer and crashed)."""
    path = _tied_gguf_with_f16_embedding(tmp_path / "tied.gguf", smollm2_path)
    expected = fresh_logits(path, monkeypatch)
    first = logits(load_model(path, packed=True))  # packs, writes the cache file
    assert len(cache_files(cache)) == 1
    again = logits(load_model(path, packed=True))  # from the cache file
    assert torch.equal(first, expected)
    assert torch.equal(again, expected)
