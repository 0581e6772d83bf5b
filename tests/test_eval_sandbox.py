"""Generated code runs in a limited subprocess: right code passes, wrong and runaway code
fails within its limits, and the evaluating process is untouched."""

from __future__ import annotations

import os
import resource
import time

import pytest

from llamalab.eval import data
from llamalab.eval.sandbox import Limits, run_program

LIMITS = Limits(timeout_s=6.0, cpu_s=2, memory_bytes=512 << 20, file_bytes=1 << 20)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def _limits_now():
    return [
        resource.getrlimit(r)
        for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE)
    ]


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_program(SOLUTION + TESTS, LIMITS).passed
    wrong = run_program(SOLUTION.replace("a + b", "a - b") + TESTS, LIMITS)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr_tail


@pytest.mark.parametrize(
    ("name", "source", "statuses"),
    [
        # SIGXCPU at the CPU limit; on a machine busy with other work the CPU time can
        # lag the wall clock enough for the wall-clock timeout to come first.
        ("infinite loop", "while True:\n    pass\n", {"killed", "timeout"}),
        ("sleeping", "import time\ntime.sleep(600)\n", {"timeout"}),  # no CPU: the wall clock
        ("memory bomb", "x = bytearray(4 << 30)\n", {"failed", "killed"}),
        ("growing list", "x = []\nwhile True:\n    x.append(' ' * 10**6)\n", {"failed", "killed"}),
        ("huge file", "open('big', 'wb').write(b'x' * (64 << 20))\n", {"failed", "killed"}),
        ("early exit", "import sys\nsys.exit(0)\n" + TESTS, {"failed"}),
    ],
)
def test_runaway_programs_are_stopped_within_their_limits(name, source, statuses, tmp_path):
    before, cwd, started = _limits_now(), os.getcwd(), time.monotonic()
    result = run_program(SOLUTION + source, LIMITS)
    assert result.status in statuses, (name, result)
    assert not result.passed
    assert time.monotonic() - started < LIMITS.timeout_s + 5
    # The evaluating process keeps its own limits, folder, and ability to work.
    assert _limits_now() == before and os.getcwd() == cwd
    assert sum(range(1000)) == 499500 and bytearray(64 << 20)


def test_the_program_runs_in_its_own_folder_which_is_removed():
    result = run_program(
        "import os, pathlib\npathlib.Path('here.txt').write_text(os.getcwd())\n"
        "print(os.getcwd())\n",
        LIMITS,
    )
    assert result.passed
    leftovers = [p for p in os.listdir("/tmp") if p.startswith("llamalab-sandbox-")]
    assert not any(os.path.exists(f"/tmp/{p}/here.txt") for p in leftovers)


@pytest.mark.skipif(not data.available("humaneval"), reason=f"needs {data.INSTALL_LINE}")
def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail():
    from llamalab.eval.tasks import load_task
    from llamalab.eval.tasks.humaneval import program

    task = load_task("humaneval", limit=3)
    for item in task.items:
        assert run_program(program(item, item.extra["canonical_solution"])).passed
        assert not run_program(program(item, "    pass\n")).passed
