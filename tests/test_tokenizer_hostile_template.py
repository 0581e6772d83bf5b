"""Hostile chat templates stop within their time and size bounds.

A chat template is code from a downloaded file, rendered inside the server. Each
template here used to hang for ever or allocate gigabytes; each must now fail with a
clear error within the render timeout, without the process's memory growing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from llamalab.errors import LlamalabError
from llamalab.tokenizer import ChatTemplate
from llamalab.tokenizer.chat import CHATML_TEMPLATE

USER = [{"role": "user", "content": "Hi"}]
TIMEOUT_S = 1.0

# Templates that only take time: they print nothing, so the deadline is the one bound
# they can reach, on a fast machine as on a slow one.
SLOW = {
    "nested range": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "loop calling filters": (
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% if j|string|length > 5 %}x{% endif %}{% endfor %}{% endfor %}"
    ),
}
# A loop that prints a character per step reaches the time or the size bound first
# depending on the machine's speed (about 4 M steps fill the default budget).
PRINTING_LOOP = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ j|string|length }}"
    "{% endfor %}{% endfor %}"
)
BIG = {
    "string repetition": "{{ 'A' * 1000000000 }}",
    "list repetition": "{{ ['A'] * 1000000000 }}",
    "percent width": "{{ '%1000000000d'|format(1) }}",
    "percent operator": "{{ '%.1000000000f' % 1.0 }}",
    "star width": "{{ '%*d' % (1000000000, 1) }}",
    "str.format width": "{{ '{:>1000000000}'.format(1) }}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "center method": "{{ 'x'.center(1000000000) }}",
    "indent filter": "{{ ('x\\n' * 100000)|indent(100000) }}",
    "replace": "{{ ('x' * 100000).replace('x', 'y' * 100000) }}",
    "join separator": "{{ range(100000)|join('y' * 1000000) }}",
    # A plain {% set %} inside a loop is scoped to one iteration; a namespace carries over.
    "set doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}"
    ),
    "concat doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "aliased literals": (
        "{% set a = 'x' * 1000000 %}{% set b = [a, a, a, a, a, a, a, a] %}"
        "{% set c = [b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c] %}{{ d }}"
    ),
    "recursive macro doubling": (
        "{% macro f(s, n) %}{{ f(s ~ s, n + 1) if n < 64 else s }}{% endmacro %}{{ f('x', 0) }}"
    ),
    "integer power": "{{ 10 ** 1000000000 }}",  # Jinja's ** is left-associative
    "batch fill": "{{ [1]|batch(1000000000, 'x')|list }}",
    "tojson indent": "{{ messages|tojson(indent=1000000000) }}",
    "sum of lists": "{{ ([[0] * 10000] * 10000)|sum(start=[]) }}",
}


def _render_fails(source: str, match: str, **limits: int) -> float:
    template = ChatTemplate(source, name="gguf", timeout_s=TIMEOUT_S, **limits)
    start = time.monotonic()
    with pytest.raises(LlamalabError, match=rf"chat template \(gguf\) {match}"):
        template.render(USER)
    return time.monotonic() - start


@pytest.mark.parametrize("source", SLOW.values(), ids=SLOW.keys())
def test_slow_templates_stop_at_the_deadline(source: str) -> None:
    # A small character budget stands in for a machine fast enough to print that much
    # within the deadline: a slow template must still be stopped by the deadline alone.
    elapsed = _render_fails(source, "took longer than 1 s to render", max_chars=1000)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0


def test_a_printing_loop_stops_at_whichever_bound_comes_first() -> None:
    # Each bound on its own, then both at their defaults: one clear error either way.
    elapsed = _render_fails(PRINTING_LOOP, r"produced more than \d+ characters", max_chars=1000)
    assert elapsed < TIMEOUT_S
    elapsed = _render_fails(PRINTING_LOOP, "took longer than 1 s to render", max_chars=10**9)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.0
    elapsed = _render_fails(
        PRINTING_LOOP, r"(took longer than 1 s to render|produced more than \d+ characters)"
    )
    assert elapsed < TIMEOUT_S + 1.0


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _reset_peak_rss_mb() -> float:
    """Start the peak-RSS count afresh (Linux: write 5 to clear_refs); return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _peak_rss_mb()


