"""A resident model: a fresh ``llamalab generate`` answered by a running ``llamalab serve``.

A server holds the model (started once, here, as a user would: ``llamalab serve -m
MODEL``, at its defaults). Then fresh processes are timed from the command to their first
byte of output and to their end:

* ``llamalab generate -m MODEL -n 16 --temperature 0 -p PROMPT``, which finds the server
  (``$LLAMALAB_SERVER``) holding the same file and streams its reply;
* llama-cpp-python in a fresh process on the same file and prompt, as its users write it
  (``Llama``, then a streamed ``create_completion``), when it is installed;
* ``llamalab generate --no-server``, the same command loading the model itself;
* ``python -c pass``, the interpreter's own start, as the floor of any Python command.

Runs alternate; medians with min/max. The file is in the page cache for all.

    python bench/bench_resident.py [--model FILE] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The history of the llama begins in the high Andes, where"
TOKENS = 16

LLAMACPP = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, verbose=False)
for chunk in llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"])
    sys.stdout.flush()
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds to the first byte of output, and to the end."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0 or (not first and command[-1] != "pass"):
        raise RuntimeError(f"{command[:4]} failed")
    return t_first, time.perf_counter() - start


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f} [{min(values):.3f}–{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-cold", action="store_true", help="leave out `llamalab generate --no-server`"
    )
    args = parser.parse_args()
    if args.model is None:
        from llamalab.default_model import default_model_path

        args.model = str(default_model_path())
    from llamalab.serve.launch import ServerProcess

    plain = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OMP_", "LLAMALAB_", "TORCHINDUCTOR_"))
    }
    llamalab = str(Path(sys.executable).parent / "llamalab")
    generate = [llamalab, "generate", "-m", args.model, "-n", str(TOKENS),
                "--temperature", "0", "-p", PROMPT]  # fmt: skip
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    server = ServerProcess(["--model", args.model]).start()
    try:
        env = {**plain, "LLAMALAB_SERVER": server.url}
        commands["llamalab generate, resident"] = (generate, env)
        if have_llamacpp:
            llamacpp = [sys.executable, "-c", LLAMACPP, args.model, PROMPT, str(TOKENS)]
            commands["llama.cpp, fresh process"] = (llamacpp, plain)
        if not args.no_cold:
            commands["llamalab generate --no-server"] = ([*generate, "--no-server"], plain)
        commands["python -c pass"] = ([sys.executable, "-c", "pass"], plain)
        for command, cmd_env in commands.values():  # warm: page cache, server's first request
            timed(command, cmd_env)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (command, cmd_env) in commands.items():
                results[name].append(timed(command, cmd_env))
    finally:
        server.stop()
    print(f"model {Path(args.model).name}, {TOKENS} tokens, {args.repeats} interleaved runs")
    print(f"{'':34s} {'first output, s':>26s} {'end, s':>26s}")
    for name, runs in results.items():
        firsts, ends = zip(*runs, strict=True)
        print(f"{name:34s} {summary(list(firsts)):>26s} {summary(list(ends)):>26s}")
    if have_llamacpp:
        ratio = statistics.median(r[0] for r in results["llamalab generate, resident"]) / (
            statistics.median(r[0] for r in results["llama.cpp, fresh process"])
        )
        print(f"resident first output / llama.cpp's: {ratio:.2f}×")
    else:
        print("llama-cpp-python is not installed: no llama.cpp figure")


if __name__ == "__main__":
    main()
