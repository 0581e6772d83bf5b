"""``convert`` never overwrites: races at the destination, concurrent runs, cleanup, permissions.

Races are made deterministic by wrapping ``rename_noreplace``, the one step that publishes
the output: the wrapper does what another process might have done just before it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_model, run_cli

import llamalab
from llamalab.checkpoint import convert as convert_module
from llamalab.checkpoint.convert import convert, rename_noreplace
from llamalab.checkpoint.load import open_checkpoint
from llamalab.errors import LlamalabError


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "hf"
    make_hf_model("grouped-query").save_pretrained(folder)
    return folder


@pytest.fixture(params=["renameat2", "portable"])
def rename_kind(request, monkeypatch) -> str:
    """Run a test with Linux's renameat2 and again with the portable fallback."""
    if request.param == "portable":
        monkeypatch.setattr(convert_module, "_renameat2", lambda src, dst: False)
    elif convert_module._libc_renameat2() is None:
        pytest.skip("renameat2 is not available here")
    return request.param


def staging_leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def race(monkeypatch, before_publish) -> None:
    """Make ``before_publish(dst)`` run right before the output is moved into place."""
    real = convert_module.rename_noreplace

    def racing(src: Path, dst: Path) -> None:
        racing.calls += 1
        if racing.calls == 1:
            before_publish(dst)
        real(src, dst)

    racing.calls = 0
    monkeypatch.setattr(convert_module, "rename_noreplace", racing)


# --- rename_noreplace ---------------------------------------------------------------------------


def test_rename_noreplace_moves_files_and_folders(tmp_path, rename_kind):
    (tmp_path / "f").write_text("mine")
    rename_noreplace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "mine" and not (tmp_path / "f").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    rename_noreplace(tmp_path / "d", tmp_path / "e")
    assert (tmp_path / "e" / "x").read_text() == "x" and not (tmp_path / "d").exists()


@pytest.mark.parametrize("what", ["file", "empty-folder", "folder", "dangling-link"])
@pytest.mark.parametrize("moved", ["file", "folder"])
def test_rename_noreplace_never_replaces(tmp_path, rename_kind, what, moved):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if moved == "file":
        src.write_text("mine")
    else:
        src.mkdir()
        (src / "inside").write_text("mine")
    if what == "file":
        dst.write_text("theirs")
    elif what == "dangling-link":
        dst.symlink_to(tmp_path / "nowhere")
    else:
        dst.mkdir()
        if what == "folder":
            (dst / "theirs").write_text("theirs")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.exists()  # the output is still where it was
    if what == "file":
        assert dst.read_text() == "theirs"
    elif what == "dangling-link":
        assert dst.is_symlink()
    else:
        assert sorted(p.name for p in dst.iterdir()) == (
            [] if what == "empty-folder" else ["theirs"]
        )


# --- races --------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["gguf", "hf", "meta"])
def test_destination_created_during_conversion_is_not_replaced(
    source, tmp_path, monkeypatch, rename_kind, to
):
    dst = tmp_path / ("out.gguf" if to == "gguf" else "out")
    race(monkeypatch, lambda d: d.write_text("theirs"))
    with pytest.raises(
        LlamalabError, match="appeared during the conversion; nothing was overwritten"
    ):
        convert(source, dst, to=to)
    assert dst.read_text() == "theirs"
    kept = tmp_path / ("out.converted.gguf" if to == "gguf" else "out.converted")
    assert kept.exists()
    assert llamalab.load_config(kept) == llamalab.load_config(source)
    assert staging_leftovers(tmp_path, dst.name) == []


@pytest.mark.parametrize("contents", ["empty", "full"])
def test_folder_created_during_hf_conversion_is_not_replaced(
    source, tmp_path, monkeypatch, rename_kind, contents
):
    # An existing folder is where a plain rename either replaced (empty) or failed with an
    # OSError traceback, leaving the whole staged output behind (non-empty).
    dst = tmp_path / "out"

    def create(d: Path) -> None:
        d.mkdir()
        if contents == "full":
            (d / "theirs").write_text("theirs")

    race(monkeypatch, create)
    with pytest.raises(LlamalabError, match="appeared during the conversion"):
        convert(source, dst, to="hf")
    assert [p.name for p in dst.iterdir()] == ([] if contents == "empty" else ["theirs"])
    assert staging_leftovers(tmp_path, "out") == []


