import dataclasses

import pytest
import torch

from llamalab.config import PRESETS, ModelConfig, get_preset
from llamalab.errors import LlamalabError
from llamalab.model import Transformer

# Paper, Table 2 (exact counts from Meta's released checkpoints).
PAPER_PARAMETERS = {
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
}


@pytest.mark.parametrize("name", list(PAPER_PARAMETERS))
def test_paper_parameter_counts_on_meta_device(name):
    config = get_preset(name)
    with torch.device("meta"):  # shapes only: no memory is allocated
        model = Transformer(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == PAPER_PARAMETERS[name]
    assert config.num_parameters() == PAPER_PARAMETERS[name]


def test_published_shapes_of_later_presets():
    assert PRESETS["llama2-70b"].ffn_hidden_dim == 28672
    assert PRESETS["llama2-70b"].n_kv_heads == 8
    assert PRESETS["llama3-8b"].ffn_hidden_dim == 14336
    assert PRESETS["llama3-8b"].num_parameters() == 8_030_261_248
    assert PRESETS["llama3.1-8b"].rope_scaling.kind == "llama3"
    assert PRESETS["llama-7b"].norm_eps == 1e-6 and PRESETS["llama2-7b"].norm_eps == 1e-5


def test_presets_are_frozen_and_replace_revalidates():
    config = get_preset("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 8  # type: ignore[misc]
    assert dataclasses.replace(config, n_layers=3).n_layers == 3
    with pytest.raises(LlamalabError, match="n_kv_heads"):
        dataclasses.replace(config, n_kv_heads=3)


def test_unknown_keys_and_bad_values_are_errors():
    data = get_preset("debug").to_dict()
    assert ModelConfig.from_dict(data) == get_preset("debug")
    with pytest.raises(LlamalabError, match="unknown keys bogus"):
        ModelConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(LlamalabError, match="dim"):
        ModelConfig.from_dict({**data, "dim": 65})
    with pytest.raises(LlamalabError, match="unknown preset"):
        get_preset("llama-8b")
