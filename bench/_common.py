"""What the benchmarks share: the prompt, llama-cpp-python's fresh-process script, a clean
environment, the timing of a fresh process to its first byte of output, and running one
worker function of a bench script in a fresh interpreter.

The bench scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The history of the llama begins in the high Andes, where"
TOKENS = 16

# llama.cpp as llama-cpp-python's users write it: ``Llama``, then a streamed completion.
# argv: model path, prompt, tokens.
LLAMACPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False)
for chunk in llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"])
    sys.stdout.flush()
"""


def default_model() -> str:
    """The default model's path (SmolLM2-135M-Instruct, or ``$LLAMALAB_MODEL``)."""
    from llamalab.default_model import default_model_path

    return str(default_model_path())


def plain_env() -> dict[str, str]:
    """This environment without the OMP_, LLAMALAB_ and TORCHINDUCTOR_ settings: each engine
    runs at its own defaults."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "LLAMALAB_", "TORCHINDUCTOR_"))
    }


def llamalab_command() -> str:
    """The ``llamalab`` script of this interpreter's environment."""
    return str(Path(sys.executable).parent / "llamalab")


def timed(command: list[str], env: dict[str, str], *, silent: bool = False) -> tuple[float, float]:
    """Seconds to the first byte of output, and to the end. A command that fails, or that
    prints nothing when not ``silent``, raises."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0 or (not first and not silent):
        raise RuntimeError(f"{command[:4]} failed")
    return t_first, time.perf_counter() - start


def summary(values: list[float], digits: int = 2) -> str:
    """Median [min–max] of ``values``, with ``digits`` decimals."""
    return (
        f"{statistics.median(values):6.{digits}f} "
        f"[{min(values):.{digits}f}–{max(values):.{digits}f}]"
    )


def in_fresh_process(module: str, kind: str, *args: object) -> object:
    """``module.worker_<kind>(*args)`` in a fresh interpreter, with OpenMP at its defaults
    (each side as its users run it); its JSON result. A failing worker ends the bench."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("OMP_WAIT_POLICY", None)
    code = (
        f"import json, sys; sys.path.insert(0, sys.argv[1]); import {module} as b; "
        f"print(json.dumps(b.worker_{kind}(*json.loads(sys.argv[2]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