def test_two_conversions_to_one_destination(source, tmp_path, monkeypatch, rename_kind):
    # The second conversion runs start to finish while the first is about to publish: each
    # has its own staging, the second wins, the first says so and deletes nothing of it.
    dst = tmp_path / "out.gguf"
    race(monkeypatch, lambda d: convert(source, d, to="gguf", dtype="q8_0"))
    with pytest.raises(LlamalabError, match="appeared during the conversion"):
        convert(source, dst, to="gguf", dtype="f32")
    assert llamalab.load_model(dst).tok_embeddings.weight.shape == (320, 64)
    assert "Q8_0" in open_checkpoint(dst).stored_types()  # the second conversion's output
    assert (tmp_path / "out.converted.gguf").is_file()
    assert staging_leftovers(tmp_path, "out.gguf") == []


def test_concurrent_cli_conversions_to_one_destination(source, tmp_path):
    # Real processes: exactly one wins, the other fails with one error line; no staging left.
    dst = tmp_path / "out"
    command = [sys.executable, "-m", "llamalab.cli", "convert", str(source), str(dst), "--to", "hf"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    results = [(code, err) for err, code in results]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    for code, err in results:
        assert "Traceback" not in err, err
        if code:
            assert len(err.strip().splitlines()) == 1 and err.startswith("llamalab: error: "), err
            assert "already exists" in err or "appeared during the conversion" in err, err
    assert llamalab.load_config(dst) == llamalab.load_config(source)
    assert staging_leftovers(tmp_path, "out") == []


def test_race_through_the_cli_is_one_error_line(source, tmp_path):
    dst = tmp_path / "out"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from llamalab.checkpoint import convert\n"
        "real = convert.rename_noreplace\n"
        "def racing(src, dst):\n"
        "    Path(dst).mkdir(exist_ok=True); (Path(dst) / 'theirs').write_text('theirs')\n"
        "    real(src, dst)\n"
        "convert.rename_noreplace = racing\n"
        "from llamalab.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", code, "convert", str(source), str(dst), "--to", "hf"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llamalab: error: {dst}: appeared"), lines
    assert (dst / "theirs").read_text() == "theirs"
    assert staging_leftovers(tmp_path, "out") == []


# --- failures and interruptions -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["somefile/out", "somefile/a/b/out"])
def test_destination_under_a_regular_file(source, tmp_path, layout):
    (tmp_path / "somefile").write_text("a file")
    dst = tmp_path / layout
    result = run_cli("convert", str(source), str(dst), "--to", "hf")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    blocker = tmp_path / "somefile"
    assert (
        lines[0] == f"llamalab: error: {dst}: cannot create it: {blocker} is a file, not a folder"
    )
    assert (tmp_path / "somefile").read_text() == "a file"


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError, OSError])
@pytest.mark.parametrize("to", ["hf", "meta"])
def test_staging_is_removed_when_writing_fails(source, tmp_path, monkeypatch, failure, to):
    writer = "write_hf" if to == "hf" else "write_meta"
    real = getattr(convert_module, writer)

    def half_written(reader, folder, *args):
        real(reader, folder, *args)  # a whole output's worth of files, then the failure
        raise failure(28, "No space left on device") if failure is OSError else failure()

    monkeypatch.setattr(convert_module, writer, half_written)
    dst = tmp_path / "out"
    expected = LlamalabError if failure is OSError else failure
    with pytest.raises(expected):
        convert(source, dst, to=to)
    assert not dst.exists()
    assert staging_leftovers(tmp_path, "out") == []


def test_leftover_staging_of_another_run_is_left_alone(source, tmp_path):
    # A staging folder that looks like ours belongs to someone else: never deleted.
    other = tmp_path / ".out.gguf.abcd1234"
    other.mkdir()
    (other / "out.gguf").write_text("in progress")
    old_style = tmp_path / ".out.gguf.partial"
    old_style.write_text("in progress")
    convert(source, tmp_path / "out.gguf", to="gguf")
    assert (other / "out.gguf").read_text() == "in progress"
    assert old_style.read_text() == "in progress"


# --- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("to", ["hf", "meta", "gguf"])
def test_output_gets_ordinary_permissions(source, tmp_path, umask, to):
    old = os.umask(umask)
    try:
        dst = convert(source, tmp_path / ("out.gguf" if to == "gguf" else "out"), to=to)
    finally:
        os.umask(old)
    paths = [dst, *dst.rglob("*")] if dst.is_dir() else [dst]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))
