"""Hostile and careless command lines: one clear error, never a traceback, never a hang.

Every case here was once a traceback or a hang; each runs the real ``llamalab`` command
in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_tiny_gguf


def run_raw(args: list[str | bytes], stdin: bytes | None = None, timeout: float = 120):
    """Run ``llamalab`` with byte-level arguments and stdin (invalid UTF-8 included)."""
    return subprocess.run(
        [sys.executable, "-m", "llamalab", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=timeout,
        env={**os.environ},
        check=False,
    )


def assert_one_line_error(returncode: int, stderr: str | bytes, *needles: str) -> str:
    """Exit status 1 and a single ``llamalab: error:`` line that names the problem."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    assert returncode == 1, text
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("llamalab: error: "), text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_usage_error(result, *needles: str) -> None:
    """argparse's refusal: exit status 2, the usage and one error line naming the option."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)


def test_invalid_utf8_on_stdin():
    result = run_raw(["generate"], stdin=b"\xff")
    assert_one_line_error(result.returncode, result.stderr, "not valid UTF-8", "0xff")


def test_invalid_utf8_in_an_argument():
    result = run_raw(["tokenize", b"a\xffb"])
    assert_one_line_error(result.returncode, result.stderr, "not valid UTF-8", "0xff")
    result = run_raw(["generate", b"\xfe prompt"])
    assert_one_line_error(result.returncode, result.stderr, "not valid UTF-8", "0xfe")


def test_tokenize_reads_stdin(smollm2_path):
    result = run_raw(["tokenize", "--model", str(smollm2_path), "--json"], stdin=b"Hello")
    assert result.returncode == 0, result.stderr
    assert b'"ids"' in result.stdout


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--seed", str(2**70)),
        ("--seed", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--repeat-penalty", "nan"),
        ("--top-p", "nan"),
        ("--max-tokens", "0"),
        ("--ctx", "-5"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(option, value):
    assert_usage_error(run_cli("generate", "hi", option, value), option)


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("--top-p", "1e-300", "top_p"),
        ("--repeat-penalty", "1e-40", "repeat_penalty"),
        ("--temperature", "-1", "temperature"),
        ("--min-p", "2", "min_p"),
    ],
)
def test_out_of_range_sampling_values_name_the_field(option, value, field):
    # Checked before the model loads, so this is quick.
    result = run_cli("generate", "hi", option, value)
    assert_one_line_error(result.returncode, result.stderr, field)


def test_device_file_as_model():
    for command in (["info", "/dev/zero"], ["generate", "hi", "--model", "/dev/zero"]):
        result = run_cli(*command)
        assert_one_line_error(result.returncode, result.stderr, "/dev/zero", "not a regular file")


# --------------------------------------------------------------------------- chat templates
def tiny_model_with_template(path: Path, vocab_source: Path, template: str) -> Path:
    """A 1-layer random model carrying ``vocab_source``'s tokenizer and the given chat template."""
    return write_tiny_gguf(path, vocab_source, chat_template=template)


@pytest.mark.parametrize(
    ("name", "template"),
    [
        (
            "nested-loops",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
        ("huge-string", "{{ 'A' * 1000000000 }}"),
    ],
)
def test_hostile_chat_template_is_stopped(tmp_path, smollm2_path, name, template):
    model = tiny_model_with_template(tmp_path / f"{name}.gguf", smollm2_path, template)
    start = time.monotonic()
    result = run_cli("generate", "--chat", "hello", "--model", str(model), "--max-tokens", "2")
    elapsed = time.monotonic() - start
    assert_one_line_error(result.returncode, result.stderr, "chat template")
    assert elapsed < 60, elapsed


def test_a_harmless_template_still_runs(tmp_path, smollm2_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tiny_model_with_template(tmp_path / "ok.gguf", smollm2_path, template)
    result = run_cli(
        "generate", "--chat", "hello", "--model", str(model), "--max-tokens", "2", "--json"
    )
    assert result.returncode == 0, result.stderr


def test_help_tokenize_and_info_never_load_torch(smollm2_path):
    """--help, tokenize and info on a GGUF are light: they load no torch."""
    code = (
        "import sys, contextlib, io\n"
        "from llamalab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"    main(['tokenize', '--model', {str(smollm2_path)!r}, 'Hello'])\n"
        f"    main(['info', {str(smollm2_path)!r}])\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    start = time.monotonic()
    assert run_cli("--help").returncode == 0
    assert run_cli("--version").returncode == 0
    assert time.monotonic() - start < 5  # two fresh interpreters; each was ~0.1 s here
