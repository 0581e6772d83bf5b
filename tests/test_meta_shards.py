"""Meta's model-parallel shards: splitting into 1, 2 or 4 and merging back is lossless."""

import json

import pytest
import torch
from conftest import make_hf_model

import llamalab
from llamalab.checkpoint.convert import convert
from llamalab.checkpoint.meta_format import split_dim


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("multi-head").save_pretrained(folder)
    return folder


def test_shard_counts_load_identical_weights(hf_folder, tmp_path):
    reference = llamalab.load_model(hf_folder).state_dict()
    for shards in (1, 2, 4):
        folder = convert(hf_folder, tmp_path / f"meta{shards}", to="meta", shards=shards)
        files = sorted(folder.glob("consolidated.*.pth"))
        assert len(files) == shards
        first = torch.load(files[0], weights_only=True)
        # Each shard really holds a slice, split along Meta's dimension for that tensor.
        for name, tensor in first.items():
            dim = split_dim(name)
            expected = list(reference[name].shape)
            if dim is not None:
                expected[dim] //= shards
            assert list(tensor.shape) == expected, name
        loaded = llamalab.load_model(folder).state_dict()
        assert loaded.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(loaded[name], tensor), f"{name} differs with {shards} shards"


def test_params_json_reads_back_in_metas_own_rule(hf_folder, tmp_path):
    folder = convert(hf_folder, tmp_path / "meta", to="meta")
    params = json.loads((folder / "params.json").read_text())
    # Meta's model.py: hidden = multiple_of * ceil(int(multiplier * int(2 * 4 * dim / 3)) / multiple_of)
    hidden = int(2 * 4 * params["dim"] / 3)
    if "ffn_dim_multiplier" in params:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params["multiple_of"]
    assert m * ((hidden + m - 1) // m) == llamalab.load_config(hf_folder).ffn_hidden_dim


def test_llama3_style_embedding_split_by_rows(hf_folder, tmp_path):
    folder = convert(hf_folder, tmp_path / "meta", to="meta", shards=2)
    reference = llamalab.load_model(folder).state_dict()
    # Rewrite the shards the way Llama 3 splits tok_embeddings (by vocabulary rows).
    for rank, path in enumerate(sorted(folder.glob("consolidated.*.pth"))):
        shard = torch.load(path, weights_only=True)
        shard["tok_embeddings.weight"] = reference["tok_embeddings.weight"].chunk(2, dim=0)[rank].clone()
        torch.save(shard, path)
    assert torch.equal(llamalab.load_model(folder).state_dict()["tok_embeddings.weight"], reference["tok_embeddings.weight"])
