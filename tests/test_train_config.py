"""Training config, --set overrides, errors as one line; the LR schedule; the paper's configs."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
import torch

from llamalab.cli import main
from llamalab.errors import LlamalabError
from llamalab.train.config import load_config, model_config
from llamalab.train.optim import parameter_groups
from llamalab.train.schedule import lr_at

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "train"


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    kw = {"peak": 3e-4, "warmup_steps": 2000, "total_steps": 10000}
    assert lr_at(0, **kw) == pytest.approx(3e-4 / 2000)
    assert lr_at(999, **kw) == pytest.approx(3e-4 * 1000 / 2000)
    assert lr_at(1999, **kw) == pytest.approx(3e-4)
    assert lr_at(2000, **kw) == pytest.approx(3e-4)
    assert lr_at(6000, **kw) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))  # halfway: cos = 0
    assert lr_at(10000, **kw) == pytest.approx(3e-5)
    assert lr_at(50000, **kw) == pytest.approx(3e-5)
    values = [lr_at(s, **kw) for s in range(2000, 10001, 100)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(3, peak=1.0, warmup_steps=0, total_steps=3) == pytest.approx(0.1)
    q = lr_at(2000 + 2000, **kw)  # a quarter of the decay
    assert q == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))


@pytest.mark.parametrize(
    ("name", "dim", "layers", "heads", "lr", "tokens"),
    [
        ("llama-7b", 4096, 32, 32, 3e-4, 10**12),
        ("llama-13b", 5120, 40, 40, 3e-4, 10**12),
        ("llama-33b", 6656, 60, 52, 1.5e-4, 14 * 10**11),
        ("llama-65b", 8192, 80, 64, 1.5e-4, 14 * 10**11),
    ],
)
def test_paper_configs_are_table_2(name, dim, layers, heads, lr, tokens):
    cfg = load_config(CONFIGS / f"{name}.toml")
    mc = model_config(cfg, 32000)
    assert (mc.dim, mc.n_layers, mc.n_heads, mc.vocab_size) == (dim, layers, heads, 32000)
    assert (cfg.lr, cfg.total_tokens, cfg.seq_len) == (lr, tokens, 2048)
    assert (cfg.batch_tokens, cfg.warmup_steps, cfg.min_lr_ratio) == (4 * 2**20, 2000, 0.1)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert sum(cfg.weights.values()) == pytest.approx(1.0)


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.toml")):
        cfg = load_config(path)
        model_config(cfg, 4096 if "llama-" not in path.name else 32000)


def test_set_overrides_and_types(tmp_path):
    cfg = load_config(
        CONFIGS / "debug.toml",
        [
            "data=/d",
            "out_dir=/o",
            "max_steps=7",
            "seed=3",
            "checkpoint_every=2",
            "lr=1e-3",
            "model.dim=128",
            "weights.code=0.5",
            "precision=bf16",
        ],
    )
    assert (cfg.data, cfg.out_dir, cfg.max_steps, cfg.seed, cfg.checkpoint_every) == (
        "/d",
        "/o",
        7,
        3,
        2,
    )
    assert cfg.lr == 1e-3 and cfg.model["dim"] == 128 and cfg.weights == {"code": 0.5}
    assert model_config(cfg, 300).ffn_hidden_dim == 352  # recomputed for the new width


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("bogus=1", "unknown config key 'bogus'"),
        ("max_steps=abc", "max_steps must be a whole number"),
        ("max_steps=0", "max_steps must be a whole number"),
        ("lr=nan", "lr must be a number"),
        ("precision=fp8", "precision must be one of"),
        ("seed", "key=value"),
        ("seq_len.x=1", "not a table"),
        ("model.bogus=1", "unknown model key 'bogus'"),
    ],
)
def test_bad_set_is_one_clear_line(setting, message, tmp_path, capsys):
    args = ["train", str(CONFIGS / "debug.toml"), "--set", f"out_dir={tmp_path}/o"]
    assert main([*args, "--set", f"data={tmp_path}", "--set", setting]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_config_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('data = "d"\nout_dir = "o"\nmodel = "debug"\nmax_steps = 1\nlearning_rate = 1\n')
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'learning_rate'" in err[0]
    bad.write_text("not toml [")
    with pytest.raises(LlamalabError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(LlamalabError, match="no such config"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(LlamalabError, match="no manifest.json"):
        from llamalab.train.loop import train

        train(load_config(CONFIGS / "debug.toml", [f"data={tmp_path}", f"out_dir={tmp_path}/o"]))


def test_weight_decay_spares_the_norms():
    from llamalab.config import get_preset
    from llamalab.model import Transformer

    model = Transformer(get_preset("debug"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"tok_embeddings.weight", "output.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert torch.is_tensor(decay["params"][0])


def test_the_out_dir_of_something_else_is_refused(tmp_path):
    from llamalab.train.loop import _check_out_dir
    from llamalab.train.parallel import World

    (tmp_path / "thesis.tex").write_text("precious")
    world = World(0, 1, 0, torch.device("cpu"))
    with pytest.raises(LlamalabError, match="not a previous `llamalab train` run"):
        _check_out_dir(tmp_path, {"model": {}, "tokenizer_sha256": "x"}, world)


def test_a_fifo_or_device_as_config_is_named_for_what_it_is(tmp_path):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    with pytest.raises(LlamalabError, match="is a FIFO"):
        load_config(fifo)  # never opened: reading a FIFO with no writer would block
    with pytest.raises(LlamalabError, match="character device"):
        load_config("/dev/zero")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + (CONFIGS / "debug.toml").read_bytes())
    assert load_config(bom, ["data=d", "out_dir=o"]).data == "d"