@pytest.mark.parametrize("source", BIG.values(), ids=BIG.keys())
def test_big_templates_stop_before_allocating(source: str) -> None:
    before = _reset_peak_rss_mb()
    elapsed = _render_fails(source, "(produced more than|computed an integer)")
    assert elapsed < TIMEOUT_S
    grown_mb = _peak_rss_mb() - before
    assert grown_mb < 300


def test_recursive_macro() -> None:
    source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    elapsed = _render_fails(source, "failed: RecursionError")
    assert elapsed < TIMEOUT_S


def test_output_budget_scales_with_the_messages() -> None:
    template = ChatTemplate(CHATML_TEMPLATE, max_chars=1000)
    long = [{"role": "user", "content": "x" * 100_000}]
    assert len(template.render(long)) > 100_000  # long messages are the caller's
    with pytest.raises(LlamalabError, match="produced more than"):
        ChatTemplate("{{ 'x' * 5000 }}", max_chars=1000).render(USER)
    with pytest.raises(LlamalabError, match="produced more than"):
        ChatTemplate("{% for i in range(5000) %}xx{% endfor %}", max_chars=1000).render(USER)


def test_ordinary_uses_of_the_guarded_operations_still_work() -> None:
    source = (
        "{{ '-' * 3 }}{{ [1, 2] + [3] }}{{ 2 ** 10 }}{{ '%05.1f|%s' % (3.14159, 'a') }}"
        "{{ '{:>4}'.format('b') }}{{ 'c'|center(5) }}{{ 'd\\ne'|indent(2) }}"
        "{{ 'f' ~ 1 ~ none }}{{ ['g', 'h']|join(', ') }}{{ {'k': (1, 2)}|tojson(indent=1) }}"
        "{{ 'aaa'.replace('a', 'bb') }}{{ [[1], [2]]|sum(start=[]) }}"
        "{% for a, b in [(1, 2)] %}{{ a + b }}{% endfor %}"
    )
    assert ChatTemplate(source).render(USER) == (
        '---[1, 2, 3]1024003.1|a   b  c  d\n  ef1Noneg, h{\n "k": [\n  1,\n  2\n ]\n}bbbbbb[1, 2]3'
    )


def test_limits_are_per_thread_and_the_trace_is_restored() -> None:
    """A render times out on its own thread; another thread's render is unaffected."""
    hostile = ChatTemplate(SLOW["nested range"], timeout_s=TIMEOUT_S)
    errors: list[str] = []

    def run() -> None:
        try:
            hostile.render(USER)
        except LlamalabError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=run)
    previous = sys.gettrace()
    thread.start()
    friendly = ChatTemplate(CHATML_TEMPLATE)
    for _ in range(50):
        assert friendly.render(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    thread.join(timeout=TIMEOUT_S + 5)
    assert not thread.is_alive()
    assert errors and "took longer than" in errors[0]
    assert sys.gettrace() is previous


def test_oom_template_in_a_fresh_process() -> None:
    """The reported case: ``'A' * 10**9`` once grew a process to 22.5 GB."""
    code = (
        "from llamalab.tokenizer import ChatTemplate\n"
        "from llamalab.errors import LlamalabError\n"
        "t = ChatTemplate(\"{{ 'A' * 1000000000 }}\", name='gguf')\n"
        "try:\n"
        "    t.render([{'role': 'user', 'content': 'Hi'}])\n"
        "except LlamalabError as exc:\n"
        "    print(exc)\n"
        # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status')"
        " if l.startswith('VmHWM')) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[0].startswith("chat template (gguf) produced more than")
    assert int(out[1]) < 500  # MB, the whole interpreter with torch-free imports
