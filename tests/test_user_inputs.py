"""What users hand llamalab on the command line and in files: one clear line for each mistake.

Thread counts far past the CPUs, FIFOs and devices where a file is expected, empty or
one-line tokenizer corpora, a byte-order mark opening a file, ``info -m``. Commands run
in-process through ``llamalab.cli.main`` where they stop before loading a model (fast);
every read that a FIFO could block runs under an alarm, so a regression fails instead of
hanging the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llamalab import files
from llamalab.cli import build_parser, main
from llamalab.errors import LlamalabError

BOM = "\ufeff".encode()  # U+FEFF in UTF-8, as Python's utf-8-sig codec writes it


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail (rather than hang the suite) when the body blocks, e.g. opening a FIFO."""

    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``llamalab ARGV`` in-process: (exit status, stdout, stderr); argparse exits are caught."""
    with deadline():
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *needles: str) -> str:
    """Exit 1 and one ``llamalab: error:`` line holding every needle."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llamalab: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    assert stat.S_ISFIFO(os.stat(path).st_mode)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Enough distinct text for a 300-piece vocabulary."""
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    lines = [
        " ".join(f"{words[(i * 7 + j) % 12]}{(i * j) % 97}" for j in range(10)) for i in range(200)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- threads
def cpus() -> int:
    return os.cpu_count() or 1


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "-t", "100000"],
        ["generate", "hi", "--threads", "100000"],
        ["chat", "-t", "100000"],
        ["serve", "-t", "100000"],
        ["eval", "--task", "mmlu", "-t", "100000"],
        ["tokenizer", "train", "--input", "x", "--vocab-size", "300", "--output", "o",
         "--threads", "100000"],
        ["data", "prepare", "--tokenizer", "t", "--out", "o", "a=b", "--workers", "100000"],
    ],
)  # fmt: skip
def test_thread_counts_past_the_cpus_are_refused_by_the_parser(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "100000" in last and "at most" in last, last
    assert "Traceback" not in last


def test_thread_counts_up_to_four_per_cpu_are_taken():
    args = build_parser().parse_args(["generate", "hi", "-t", str(4 * cpus())])
    assert args.threads == 4 * cpus()
    args = build_parser().parse_args(["generate", "hi", "-t", "1"])
    assert args.threads == 1


def test_runtime_refuses_a_thread_count_past_the_cpus():
    from llamalab.runtime import check_threads

    with pytest.raises(LlamalabError, match="at most"):
        check_threads(100_000)
    check_threads(cpus())


def test_generate_with_100000_threads_is_one_usage_line():
    # It crashed the process (torch's OpenMP pool) after loading the model.
    result = subprocess.run(
        [sys.executable, "-m", "llamalab", "generate", "-t", "100000", "-n", "1", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "argument -t/--threads: at most" in result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- not regular files
def test_file_kinds_are_named():
    assert files.file_kind(stat.S_IFIFO) == "a FIFO (named pipe)"
    assert files.file_kind(os.stat("/dev/zero").st_mode) == "a character device"
    assert files.file_kind(stat.S_IFDIR) == "a folder"
    assert files.file_kind(stat.S_IFSOCK) == "a socket"


def test_bounded_read_names_a_fifo_a_device_and_a_folder(fifo, tmp_path):
    for path, kind in (
        (fifo, "FIFO"),
        (Path("/dev/zero"), "character device"),
        (tmp_path, "folder"),
    ):
        with deadline(), pytest.raises(LlamalabError, match=f"is a {kind}"):
            files.read_file_bounded(path, 100)
    with pytest.raises(LlamalabError, match="no such file"):
        files.read_file_bounded(tmp_path / "missing", 100)


def test_a_fifo_swapped_in_after_the_check_never_blocks(fifo, monkeypatch):
    # The path is checked, then opened: between the two it may become a FIFO with no
    # writer, which a plain open() would wait on forever.
    monkeypatch.setattr(files, "check_regular_file", lambda path: None)
    with deadline(), pytest.raises(LlamalabError, match="is a FIFO"):
        files.open_regular(fifo)


def test_a_sparse_2_gb_file_is_refused_by_its_size(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)
    with deadline(), pytest.raises(LlamalabError, match="2147483648 bytes, more than"):
        files.read_file_bounded(sparse, 1 << 20)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_as_model_and_tokenizer_say_what_they_are(capsys, fifo, kind):
    path, words = (
        (str(fifo), "is a FIFO") if kind == "fifo" else ("/dev/zero", "is a character device")
    )
    for argv in (
        ["info", path],
        ["info", "-m", path],
        ["tokenize", "-m", path, "hi"],
        ["generate", "-m", path, "hi"],
    ):
        code, _, err = run_main(capsys, *argv)
        one_error_line(code, err, path, words)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_as_training_and_data_inputs_say_what_they_are(capsys, tmp_path, fifo, kind):
    path, words = (
        (str(fifo), "is a FIFO") if kind == "fifo" else ("/dev/zero", "is a character device")
    )
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", path, "--vocab-size", "300",
        "--output", str(tmp_path / "tok"),
    )  # fmt: skip
    one_error_line(code, err, path, words)
    code, _, err = run_main(
        capsys, "data", "prepare", "--tokenizer", str(tmp_path), "--out", str(tmp_path / "d"),
        f"a={path}",
    )  # fmt: skip
    one_error_line(code, err, path, words)
    (tmp_path / "text.txt").write_text("some text\n")
    code, _, err = run_main(
        capsys, "data", "prepare", "--tokenizer", path, "--out", str(tmp_path / "d"),
        f"a={tmp_path}/text.txt",
    )  # fmt: skip
    one_error_line(code, err, path, words)


def test_special_files_as_grammar_say_what_they_are(capsys, fifo):
    code, _, err = run_main(capsys, "generate", "hi", "--json-schema", str(fifo))
    one_error_line(code, err, str(fifo), "is a FIFO")
    code, _, err = run_main(capsys, "generate", "hi", "--grammar", "/dev/zero")
    one_error_line(code, err, "/dev/zero", "is a character device")


def test_training_input_opened_as_a_fifo_never_blocks(fifo):
    from llamalab.tokenizer.trainer import iter_sentences

    with deadline(), pytest.raises(LlamalabError, match="is a FIFO"):
        list(iter_sentences([fifo], 100))


# --------------------------------------------------------------------------- --prompt-file
def test_prompt_file_refusals_are_one_line(capsys, tmp_path, fifo):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(2 << 30)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Hello \xff there")
    for path, needles in (
        (tmp_path, ["is a folder"]),
        (fifo, ["is a FIFO"]),
        (Path("/dev/zero"), ["is a character device"]),
        (sparse, ["2147483648 bytes, more than"]),
        (bad, ["not valid UTF-8", "0xff", "offset 6"]),
        (tmp_path / "missing", ["no such file"]),
    ):
        code, _, err = run_main(capsys, "generate", "--prompt-file", str(path))
        one_error_line(code, err, str(path), *needles)


def test_prompt_file_is_given_once(capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hi")
    code, _, err = run_main(capsys, "generate", "-f", str(prompt), "-p", "hi")
    one_error_line(code, err, "give the prompt once")


def test_prompt_file_gives_the_same_ids_as_the_argument(capsys, tmp_path, smollm2_path):
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(BOM + b"The capital of France is")
    common = ["-m", str(smollm2_path), "-n", "1", "--temperature", "0", "--json", "-t", "1"]
    code, out, err = run_main(capsys, "generate", "-f", str(prompt), *common)
    assert code == 0, err
    from_file = json.loads(out)
    code, out, err = run_main(capsys, "generate", "The capital of France is", *common)
    assert code == 0, err
    assert from_file["prompt_ids"] == json.loads(out)["prompt_ids"]  # the BOM is no token


def test_stdin_prompt_is_read_with_a_bound(monkeypatch):
    from llamalab.cli.options import read_text_stdin

    class Stdin:
        buffer = __import__("io").BytesIO(b"x" * 101)

    monkeypatch.setattr(sys, "stdin", Stdin)
    with pytest.raises(LlamalabError, match="longer than 100 bytes"):
        read_text_stdin("prompt", limit=100)


# --------------------------------------------------------------------------- tokenizer train
def test_tokenizer_train_on_an_empty_file_says_so(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", str(empty), "--vocab-size", "300",
        "--output", str(tmp_path / "tok"),
    )  # fmt: skip
    line = one_error_line(code, err, str(empty), "is empty")
    assert ".cc" not in line and "INTERNAL" not in line


def test_tokenizer_train_on_one_line_says_too_little_text(capsys, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("one line\n")
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", str(one), "--vocab-size", "300",
        "--output", str(tmp_path / "tok"),
    )  # fmt: skip
    line = one_error_line(code, err, "too little text", "1 line", str(one), "--vocab-size 300")
    assert ".cc" not in line and "INTERNAL" not in line


def test_tokenizer_train_on_only_overlong_lines_says_they_were_skipped(capsys, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("x" * 10_000)
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", str(long), "--vocab-size", "300",
        "--output", str(tmp_path / "tok"),
    )  # fmt: skip
    one_error_line(code, err, "is empty", "1 line longer than 4192")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seed", "-1"), ("--seed", str(2**32)), ("--max-sentences", str(10**23))],
)
def test_tokenizer_train_numbers_out_of_range_are_one_line(capsys, tmp_path, corpus, option, value):
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
        "--output", str(tmp_path / "tok"), option, value,
    )  # fmt: skip
    one_error_line(code, err, option, value)


def test_tokenizer_train_takes_input_repeated(capsys, tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = tmp_path / "tok"
    code, _, err = run_main(
        capsys, "tokenizer", "train", "--input", str(corpus), "--input", str(empty),
        "--vocab-size", "300", "--output", str(out), "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "training.json").read_text())
    assert [i["path"] for i in record["inputs"]] == [str(corpus), str(empty)]


def test_tokenizer_training_drops_a_leading_byte_order_mark(tmp_path):
    from llamalab.tokenizer.trainer import iter_sentences

    path = tmp_path / "bom.txt"
    path.write_bytes(BOM + b"first\nsecond \xef\xbb\xbf inside\n")
    # utf-8-sig (Python's codec for files that may open with a BOM) is the reference.
    expected = path.read_bytes().decode("utf-8-sig").splitlines()
    assert list(iter_sentences([path], 100)) == expected == ["first", "second \ufeff inside"]


# --------------------------------------------------------------------------- data prepare
def test_data_documents_drop_a_leading_byte_order_mark(tmp_path):
    from llamalab.data.prepare import iter_documents

    path = tmp_path / "bom.txt"
    path.write_bytes(BOM + b"Hello world\n")
    assert list(iter_documents(path)) == [path.read_bytes().decode("utf-8-sig")]


def test_data_prepare_tokens_are_the_same_with_or_without_a_bom(tmp_path, corpus):
    from llamalab.data import parse_sources, prepare
    from llamalab.tokenizer.trainer import train_tokenizer

    tok = train_tokenizer([corpus], 300, tmp_path / "tok", threads=1)
    text = b"alpha1 beta2 gamma3\n"
    (tmp_path / "plain.txt").write_bytes(text)
    (tmp_path / "bom.txt").write_bytes(BOM + text)
    sources = parse_sources([f"plain={tmp_path}/plain.txt", f"bom={tmp_path}/bom.txt"])
    manifest = prepare(sources, tok, tmp_path / "data", workers=1, progress=False)
    assert manifest["sources"]["bom"]["tokens"] == manifest["sources"]["plain"]["tokens"]
    assert (tmp_path / "data" / "bom.bin").read_bytes() == (
        tmp_path / "data" / "plain.bin"
    ).read_bytes()


# --------------------------------------------------------------------------- info
def test_info_takes_the_model_as_m_like_every_command(capsys):
    code, by_position, err = run_main(capsys, "info", "llama-7b", "--json")
    assert code == 0, err
    for flag in ("-m", "--model"):
        code, by_option, err = run_main(capsys, "info", flag, "llama-7b", "--json")
        assert code == 0, err
        assert json.loads(by_option) == json.loads(by_position)
    assert json.loads(by_position)["name"] == "llama-7b"


def test_info_refuses_two_different_models(capsys):
    code, _, err = run_main(capsys, "info", "llama-7b", "-m", "llama-13b")
    one_error_line(code, err, "give the model once")


def test_an_empty_model_path_is_refused(capsys):
    for argv in (["info", ""], ["info", "-m", ""], ["tokenize", "-m", "", "hi"]):
        code, _, err = run_main(capsys, *argv)
        assert code == 2, err
        assert "empty" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- chat on a pipe
def chat_piped(model: Path, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llamalab", "chat", "-m", str(model), "-n", "4", "-t", "1"],
        input=stdin,
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_HISTORY": ""},
        check=False,
    )


def test_piped_chat_reads_each_line_with_a_bound(smollm2_path):
    # input() held a line without end whole (`llamalab chat < /dev/zero`), and tokenized it.
    result = chat_piped(smollm2_path, b"x" * (3 << 20) + b"\n\xff\n/exit\n")
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("llamalab: error:")]
    assert len(errors) == 2, err
    assert "longer than 1048576 bytes" in errors[0]
    assert "not valid UTF-8" in errors[1] and "0xff" in errors[1]


@pytest.mark.parametrize("value", [str(10**30), str(2**63 - 1)])
def test_data_prepare_doc_chars_past_the_bound_is_one_line(capsys, tmp_path, corpus, value):
    code, _, err = run_main(
        capsys, "data", "prepare", "--tokenizer", str(tmp_path), "--out", str(tmp_path / "d"),
        "--doc-chars", value, f"a={corpus}",
    )  # fmt: skip
    one_error_line(code, err, "--doc-chars", value)


def test_library_loaders_name_special_files(tmp_path):
    import llamalab

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for load in (llamalab.load_model, llamalab.load_tokenizer):
        with pytest.raises(LlamalabError, match="is a FIFO"):
            load(str(fifo))
        with pytest.raises(LlamalabError, match="character device"):
            load("/dev/zero")
