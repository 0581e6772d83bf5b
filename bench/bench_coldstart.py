"""Cold start: from typing the command to the first generated text, and to the 16th token.

llamalab runs as its users run it: ``llamalab generate -m MODEL -n 16 --temperature 0
-p PROMPT``. llama.cpp runs through llama-cpp-python as its users write it (``Llama``,
then a streamed ``create_completion``). Both at their default threads.

"First-ever run" is llamalab's first on a machine: its cache (``LLAMALAB_CACHE``) is a
new empty folder, so the kernel library is built (once per machine and version) and the
model's weights are packed and written to the packed-weight cache. "First run of the
model" has the kernels built but a new packed-weight cache (``LLAMALAB_PACKED_CACHE``):
a model never seen before. "Later runs" reuse both, as every run after the first does.
``import torch`` is a bare ``python -c "import torch"`` that prints once imported: the
floor that any torch program starts from, measured in the same interleaved run.
llama.cpp (llama-cpp-python) runs where ``import llama_cpp`` works. The model file is in
the page cache for every run of every engine. Runs alternate; medians with min/max.

llamalab's modules are byte-compiled first, as ``pip install`` compiles every installed
package's (llama-cpp-python's and torch's included): under ``PYTHONDONTWRITEBYTECODE``
a source checkout would otherwise recompile its modules at every start, which no
installed copy does.

    python bench/bench_coldstart.py [--model FILE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        args.model = default_model()
    plain = plain_env()
    import llamalab

    package = str(Path(llamalab.__file__).parent)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)
    llamalab_cmd = [llamalab_command(), "generate", "-m", args.model,
                    "-n", str(TOKENS), "--temperature", "0", "--no-server", "-p", PROMPT]  # fmt: skip
    llamacpp_cmd = [sys.executable, "-c", LLAMACPP, args.model, PROMPT, str(TOKENS)]
    torch_cmd = [sys.executable, "-c", "import torch; print('.', flush=True)"]
    probe = [sys.executable, "-c", "import llama_cpp"]
    found = subprocess.run(probe, check=False, env=plain, capture_output=True)
    has_llamacpp = found.returncode == 0
    names = ["llamalab, first-ever run", "llamalab, first run of the model",
             "llamalab, later runs", "import torch"] + (["llama.cpp"] if has_llamacpp else [])  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="llamalab-cache-") as warm:
        env_warm = {**plain, "LLAMALAB_CACHE": warm}
        timed(llamalab_cmd, env_warm)  # the kernels built, the file into the page cache
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="llamalab-cache-") as cache:
                env = {**plain, "LLAMALAB_CACHE": cache}
                results["llamalab, first-ever run"].append(timed(llamalab_cmd, env))
            with tempfile.TemporaryDirectory(prefix="llamalab-packed-") as packed:
                env = {**env_warm, "LLAMALAB_PACKED_CACHE": packed}
                results["llamalab, first run of the model"].append(timed(llamalab_cmd, env))
                results["llamalab, later runs"].append(timed(llamalab_cmd, env))
            results["import torch"].append(timed(torch_cmd, plain))
            if has_llamacpp:
                results["llama.cpp"].append(timed(llamacpp_cmd, plain))
    print(f"\n{Path(args.model).name}: seconds from the command to its first text and to "
          f"{TOKENS} tokens; median [min–max] of {args.repeats}\n")  # fmt: skip
    print(f"{'engine':<34}{'first text s':>22}{f'{TOKENS} tokens s':>22}")
    for name, runs in results.items():
        print(f"{name:<34}{summary([r[0] for r in runs]):>22}{summary([r[1] for r in runs]):>22}")
    later = statistics.median(r[0] for r in results["llamalab, later runs"])
    floor = statistics.median(r[0] for r in results["import torch"])
    print(f"\nlater runs' first text minus import torch: {later - floor:+.2f} s (bar: +0.30 s)")


if __name__ == "__main__":
    main()
