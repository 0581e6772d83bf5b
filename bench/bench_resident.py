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
import statistics
import sys
from pathlib import Path

from _common import (
    LLAMACPP,
    PROMPT,
    TOKENS,
    default_model,
    llamalab_command,
    plain_env,
    summary,
    timed,
)


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
        args.model = default_model()
    from llamalab.serve.launch import ServerProcess

    plain = plain_env()
    llamalab = llamalab_command()
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
            timed(command, cmd_env, silent=command[-1] == "pass")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (command, cmd_env) in commands.items():
                results[name].append(timed(command, cmd_env, silent=command[-1] == "pass"))
    finally:
        server.stop()
    print(f"model {Path(args.model).name}, {TOKENS} tokens, {args.repeats} interleaved runs")
    print(f"{'':34s} {'first output, s':>26s} {'end, s':>26s}")
    for name, runs in results.items():
        firsts, ends = zip(*runs, strict=True)
        print(f"{name:34s} {summary(list(firsts), 3):>26s} {summary(list(ends), 3):>26s}")
    if have_llamacpp:
        ratio = statistics.median(r[0] for r in results["llamalab generate, resident"]) / (
            statistics.median(r[0] for r in results["llama.cpp, fresh process"])
        )
        print(f"resident first output / llama.cpp's: {ratio:.2f}×")
    else:
        print("llama-cpp-python is not installed: no llama.cpp figure")


if __name__ == "__main__":
    main()
