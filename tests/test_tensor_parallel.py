"""Tensor parallelism (parallel/tensor.py): N ranks on gloo give the logits of one process.

The distributed tests launch ``torchrun`` on this very file (its ``__main__`` is the
worker): every rank writes its logits to a folder, and the test compares them with the
logits of the untouched model computed here, in the test's own process. Results are
checked, not exit codes: gloo sometimes aborts at exit after every rank has finished.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.errors import LlamalabError
from llamalab.kv_cache import cache_view
from llamalab.model import Transformer
from llamalab.parallel.tensor import check_degree, local_heads, shard_spec

LAUNCH_TIMEOUT = 150  # seconds for one torchrun launch (four ranks import torch on 2 cores)
PROMPT = 7  # prompt tokens per row
DECODE = 3  # decode steps after the prefill
ROWS = 2


def _config(**kw) -> ModelConfig:
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 320, "ffn_hidden_dim": 160}
    base.update(kw)
    base.setdefault("context_length", 64)
    return ModelConfig(**base)


def _random_model(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    model.reset_parameters(0.15)  # large weights: varied logits that a mix-up cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _tokens(config: ModelConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (ROWS, PROMPT + DECODE), generator=g)


def run_model(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-sequence logits, then the logits of a cached prefill and of each decode step."""
    out = {}
    with torch.no_grad():
        out["full"] = model(tokens)
        model.setup_cache(ROWS, PROMPT + DECODE + 1)
        out["prefill"] = model(tokens[:, :PROMPT], cache_view(torch.arange(PROMPT)))
        for step in range(DECODE):
            pos = PROMPT + step
            view = cache_view(torch.tensor([pos]))
            out[f"decode{step}"] = model(tokens[:, pos : pos + 1], view)
        model.clear_cache()
    return out


