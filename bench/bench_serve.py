"""Throughput of `llamalab serve` with 1, 4 and 8 concurrent clients.

What is measured
----------------
One server (``--max-batch 8``) is started as a user starts it. A batch is 8 completion
requests, each a different prompt, all asking for exactly ``--max-tokens`` tokens
(``ignore_eos``, greedy), so every level does the same work. For each level of
concurrency ``c`` in 1, 4 and 8, ``c`` client threads take requests from the batch until
it is empty (closed loop: a client sends its next request when its answer arrives):

* **requests/s** = 8 / wall time of the batch;
* **generated tokens/s** = the ``usage.completion_tokens`` summed / wall time;
* **latency** = the median time from sending a request to its full answer.

``c = 1`` is serving the 8 requests one after another; the **speed-up** is its wall time
divided by the wall time of ``c = 8``, computed per repeat. The run fails (exit status 1)
when the median speed-up is below ``--min-speedup`` (1.5 by default): continuous
batching that does not beat serving one request at a time is broken. This is a
benchmark's verdict, not a test's: it needs a quiet machine. Levels run round-robin
(1, 4, 8, then again, ``--repeats`` times) so a noisy neighbour on this shared machine
spreads over all of them; the table gives the median with min and max over repeats.
One untimed warm-up batch runs first.

Run::

    .venv/bin/python bench/bench_serve.py                 # 3 repeats, 32 tokens a request
    .venv/bin/python bench/bench_serve.py --repeats 5 --max-tokens 64 --json /tmp/bench_serve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request

from llamalab.serve.launch import ServerProcess

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "My favourite book is",
    "In 1969, the first person to walk on the Moon was",
    "A haiku about the sea:\n",
]
LEVELS = (1, 4, 8)


def complete(url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """One non-streamed completion; returns (generated tokens, seconds)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return usage["completion_tokens"], time.perf_counter() - t0


def run_batch(url: str, clients: int, max_tokens: int) -> dict[str, float]:
    """Send the 8 prompts with ``clients`` closed-loop client threads; time the whole batch."""
    todo = list(enumerate(PROMPTS))
    lock = threading.Lock()
    results: list[tuple[int, float]] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, prompt = todo.pop(0)
            tokens, seconds = complete(url, prompt, max_tokens)
            with lock:
                results.append((tokens, seconds))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in results)
    assert len(results) == len(PROMPTS) and tokens == len(PROMPTS) * max_tokens, results
    return {
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "latency_s": statistics.median(s for _, s in results),
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of 1, 4, 8 clients (default: %(default)s)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=32,
        help="tokens generated per request (default: %(default)s)",
    )
    parser.add_argument(
        "--ctx", type=int, default=512, help="server context per request (default: %(default)s)"
    )
    parser.add_argument(
        "--min-speedup",
        type=float,
        default=1.5,
        help="fail when 8 concurrent clients are not this much faster than 1 "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", default=None, help="also write the raw runs to this file")
    args = parser.parse_args()

    server_args = ["--max-batch", "8", "--ctx", str(args.ctx)] + (
        ["--model", args.model] if args.model else []
    )
    runs: dict[int, list[dict[str, float]]] = {c: [] for c in LEVELS}
    with ServerProcess(server_args) as server:
        print(f"server {server.url}: {server.health()}", file=sys.stderr)
        run_batch(server.url, 8, args.max_tokens)  # warm-up: first-use allocations, caches
        for repeat in range(args.repeats):
            for clients in LEVELS:
                run = run_batch(server.url, clients, args.max_tokens)
                runs[clients].append(run)
                print(
                    f"repeat {repeat + 1}/{args.repeats}, {clients} client(s): {run['wall_s']:.2f} s, "
                    f"{run['tokens_per_s']:.1f} tok/s",
                    file=sys.stderr,
                )

    print(f"\n8 requests x {args.max_tokens} tokens, median (min–max) over {args.repeats} repeats")
    print(
        f"{'clients':>7} | {'requests/s':>22} | {'generated tokens/s':>22} | {'median latency (s)':>22}"
    )
    for clients in LEVELS:
        r = runs[clients]
        print(
            f"{clients:>7} | {summary([x['requests_per_s'] for x in r]):>22} | "
            f"{summary([x['tokens_per_s'] for x in r]):>22} | {summary([x['latency_s'] for x in r]):>22}"
        )
    speedups = [seq["wall_s"] / conc["wall_s"] for seq, conc in zip(runs[1], runs[8], strict=True)]
    print(f"speed-up of 8 concurrent over 8 sequential: {summary(speedups).strip()}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"max_tokens": args.max_tokens, "runs": runs, "speedups": speedups}, f, indent=2
            )
    median = statistics.median(speedups)
    if median < args.min_speedup:
        print(f"FAIL: median speed-up {median:.2f}x is below {args.min_speedup}x", file=sys.stderr)
        return 1
    print(f"ok: median speed-up {median:.2f}x ≥ {args.min_speedup}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
