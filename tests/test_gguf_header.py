"""Our GGUF header parser against the gguf package's own reader."""

import numpy as np
import pytest
from conftest import make_hf_model

from llamalab.checkpoint.convert import convert
from llamalab.gguf.header import read_gguf_header


def assert_same_header(path):
    import gguf

    meta, tensors = read_gguf_header(path)
    reference = gguf.GGUFReader(path)
    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        ours = meta[key]
        if isinstance(ours, np.ndarray):
            ours = ours.tolist()
        assert ours == expected, key
    assert [t.name for t in tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(tensors, reference.tensors, strict=True):
        assert int(ours.qtype) == int(theirs.tensor_type), ours.name
        assert ours.n_bytes == int(theirs.n_bytes), ours.name
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape)), ours.name
        assert ours.offset == int(theirs.data_offset), ours.name


def test_header_of_smollm2_matches_gguf_reader(smollm2_path):
    assert_same_header(smollm2_path)


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_header_of_written_files_matches_gguf_reader(tmp_path, dtype):
    make_hf_model("llama3-rope").save_pretrained(tmp_path / "hf")
    assert_same_header(convert(tmp_path / "hf", tmp_path / "m.gguf", to="gguf", dtype=dtype))
