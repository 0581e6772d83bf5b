"""``llamalab verify``: checksum lists as coreutils and Meta write them, the structure, and
tensor digests equal to gguf-py's, safetensors' and torch's own bytes of each tensor."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_hf_model

from llamalab.checkpoint.convert import convert
from llamalab.cli import main

needs_coreutils = pytest.mark.skipif(
    shutil.which("sha256sum") is None or shutil.which("md5sum") is None,
    reason="coreutils' sha256sum and md5sum are not installed",
)


def llamalab(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def coreutils(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def meta_folder(hf_source, tmp_path_factory) -> Path:
    return convert(hf_source, tmp_path_factory.mktemp("meta") / "meta", to="meta", shards=2)


@pytest.fixture(scope="module")
def hf_folder(hf_source, tmp_path_factory) -> Path:
    return convert(hf_source, tmp_path_factory.mktemp("hf") / "hf", to="hf")


@pytest.fixture(scope="module")
def gguf_file(hf_source, tmp_path_factory) -> Path:
    return convert(hf_source, tmp_path_factory.mktemp("gguf") / "tiny.gguf", to="gguf")


# --- what convert leaves ------------------------------------------------------------------------


@needs_coreutils
def test_convert_output_passes_coreutils_checks(meta_folder, hf_folder, gguf_file):
    for folder in (meta_folder, hf_folder):
        proc = coreutils("sha256sum", "--strict", "-c", "SHA256SUMS", cwd=folder)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        listed = {line.rsplit(": ", 1)[0] for line in proc.stdout.splitlines()}
        others = {p.name for p in folder.iterdir()} - {"SHA256SUMS"}
        assert listed == others  # every file, the weights included
    proc = coreutils("md5sum", "--strict", "-c", "checklist.chk", cwd=meta_folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "consolidated.01.pth: OK" in proc.stdout
    # A single file: FILE.sha256 beside it, checked from where it lies.
    sidecar = gguf_file.with_name(gguf_file.name + ".sha256")
    proc = coreutils("sha256sum", "--strict", "-c", sidecar.name, cwd=gguf_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"{gguf_file.name}: OK\n"


def test_meta_folder_passes_its_checklist_and_a_flipped_byte_names_the_shard(
    meta_folder, tmp_path, capsys
):
    code, _, err = llamalab(capsys, "verify", str(meta_folder))
    assert code == 0, err
    assert "consolidated.00.pth: OK" in err and "consolidated.01.pth: OK" in err
    # Meta's own list alone (as downloaded from Meta: no SHA256SUMS) is checked too.
    meta_only = tmp_path / "meta"
    shutil.copytree(meta_folder, meta_only)
    (meta_only / "SHA256SUMS").unlink()
    code, _, err = llamalab(capsys, "verify", str(meta_only))
    assert code == 0, err
    assert "(1 checksum(s) match)" not in err and "checksum(s) match" in err
    # One flipped byte inside a tensor's data: the structure still holds, the md5 does not.
    shard = meta_only / "consolidated.01.pth"
    flip_byte(shard, shard.stat().st_size // 2)
    code, _, err = llamalab(capsys, "verify", str(meta_only))
    assert code == 1
    assert "consolidated.01.pth: FAILED (md5 differs from checklist.chk)" in err
    assert "consolidated.00.pth: OK" in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"llamalab: error: {meta_only}: verification failed: consolidated.01.pth")
    )


@needs_coreutils
@pytest.mark.parametrize("mode", ["-t", "-b", "--tag"])
def test_sums_written_by_coreutils(hf_folder, tmp_path, capsys, mode):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "SHA256SUMS").unlink()
    # Names coreutils has to escape (a backslash) and one with spaces.
    (folder / "odd\\name.txt").write_text("escaped\n")
    (folder / "with space.txt").write_text("spaced\n")
    names = sorted(p.name for p in folder.iterdir())
    proc = coreutils("sha256sum", mode, *names, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    if mode != "--tag":
        assert "\n\\" in proc.stdout  # the backslash name's line was escaped
    sums = tmp_path / "sums.txt"
    sums.write_text(proc.stdout)
    code, _, err = llamalab(capsys, "verify", str(folder), "--sums", str(sums))
    assert code == 0, err
    assert "odd\\name.txt: OK" in err and "with space.txt: OK" in err
    flip_byte(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 10)
    code, _, err = llamalab(capsys, "verify", str(folder), "--sums", str(sums))
    assert code == 1
    assert "model.safetensors: FAILED (sha256 differs from sums.txt)" in err


@needs_coreutils
def test_a_file_checked_against_a_sha256sums_beside_it(gguf_file, tmp_path, capsys):
    file = tmp_path / gguf_file.name
    shutil.copyfile(gguf_file, file)
    other = tmp_path / "other.bin"
    other.write_bytes(b"not checked here")
    proc = coreutils("sha256sum", "-b", file.name, other.name, cwd=tmp_path)
    (tmp_path / "SHA256SUMS").write_text(proc.stdout)
    code, _, err = llamalab(capsys, "verify", str(file))
    assert code == 0, err
    assert f"{file.name}: OK" in err and "other.bin" not in err


# --- tensor digests -----------------------------------------------------------------------------


def digest_lines(out: str) -> dict[str, str]:
    pairs = [line.split("  ", 1) for line in out.splitlines()]
    return {name: digest for digest, name in pairs}


def test_tensor_digests_equal_gguf_py(smollm2_path, capsys):
    import gguf

    code, out, err = llamalab(capsys, "verify", str(smollm2_path), "--tensors")
    assert code == 0, err
    ours = digest_lines(out)
    reference = gguf.GGUFReader(smollm2_path)
    expected = {t.name: hashlib.sha256(t.data.tobytes()).hexdigest() for t in reference.tensors}
    assert len(expected) == 272
    assert ours == expected
    assert list(ours) == [t.name for t in reference.tensors]  # gguf-hash's order


def test_tensor_digests_equal_safetensors_and_torch(hf_folder, meta_folder, capsys):
    import torch
    from safetensors import safe_open

    code, out, err = llamalab(capsys, "verify", str(hf_folder), "--tensors")
    assert code == 0, err
    with safe_open(str(hf_folder / "model.safetensors"), framework="np") as f:
        expected = {k: hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest() for k in f.keys()}  # noqa: SIM118
    assert digest_lines(out) == expected

    code, out, err = llamalab(capsys, "verify", str(meta_folder), "--tensors")
    assert code == 0, err
    expected = {}
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        for name, t in torch.load(meta_folder / shard, weights_only=True).items():
            expected[f"{shard}:{name}"] = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert digest_lines(out) == expected


# --- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["gguf", "safetensors", "pth"])
def test_a_truncated_file_fails_in_one_line(what, gguf_file, hf_folder, meta_folder, tmp_path):
    from conftest import run_cli

    if what == "gguf":
        target = tmp_path / "tiny.gguf"
        shutil.copyfile(gguf_file, target)
        cut, named = target, "tiny.gguf"
    else:
        target = tmp_path / "model"
        shutil.copytree(hf_folder if what == "safetensors" else meta_folder, target)
        cut = target / ("model.safetensors" if what == "safetensors" else "consolidated.01.pth")
        named = cut.name
    os.truncate(cut, cut.stat().st_size - 1000)
    proc = run_cli("verify", str(target))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llamalab: error:") and named in lines[0]
    assert "truncated" in lines[0]


def test_structure_problems_name_the_file_or_tensor(hf_folder, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = llamalab(capsys, "verify", str(folder))
    assert code == 1
    assert (
        "tensor layers.0.feed_forward.w1.weight has shape [160, 64], the config needs [96, 64]"
        in err
    )
    # An index that names a shard that is not there.
    config["intermediate_size"] = 160
    (folder / "config.json").write_text(json.dumps(config))
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = llamalab(capsys, "verify", str(folder))
    assert code == 1 and "names a shard that does not exist: model-00002-of-00002" in err


def test_a_list_that_reaches_outside_the_folder_is_refused(hf_folder, tmp_path, capsys):
    (tmp_path / "secret").write_text("x")
    digest = hashlib.sha256(b"x").hexdigest()
    sums = tmp_path / "sums"
    sums.write_text(f"{digest}  ../secret\n")
    code, _, err = llamalab(capsys, "verify", str(hf_folder), "--sums", str(sums))
    assert code == 1 and "line 1: ../secret lies outside" in err
    sums.write_text("not a checksum line\n")
    code, _, err = llamalab(capsys, "verify", str(hf_folder), "--sums", str(sums))
    assert code == 1 and "line 1: not a checksum line" in err


def test_json_report(hf_folder, tmp_path, capsys):
    code, out, _ = llamalab(capsys, "verify", str(hf_folder), "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["kind"] == "hf"
    assert {f["name"] for f in report["files"]} >= {"model.safetensors", "config.json"}
    assert all(f["ok"] and f["algorithm"] == "sha256" for f in report["files"])
    broken = tmp_path / "hf"
    shutil.copytree(hf_folder, broken)
    (broken / "config.json").write_text((broken / "config.json").read_text() + " ")
    code, out, _ = llamalab(capsys, "verify", str(broken), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert report["problems"] == ["config.json: sha256 differs from SHA256SUMS"]