def launch(tmp_path: Path, nproc: int, job: dict) -> Path:
    """Run this file's worker on ``nproc`` gloo ranks; return the folder of their results."""
    out = tmp_path / f"out{nproc}"
    out.mkdir()
    job_file = tmp_path / f"job{nproc}.json"
    job_file.write_text(json.dumps({**job, "out": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", __file__, str(job_file),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, check=False
    )
    done = sorted(p.name for p in out.glob("done*"))
    if len(done) != nproc:
        pytest.fail(
            f"{len(done)} of {nproc} ranks finished (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return out


# ---------------------------------------------------------------- without processes


@pytest.mark.parametrize(
    ("kw", "world", "named"),
    [
        ({"n_heads": 4, "n_kv_heads": 2}, 3, "4 attention heads"),
        ({"n_heads": 8, "n_kv_heads": 8, "ffn_hidden_dim": 162}, 4, "feed-forward hidden size 162"),
        ({"n_heads": 12, "n_kv_heads": 3, "dim": 96}, 4, "3 key/value heads"),
    ],
)
def test_a_degree_that_does_not_divide_the_model_is_refused(kw, world, named) -> None:
    with pytest.raises(LlamalabError, match=f"degree {world} does not divide.*{named}"):
        check_degree(_config(**kw), world)


def test_smollm2_shape_splits_on_3_ranks_and_refuses_2() -> None:
    smol = _config(dim=576, n_heads=9, n_kv_heads=3, ffn_hidden_dim=1536, vocab_size=49152)
    check_degree(smol, 3)
    with pytest.raises(LlamalabError, match="degree 2 does not divide its 9 attention heads"):
        check_degree(smol, 2)


@pytest.mark.parametrize(("n_kv", "world"), [(1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (8, 4)])
def test_the_ranks_slices_tile_every_tensor(n_kv: int, world: int) -> None:
    """Each sharded tensor is cut into disjoint, ordered pieces that cover it; replicated
    KV heads give every rank the head its queries read (query head h reads KV head
    h // (n_heads / n_kv_heads), Meta's grouping)."""
    config = _config(n_heads=8, n_kv_heads=n_kv, dim=64)
    specs = [shard_spec(config, world, r) for r in range(world)]
    D = config.head_dim
    for name in (
        "layers.0.attention.wq.weight",
        "layers.1.feed_forward.w2.weight",
        "output.weight",
    ):
        cuts = [s[name] for s in specs]
        assert cuts[0].start == 0 and all(a.stop == b.start for a, b in itertools.pairwise(cuts))
    assert specs[-1]["output.weight"].stop == config.vocab_size
    for rank, spec in enumerate(specs):
        heads, kv, first = local_heads(config, world, rank)
        wk = spec["layers.0.attention.wk.weight"]
        assert (wk.stop - wk.start) // D == kv == max(1, n_kv // world)
        group = config.n_heads // n_kv
        queries = range(rank * heads, (rank + 1) * heads)
        assert {q // group for q in queries} == set(range(first, first + kv))
        assert wk.dtensor == (n_kv >= world)


def test_a_rank_prints_one_error_line_when_two_threads_find_the_loss(capsys) -> None:
    """A model step and the control channel's sender can both see the ranks lose touch at
    once; the rank still says one line (the first), not one per thread."""
    import threading

    from llamalab.parallel.launch import Session

    session = object.__new__(Session)  # the reporting alone, without a process group
    session.rank = 0
    session._report_lock = threading.Lock()
    session._reported = False
    start = threading.Barrier(8)

    def say(i: int) -> None:
        start.wait()
        session.report(f"the ranks lost touch ({i})")

    threads = [threading.Thread(target=say, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamalab: error: the ranks lost touch ("), lines


# ---------------------------------------------------------------- on gloo ranks

# KV heads fewer than, equal to and more than the ranks, for 2 and 4 ranks; tied outputs
# and a vocabulary that does not split evenly among them.
CASES = {
    2: [
        {"n_kv_heads": 1},
        {"n_kv_heads": 2, "tie_embeddings": True},
        {"n_kv_heads": 4, "vocab_size": 321},
    ],
    4: [
        {"n_kv_heads": 2},
        {"n_kv_heads": 4, "vocab_size": 322, "tie_embeddings": True},
        {"n_heads": 8, "n_kv_heads": 8},
    ],
}


@pytest.mark.parametrize(("nproc", "exact"), [(2, False), (4, False), (2, True), (4, True)])
def test_ranks_give_the_logits_of_one_process(tmp_path: Path, nproc: int, exact: bool) -> None:
    """Within 1e-5 with the row split (its partial sums add in another order); equal bit
    for bit on whole sequences with the exact split, whose every product sums as one
    process's. The cached passes' attention runs batched matmuls over fewer heads on a
    rank, which may round the last bit differently (1.1e-6 here): within 1e-5 there."""
    cases, expected = [], []
    for i, kw in enumerate(CASES[nproc]):
        config = _config(**kw)
        model = _random_model(config, seed=100 * nproc + i)
        weights = tmp_path / f"model{i}.pt"
        torch.save(model.state_dict(), weights)
        tokens = _tokens(config, seed=i)
        cases.append({"config": kw, "weights": str(weights), "seed": i})
        expected.append(run_model(model, tokens))
    out = launch(tmp_path, nproc, {"kind": "forward", "cases": cases, "exact": exact})
    for rank in range(nproc):
        got = torch.load(out / f"rank{rank}.pt")
        for i, want in enumerate(expected):
            for key, logits in want.items():
                have = got[i][key]
                assert have.shape == logits.shape, (rank, i, key)
                err = (have - logits).abs().max().item()
                bound = 0.0 if exact and key == "full" else 1e-5
                assert err <= bound, f"rank {rank}, {CASES[nproc][i]}, {key}: {err}"
            # Each rank's cache holds only its own KV heads.
            assert got[i]["cache_heads"] == max(1, _config(**CASES[nproc][i]).n_kv_heads // nproc)


@pytest.mark.parametrize("world", [2, 4])
def test_hf_slices_are_read_without_the_whole_tensor(
    tmp_path: Path, world: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank's part of a Hugging Face tensor comes from safetensors' slice reads, in
    Meta's q/k layout: it equals the same rows or columns of the whole loaded tensor."""
    from conftest import make_hf_model

    from llamalab.checkpoint.load import open_checkpoint
    from llamalab.parallel.loading import read_slice

    make_hf_model("grouped-query").save_pretrained(tmp_path)
    reader = open_checkpoint(tmp_path)
    whole = {name: reader.load(name) for name in reader.names()}
    monkeypatch.setattr(reader, "load", lambda name: pytest.fail(f"{name} read whole"))
    for rank in range(world):
        for name, cut in shard_spec(reader.config, world, rank).items():
            if cut is None:
                continue
            want = whole[name].narrow(cut.dim, cut.start, cut.stop - cut.start)
            assert torch.equal(read_slice(reader, name, cut), want), (rank, name)


def write_meta(folder: Path, variant: str, seed: int, shards: int) -> Path:
    """conftest.py's tiny Hugging Face ``variant`` written as Meta's ``shards`` files by
    ``llamalab convert --to meta --shards``."""
    from conftest import make_hf_model

    from llamalab.checkpoint.convert import convert

    hf = folder.with_name(folder.name + "-hf")
    make_hf_model(variant, seed=seed).save_pretrained(hf)
    return convert(hf, folder, to="meta", shards=shards)


@pytest.mark.parametrize(
    ("variant", "mp", "rows"),
    [("grouped-query", 2, False), ("multi-head", 4, False), ("tied-output", 2, True)],
)
def test_meta_slices_of_any_model_parallel_degree(
    tmp_path: Path, variant: str, mp: int, rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank's part of a tensor in Meta's shards (MP = 2 or 4, the embedding split by
    columns as in LLaMA 1/2 or by rows as in Llama 3) read for 1, 2 and 4 ranks: it
    equals the same rows or columns of the tensor merged whole, and no tensor is merged
    whole to get it."""
    from llamalab.checkpoint.load import open_checkpoint
    from llamalab.parallel.loading import read_slice

    folder = write_meta(tmp_path / "meta", variant, 0, mp)
    if rows:  # Llama 3's split of the embedding: by vocabulary rows
        whole = open_checkpoint(folder).load("tok_embeddings.weight")
        for rank, path in enumerate(sorted(folder.glob("consolidated.*.pth"))):
            shard = torch.load(path, weights_only=True)
            shard["tok_embeddings.weight"] = whole.chunk(mp, dim=0)[rank].clone()
            torch.save(shard, path)
    reader = open_checkpoint(folder)
    assert reader.num_shards == mp and reader._tok_dim == (0 if rows else 1)
    merged = {name: reader.load(name).clone() for name in reader.names()}
    monkeypatch.setattr(reader, "load", lambda name: pytest.fail(f"{name} merged whole"))
    for world in (1, 2, 4):
        for rank in range(world):
            for name, cut in shard_spec(reader.config, world, rank).items():
                if name not in merged:
                    continue  # a tied output
                want = (
                    merged[name]
                    if cut is None
                    else merged[name].narrow(cut.dim, cut.start, cut.stop - cut.start)
                )
                assert torch.equal(read_slice(reader, name, cut), want), (world, rank, name)


# The tiny Hugging Face variants of conftest.py, each on 2 and 4 ranks; "meta:" the variant
# written as Meta's 2 model-parallel shards (loaded on 2 and on 4 ranks).
LOAD_CASES = {
    2: ["grouped-query", "tied-output", "multi-head", "meta:grouped-query"],
    4: ["grouped-query", "meta:multi-head"],
}


@pytest.mark.parametrize(("nproc", "exact"), [(2, False), (4, False), (2, True)])
def test_sharded_loading_gives_the_logits_of_the_whole_model(
    tmp_path: Path, nproc: int, exact: bool, request: pytest.FixtureRequest
) -> None:
    """Each rank reads its slices of a Hugging Face folder; the logits equal those of the
    model loaded whole by one process, and a rank holds about 1/N of the weights."""
    from conftest import make_hf_model

    from llamalab.checkpoint.load import load_model

    cases, expected, sizes = [], [], []
    for i, variant in enumerate(LOAD_CASES[nproc]):
        if variant.startswith("meta:"):
            folder = write_meta(tmp_path / f"meta{i}", variant[5:], seed=i, shards=2)
        else:
            folder = tmp_path / variant
            make_hf_model(variant, seed=i).save_pretrained(folder)
        whole = load_model(folder)
        tokens = _tokens(whole.config, seed=i)
        cases.append({"folder": str(folder), "seed": i})
        expected.append(run_model(whole, tokens))
        sizes.append(sum(p.numel() for p in whole.parameters()))  # tied: counted once
    job: dict = {"kind": "load", "cases": cases, "exact": exact}
    if nproc == 2 and not exact:
        try:
            job["gguf"] = str(request.getfixturevalue("smollm2_path"))
        except pytest.skip.Exception:
            pass
    out = launch(tmp_path, nproc, job)
    for rank in range(nproc):
        got = torch.load(out / f"rank{rank}.pt")
        for i, want in enumerate(expected):
            for key, logits in want.items():
                err = (got["results"][i][key] - logits).abs().max().item()
                bound = 0.0 if exact and key == "full" else 1e-5
                assert err <= bound, f"rank {rank}, {LOAD_CASES[nproc][i]}, {key}: {err}"
            # Norms are whole on every rank, and replicated KV heads on several: a little
            # over 1/N of the weights.
            held = got["results"][i]["held"]
            assert sizes[i] / nproc <= held <= 1.15 * sizes[i] / nproc, (held, sizes[i])
        if "gguf" in job:
            # SmolLM2's 9 query heads do not split on 2 ranks (its Q4_1 blocks would).
            assert "degree 2 does not divide its 9 attention heads" in got["gguf_error"]


def test_smollm2_on_3_ranks_gives_the_float_logits_of_one_process(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """SmolLM2 (30 blocks, 9 query and 3 KV heads) in float32 on 3 ranks, split the exact
    way: a 48-token sequence's logits equal one process's bit for bit."""
    from llamalab.checkpoint.load import load_model

    one = load_model(smollm2_path)
    tokens = torch.randint(
        0, one.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = one(tokens[None])
    del one
    case = {"gguf": str(smollm2_path), "tokens": tokens.tolist()}
    out = launch(tmp_path, 3, {"kind": "smollm2", "cases": [case], "exact": True})
    for rank in range(3):
        have = torch.load(out / f"rank{rank}.pt")[0]["full"]
        err = (have - want).abs().max().item()
        assert err <= 1e-5, f"rank {rank}: {err}"


# ---------------------------------------------------------------- packed GGUF weights


def write_quantized_gguf(path: Path, config: ModelConfig, qtype: str, seed: int) -> Path:
    """A random GGUF model whose matrices (embedding included) are stored as ``qtype``,
    quantized by gguf-py (the reference writer); the norms stay float32."""
    import gguf
    import numpy as np

    from llamalab.checkpoint import names as tensor_names
    from llamalab.checkpoint.gguf_format import add_model_metadata
    from llamalab.checkpoint.names import expected_shapes

    writer = gguf.GGUFWriter(path, "llama")
    add_model_metadata(writer, config)
    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, shape in expected_shapes(config).items():
        gguf_name = tensor_names.to_format(name, "gguf")
        if len(shape) == 1:
            writer.add_tensor(gguf_name, rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            array = (rng.standard_normal(shape) * 0.15).astype(np.float32)
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Quantized models whose splits fall on whole 32-value blocks on 2 ranks: GQA with fewer
# KV heads than ranks, a tied output and a vocabulary that does not split evenly.
PACKED_CASES = [
    ({"dim": 128, "n_heads": 4, "n_kv_heads": 1, "ffn_hidden_dim": 256}, "Q4_1"),
    ({"dim": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 192, "vocab_size": 321,
      "tie_embeddings": True}, "Q8_0"),
    ({"dim": 64, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden_dim": 128}, "Q4_0"),
]  # fmt: skip
# The packed kernels against themselves: the packed model's cached passes (the native
# step) against its eager full sequence differ by up to 2.4e-6 on these cases. The ranks
# run the same kernels on the same blocks (the vnni kernel's int8 activation blocks of 16
# fall inside a rank's whole 32-value blocks) and only add the row splits' partial sums
# in another order, so they are held to the float path's 1e-5.
PACKED_BOUND = 1e-5


@pytest.mark.parametrize("exact", [False, True])
def test_packed_ranks_give_the_logits_of_one_packed_process(tmp_path: Path, exact: bool) -> None:
    """Quantized GGUF models on 2 ranks, every linear and the embedding kept packed on
    each rank (the rank's block-aligned bytes): the logits of the packed model in one
    process, within the packed kernels' own spread; a rank holds half the packed bytes.
    The exact split cuts wo and w2 by whole rows instead."""
    from llamalab.checkpoint.load import load_model
    from llamalab.quant.linear import QuantizedLinear

    cases, expected, spread, sizes = [], [], [], []
    for i, (kw, qtype) in enumerate(PACKED_CASES):
        config = _config(**kw)
        path = write_quantized_gguf(tmp_path / f"q{i}.gguf", config, qtype, seed=i)
        one = load_model(path, packed=True)
        assert all(isinstance(one.get_submodule(n), QuantizedLinear) for n in ("output",))
        tokens = _tokens(config, seed=i)
        want = run_model(one, tokens)
        expected.append(want)
        # The packed model against itself: the cached passes against the full sequence.
        spread.append(
            max(
                (want[f"decode{s}"][:, 0] - want["full"][:, PROMPT + s]).abs().max().item()
                for s in range(DECODE)
            )
        )
        sizes.append(_packed_bytes(one))
        cases.append({"gguf": str(path), "seed": i})
    assert max(spread) <= PACKED_BOUND, spread
    out = launch(tmp_path, 2, {"kind": "packed", "cases": cases, "exact": exact})
    for rank in range(2):
        got = torch.load(out / f"rank{rank}.pt")
        for i, want in enumerate(expected):
            result = got[i]
            assert result["kernels"] == {"QuantizedLinear"}, result["kernels"]
            for key, logits in want.items():
                err = (result[key] - logits).abs().max().item()
                assert err <= PACKED_BOUND, f"rank {rank}, {PACKED_CASES[i]}, {key}: {err}"
            assert torch.equal(result["argmax"], want["full"].argmax(-1)), (rank, i)
            # Each rank holds half the packed bytes (norms are float and whole).
            assert 0.45 * sizes[i] <= result["bytes"] <= 0.6 * sizes[i], (result["bytes"], sizes[i])


def test_a_large_slice_is_packed_in_bands_as_one_whole(tmp_path: Path) -> None:
    """A rank's large vnni weight is packed 1,024 rows at a time (bounding the packing's
    transients); the joined buffer is the one packing it whole gives, byte for byte."""
    import gguf

    from llamalab.kernels.native import vnni_available
    from llamalab.parallel.loading import _banded_linear
    from llamalab.quant.linear import GGUFWeight, QuantizedLinear

    if not vnni_available():
        pytest.skip("the vnni kernel does not run here")
    kind = gguf.GGMLQuantizationType.Q4_1
    array = torch.randn(2064, 64, generator=torch.Generator().manual_seed(0)).numpy()
    data = gguf.quants.quantize(array, kind).reshape(-1)
    banded = _banded_linear(GGUFWeight(data, kind, (2064, 64)), None)
    whole = QuantizedLinear.from_gguf(data, kind, (2064, 64))
    assert banded.kernel == whole.kernel == "vnni"
    assert torch.equal(banded._vnni[0], whole._vnni[0])
    x = torch.randn(3, 64)
    assert torch.equal(banded(x), whole(x))


def _packed_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's packed layers and embedding (packed or float)."""
    total = 0
    for module in model.modules():
        for value in vars(module).values():
            parts = value if isinstance(value, tuple) else (value,)
            for part in parts:
                if isinstance(part, torch.Tensor):
                    total += part.numel() * part.element_size()
        if isinstance(module, torch.nn.Embedding):
            total += module.weight.numel() * module.weight.element_size()
    return total


# ---------------------------------------------------------------- the worker


def _worker(job: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llamalab.parallel.loading import load_sharded
    from llamalab.parallel.tensor import apply_tp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = []
    saved: dict = {"results": results}
    exact = job.get("exact", False)
    for case in job["cases"]:
        if job["kind"] == "forward":
            config = _config(**case["config"])
            model = Transformer(config).eval()
            model.load_state_dict(torch.load(case["weights"]))
            apply_tp(model, mesh, exact)
        elif job["kind"] == "smollm2":
            model = load_sharded(case["gguf"], mesh, exact=exact)
            with torch.no_grad():
                results.append({"full": model(torch.tensor([case["tokens"]]))})
            continue
        elif job["kind"] == "packed":
            model = load_sharded(case["gguf"], mesh, packed=True, exact=exact)
            result = run_model(model, _tokens(model.config, case["seed"]))
            result["argmax"] = result["full"].argmax(-1)
            result["bytes"] = _packed_bytes(model)
            result["kernels"] = {
                type(m.inner if hasattr(m, "inner") else m).__name__
                for name, m in model.named_modules()
                if name.split(".")[-1] in ("wqkv", "wq", "wk", "wv", "wo", "w13", "w1", "w3", "w2")
                or name == "output"
            }
            results.append(result)
            continue
        else:
            model = load_sharded(case["folder"], mesh, exact=exact)
            config = model.config
        result = run_model(model, _tokens(config, case["seed"]))
        # Plain tensors, as from one process (not a collective still in flight).
        assert all(type(t) is torch.Tensor for t in result.values()), result
        result["held"] = sum(_local(p).numel() for p in model.parameters())
        model.setup_cache(1, 4)
        result["cache_heads"] = model.layers[0].attention.kv_cache.k.shape[1]
        results.append(result)
    if "gguf" in job:
        try:
            load_sharded(job["gguf"], mesh)
            saved["gguf_error"] = "loaded"
        except LlamalabError as exc:
            saved["gguf_error"] = str(exc)
    out = Path(job["out"])
    torch.save(saved if job["kind"] == "load" else results, out / f"rank{rank}.pt")
    dist.barrier()
    (out / f"done{rank}").touch()
    dist.destroy_process_group()


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


if __name__ == "__main__":
    _worker(json.loads(Path(sys.argv[1]).read_text()))
