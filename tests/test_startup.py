"""A fresh command's start: what it imports, what it allocates, and the packed weights it maps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamalab.cli.options import context_in_use


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "ctx", "slots"),
    [(2, 1, 2048, 256), (300, 16, 2048, 512), (100, 5000, 2048, 2048), (3000, 1, 2048, 2048)],
)
def test_the_kv_cache_holds_the_request_not_the_models_maximum(prompt, max_tokens, ctx, slots):
    assert context_in_use(prompt, max_tokens, ctx) == slots


def _python(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_parser_imports_only_the_chosen_commands_module():
    code = (
        "import sys; from llamalab.cli import build_parser; "
        "build_parser(['generate', '-p', 'serve']).parse_args(['generate', '-p', 'serve']); "
        "print(sorted(m for m in sys.modules if m.startswith('llamalab.cli.')))"
    )
    loaded = _python(code)
    assert "llamalab.cli.generate" in loaded
    for other in ("serve", "info", "eval", "train", "convert"):
        assert f"llamalab.cli.{other}'" not in loaded


def test_every_command_still_parses_and_helps():
    from llamalab.cli import COMMANDS, build_parser

    for name, _, _ in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            build_parser([name, "--help"]).parse_args([name, "--help"])
        assert exit_.value.code == 0


def test_generate_starts_importing_torch_before_its_other_imports():
    """torch imports in the background while the command imports the rest and reads the
    tokenizer: anything that imported torch before that would make the two run one after
    the other, and imports before it would not overlap it."""
    code = """
import sys
import llamalab.startup as rt

def start():
    print("torch" in sys.modules, "llamalab.tokenizer" in sys.modules, "jinja2" in sys.modules)
    raise SystemExit(0)

rt.import_torch_in_background = start
from llamalab.cli import main
main(["generate", "--no-server", "-n", "1", "-p", "Hello"])
"""
    assert _python(code).split() == ["False", "False", "False"]


def test_a_load_leaves_the_garbage_collector_as_it_found_it(smollm2_path):
    """The load pauses the collector (its start-up builds hundreds of thousands of
    objects) and then leaves it as it was; it freezes nothing, so a dropped model (the
    packed one holds reference cycles) is freed."""
    code = f"""
import gc, weakref
from llamalab.runtime import load_runtime
from llamalab.startup import paused_gc
with paused_gc():
    assert not gc.isenabled()
assert gc.isenabled()
model, tokenizer = load_runtime({str(smollm2_path)!r})
print(gc.isenabled(), gc.get_freeze_count())
gone = weakref.ref(model)
del model, tokenizer
gc.collect()
print(gone() is None)
gc.disable()
load_runtime({str(smollm2_path)!r})
print(gc.isenabled())
"""
    assert _python(code).split() == ["True", "0", "True", "False"]


def test_a_command_freezes_what_its_load_built(smollm2_path):
    """A command keeps its model to the end: after its load the collector runs again,
    with torch's objects and the model frozen out of its sight."""
    code = f"""
import gc
import llamalab.cli.generate as g
from llamalab.cli import main
load = g.load_runtime_from_args

def loaded(args):
    out = load(args)
    print(gc.isenabled(), gc.get_freeze_count() > 100_000)
    raise SystemExit(0)

g.load_runtime_from_args = loaded
main(["generate", "--no-server", "-m", {str(smollm2_path)!r}, "-n", "1", "-p", "Hi"])
"""
    assert _python(code).split() == ["True", "True"]


def test_a_later_run_maps_the_weights_and_answers_the_same(smollm2_path, tmp_path):
    cmd = [
        sys.executable, "-m", "llamalab", "generate", "--no-server", "-m", str(smollm2_path),
        "-n", "4", "--temperature", "0", "--json", "-p", "The llama is",
    ]  # fmt: skip

    def ids(cache: str) -> list[int]:
        env = {**os.environ, "LLAMALAB_PACKED_CACHE": cache}
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["ids"]

    expected = ids("0")  # packed in memory, no cache
    folder = tmp_path / "packed"
    assert ids(str(folder)) == expected  # packs and writes
    (written,) = folder.glob("*.llpack")
    stamp = written.stat().st_mtime_ns
    assert ids(str(folder)) == expected  # maps it
    assert written.stat().st_mtime_ns == stamp  # not written again
