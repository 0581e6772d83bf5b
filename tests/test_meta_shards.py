"""Meta's model-parallel shards: splitting into 1, 2 or 4 and merging back is lossless."""

import json

import pytest
import torch
from conftest import make_hf_model

import llamalab
import llamalab.checkpoint.names
from llamalab.checkpoint.convert import convert
from llamalab.checkpoint.meta_format import split_dim

# Meta's model parallelism (fairscale layers in Meta's model.py), written out here rather
# than taken from the code under test: ColumnParallelLinear weights (wq, wk, wv, w1, w3,
# output) are split by output rows, dim 0; RowParallelLinear weights (wo, w2) by input
# columns, dim 1; tok_embeddings is a ParallelEmbedding split by columns (dim 1) in
# LLaMA 1/2 and a VocabParallelEmbedding split by rows (dim 0) in Llama 3; the norms are
# replicated (None).
META_SPLIT_DIM = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,
    "tok_embeddings.weight": 1,  # LLaMA 1/2; Llama 3: 0
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}


def meta_split_dim(name: str) -> int | None:
    """The table's entry for a canonical name (layer tensors by their name within the layer)."""
    if name.startswith("layers."):
        name = name.split(".", 2)[2]
    return META_SPLIT_DIM[name]


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
        # Each shard really holds a slice, split along Meta's dimension for that tensor,
        # and rank r holds the r-th slice (checked on the last shard).
        last = torch.load(files[-1], weights_only=True)
        assert first.keys() == set(reference)
        for name, tensor in first.items():
            dim = meta_split_dim(name)
            expected = list(reference[name].shape)
            if dim is not None:
                expected[dim] //= shards
            assert list(tensor.shape) == expected, name
            full = reference[name].to(tensor.dtype)
            if dim is None:
                assert torch.equal(tensor, full) and torch.equal(last[name], full), name
            else:
                assert torch.equal(tensor, full.chunk(shards, dim)[0]), name
                assert torch.equal(last[name], full.chunk(shards, dim)[-1]), name
        loaded = llamalab.load_model(folder).state_dict()
        assert loaded.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(loaded[name], tensor), f"{name} differs with {shards} shards"


def test_params_json_reads_back_in_metas_own_rule(hf_folder, tmp_path):
    folder = convert(hf_folder, tmp_path / "meta", to="meta")
    params = json.loads((folder / "params.json").read_text())
    # Meta's model.py:
    # hidden = multiple_of * ceil(int(multiplier * int(2 * 4 * dim / 3)) / multiple_of)
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
        shard["tok_embeddings.weight"] = (
            reference["tok_embeddings.weight"].chunk(2, dim=0)[rank].clone()
        )
        torch.save(shard, path)
    assert torch.equal(
        llamalab.load_model(folder).state_dict()["tok_embeddings.weight"],
        reference["tok_embeddings.weight"],
    )


def test_split_dim_agrees_with_metas_table():
    names = llamalab.checkpoint.names.canonical_names(2, tie_embeddings=False)
    assert {meta_split_dim(n) for n in names} == {0, 1, None}
    for name in names:
        assert split_dim(name) == meta_split_dim(name), name
    assert split_dim("tok_embeddings.weight", tok_embeddings_dim=0) == 0  # Llama 3
