import dataclasses
import math
import re

import pytest
import torch

from llamalab.config import MAX_CONTEXT_LENGTH, PRESETS, ModelConfig, get_preset
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


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("n_layers", 4_000_000_000, "n_layers must be an integer from 1 to 4096"),
        ("dim", 1 << 20, "dim must be an integer from 1"),
        ("vocab_size", 1 << 30, "vocab_size"),
        ("ffn_hidden_dim", 0, "ffn_hidden_dim"),
        (
            "context_length",
            1 << 40,
            f"context_length must be an integer from 1 to {MAX_CONTEXT_LENGTH}",
        ),
        ("context_length", 2048.0, "context_length"),
        ("n_heads", True, "n_heads"),
        ("n_kv_heads", "2", "n_kv_heads"),
        ("norm_eps", math.nan, "norm_eps"),
        ("norm_eps", math.inf, "norm_eps"),
        ("norm_eps", 0.0, "norm_eps"),
        ("norm_eps", 1.0, "norm_eps must be a finite number above 0 below 1"),
        ("norm_eps", "1e-5", "norm_eps"),
        ("rope_theta", -1.0, "rope_theta"),
        ("rope_theta", math.nan, "rope_theta"),
        ("rope_theta", math.inf, "rope_theta"),
        ("tie_embeddings", "yes", "tie_embeddings"),
        ("rope_scaling", "llama3", "rope_scaling must be a mapping"),
    ],
)
def test_values_out_of_range_or_of_the_wrong_type(key, value, needle):
    with pytest.raises(LlamalabError, match=re.escape(needle)):
        dataclasses.replace(get_preset("debug"), **{key: value})


def test_context_length_cap_is_generous():
    # Llama 3.1's 128k context and far beyond are accepted; only absurd values are refused.
    assert MAX_CONTEXT_LENGTH == 1 << 24
    assert (
        dataclasses.replace(get_preset("debug"), context_length=MAX_CONTEXT_LENGTH).context_length
        == 1 << 24
    )
    for preset in PRESETS.values():  # every preset is within every bound
        dataclasses.replace(preset)


@pytest.mark.parametrize(
    ("scaling", "needle"),
    [
        ({"kind": "linear", "factor": 0.0}, "factor"),
        ({"kind": "linear", "factor": math.nan}, "factor"),
        ({"kind": "linear", "factor": "2"}, "factor"),
        (
            {"kind": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
            "high_freq_factor",
        ),
        ({"kind": "llama3", "factor": 8.0, "low_freq_factor": math.nan}, "low_freq_factor"),
        (
            {"kind": "llama3", "factor": 8.0, "original_context_length": 0},
            "original_context_length",
        ),
        ({"kind": "factors", "factors": [1.0] * 7 + [math.inf]}, "every RoPE scaling factor"),
        ({"kind": "factors", "factors": [1.0] * 7 + ["x"]}, "list of numbers"),
        ({"kind": "factors", "factors": [1.0] * 7 + [-1.0]}, "every RoPE scaling factor"),
    ],
)
def test_rope_scaling_values_are_checked(scaling, needle):
    with pytest.raises(LlamalabError, match=re.escape(needle)):
        dataclasses.replace(get_preset("debug"), rope_scaling=scaling)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("rms_norm_eps", math.nan, "norm_eps"),
        ("rope_theta", -5.0, "rope_theta"),
        ("num_hidden_layers", 4_000_000_000, "n_layers"),
        ("max_position_embeddings", 1 << 40, "context_length"),
        ("max_position_embeddings", math.inf, "infinity"),
        ("rms_norm_eps", "abc", "'abc'"),
    ],
)
def test_hugging_face_config_gets_the_same_checks_with_the_file_named(tmp_path, key, value, needle):
    from llamalab.checkpoint.hf_format import config_from_hf

    data = {
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "vocab_size": 320, "intermediate_size": 160, key: value,
    }  # fmt: skip
    source = tmp_path / "config.json"
    with pytest.raises(
        LlamalabError, match=f"^{re.escape(str(source))}: invalid value: .*{re.escape(needle)}"
    ):
        config_from_hf(data, source)


@pytest.mark.parametrize("preset", ["debug", "llama-7b", "llama2-70b", "llama3.1-8b"])
@pytest.mark.parametrize("tied", [False, True])
def test_expected_shapes_equal_the_models_parameters(preset, tied):
    """Checkpoints are checked against shapes written out by hand: they must be the model's."""
    from llamalab.checkpoint.names import expected_shapes

    config = dataclasses.replace(get_preset(preset), tie_embeddings=tied)
    with torch.device("meta"):
        model = Transformer(config)
    state = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if tied:
        state.pop("output.weight")  # shares the embedding: not stored twice
    assert expected_shapes(config) == state
