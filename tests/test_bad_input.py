"""Bad checkpoints give one clear llamalab error line naming the file: no traceback, no code run."""

import json
import pickle

import pytest
import torch
from conftest import make_hf_model, run_cli

from llamalab.checkpoint.convert import convert


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    hf = root / "hf"
    make_hf_model("grouped-query").save_pretrained(hf)
    gguf_file = convert(hf, root / "model.gguf", to="gguf", dtype="f16")
    return root, hf, gguf_file


def assert_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llamalab: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_truncated_gguf(checkpoints, tmp_path):
    _, _, gguf_file = checkpoints
    data = gguf_file.read_bytes()
    for keep in (len(data) // 2, 200):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        assert_clean_error(run_cli("info", str(cut)), str(cut), "truncated")


def test_wrong_magic(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGML" + bytes(100))
    assert_clean_error(run_cli("info", str(bogus)), str(bogus), "not a model file")


def test_missing_meta_shard(checkpoints, tmp_path):
    _, hf, _ = checkpoints
    meta = convert(hf, tmp_path / "meta", to="meta", shards=2)
    (meta / "consolidated.00.pth").unlink()
    assert_clean_error(run_cli("info", str(meta)), "consolidated.00.pth", "missing shard")


def test_mismatched_shapes(checkpoints, tmp_path):
    _, hf, _ = checkpoints
    broken = convert(hf, tmp_path / "hf", to="hf")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 32
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_error(run_cli("info", str(broken)), str(broken), "feed_forward.w1.weight", "shape")
    assert_clean_error(
        run_cli("convert", str(broken), str(tmp_path / "out.gguf"), "--to", "gguf"), "shape"
    )
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_architecture(checkpoints, tmp_path):
    _, hf, _gguf_file = checkpoints
    broken = convert(hf, tmp_path / "hf", to="hf")
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_error(
        run_cli("info", str(broken)), "config.json", "unsupported architecture 'gpt2'"
    )

    import gguf

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, arch="falcon")
    writer.add_tokenizer_model("none")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    assert_clean_error(run_cli("info", str(other)), str(other), "unsupported architecture 'falcon'")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_and_never_runs(checkpoints, tmp_path):
    _, hf, _ = checkpoints
    meta = convert(hf, tmp_path / "meta", to="meta")
    marker = tmp_path / "code-ran"
    shard = torch.load(meta / "consolidated.00.pth", weights_only=True)
    shard["payload"] = _RunsCode(marker)
    with open(meta / "consolidated.00.pth", "wb") as f:
        pickle.dump(shard, f)  # a legacy (non-zip) pickle, as old checkpoints were
    assert_clean_error(run_cli("info", str(meta)), "consolidated.00.pth", "refused")
    torch.save({"x": _RunsCode(marker)}, meta / "consolidated.00.pth")  # and a zip one
    assert_clean_error(run_cli("info", str(meta)), "consolidated.00.pth", "refused")
    assert not marker.exists()


def test_missing_path_and_existing_destination(checkpoints, tmp_path):
    _, hf, gguf_file = checkpoints
    assert_clean_error(run_cli("info", str(tmp_path / "nowhere")), "no such file")
    before = gguf_file.read_bytes()
    assert_clean_error(
        run_cli("convert", str(hf), str(gguf_file), "--to", "gguf"), "already exists"
    )
    assert gguf_file.read_bytes() == before


def test_config_missing_keys_and_bad_values(checkpoints, tmp_path):
    _, hf, _ = checkpoints
    broken = convert(hf, tmp_path / "hf", to="hf")
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_clean_error(run_cli("info", str(broken)), "config.json", "missing key")
    meta = convert(hf, tmp_path / "meta", to="meta")
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "n_heads": "four"}))
    assert_clean_error(run_cli("info", str(meta)), "params.json", "invalid value")
