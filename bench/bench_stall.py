"""Do streams that are decoding stall while the server admits a long prompt?

What is measured
----------------
One server (``--max-batch 5``) is started as a user starts it. Four clients stream long
completions (greedy, ``ignore_eos``) and note when each token arrives. Once every stream
has decoded for ``--warmup`` seconds, a fifth request arrives with a prompt of
``--prompt-tokens`` token ids (about 2,000) and asks for one token; its prefill is the
*admission*, from sending it until its answer arrives.

For each stream the gaps between consecutive tokens are split in two: gaps that ended
before the admission began give the **median gap**; gaps that ended during the admission
(up to its end) give the **max gap during admission**. The bar: for every stream, the
max gap during admission is at most 3× its median gap (a prompt admitted in chunks
between decode steps, not all at once).

Run on a quiet machine (figures from a shared one say little)::

    .venv/bin/python bench/bench_stall.py
    .venv/bin/python bench/bench_stall.py --prompt-tokens 2000 --json /tmp/bench_stall.json

Exit status: 0 when every stream meets the bar, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llamalab.serve.launch import ServerProcess

STREAMS = 4
BAR = 3.0  # the largest gap during admission, in median gaps


class Stream:
    """One streaming client: the arrival time of every token, until told to stop."""

    def __init__(self, port: int, prompt: str, max_tokens: int) -> None:
        self.port = port
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request(
                "POST",
                "/v1/completions",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
            while not self.stop.is_set():
                line = response.readline()
                if not line or line.startswith(b"data: [DONE]"):
                    break
                if line.startswith(b"data: "):
                    self.arrivals.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            self.error = exc
        finally:
            conn.close()


def long_prompt_ids(model: str | None, tokens: int) -> list[int]:
    """``tokens`` ids of ordinary text, new on every run (so no cached prefix helps)."""
    from llamalab.runtime import resolve_model_ref
    from llamalab.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(resolve_model_ref(model)))
    words = f"run {time.time_ns()}: the quick brown fox jumps over the lazy dog near the river. "
    ids = tokenizer.encode(words * (tokens // 8 + 10))
    return ids[:tokens]


def admit(port: int, prompt_ids: list[int]) -> tuple[float, float]:
    """Send the long prompt (one token asked); return when it was sent and answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt_ids, "max_tokens": 1, "temperature": 0})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    end = time.perf_counter()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"the long prompt failed: {response.status} {data[:300]!r}")
    return start, end


def gaps(arrivals: list[float], start: float, end: float) -> tuple[list[float], list[float]]:
    """Gaps that ended before ``start``, and gaps that ended in [start, end]."""
    before, during = [], []
    for prev, now in itertools.pairwise(arrivals):
        if now < start:
            before.append(now - prev)
        elif now <= end:
            during.append(now - prev)
    # The gap still open when the admission ended counts too: a stream that got no token
    # at all during the admission stalled for all of it.
    after = [t for t in arrivals if t > end]
    if after:
        last = max((t for t in arrivals if t <= end), default=start)
        during.append(after[0] - last)
    return before, during


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=2000,
        help="tokens in the prompt admitted mid-stream (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds the streams decode before the admission (default: %(default)s)",
    )
    parser.add_argument(
        "--ctx", type=int, default=4096, help="server context per request (default: %(default)s)"
    )
    parser.add_argument("--json", default=None, help="also write the raw arrivals to this file")
    args = parser.parse_args()

    prompt_ids = long_prompt_ids(args.model, args.prompt_tokens)
    server_args = ["--max-batch", str(STREAMS + 1), "--ctx", str(args.ctx)]
    server_args += ["--model", args.model] if args.model else []
    with ServerProcess(server_args) as server:
        print(f"server {server.url}: {server.health()}", file=sys.stderr)
        streams = [
            # Room to decode for the whole measurement without reaching the context's end.
            Stream(server.port, f"Story {i}: once upon a time, in a land far away,", args.ctx // 2)
            for i in range(STREAMS)
        ]
        for stream in streams:
            stream.thread.start()
        deadline = time.perf_counter() + 300
        # Every stream decodes, and has for the warm-up, before the long prompt arrives.
        while not all(len(s.arrivals) > 2 for s in streams) or (
            time.perf_counter() - min(s.arrivals[0] for s in streams) < args.warmup
        ):
            ended = any(not s.thread.is_alive() for s in streams)
            if ended or time.perf_counter() > deadline:
                raise SystemExit(f"the streams did not start: {[s.error for s in streams]}")
            time.sleep(0.05)
        start, end = admit(server.port, prompt_ids)
        time.sleep(max(1.0, 0.2 * (end - start)))  # a few tokens after the admission
        for stream in streams:
            stream.stop.set()
        for stream in streams:
            stream.thread.join(30)

    print(
        f"\n{STREAMS} streams decoding; a {len(prompt_ids)}-token prompt admitted in "
        f"{end - start:.2f} s"
    )
    print(
        f"{'stream':>6} | {'median gap (ms)':>15} | {'max gap during (ms)':>19} | {'ratio':>6} | ok"
    )
    ok_all = True
    report = []
    for i, stream in enumerate(streams):
        before, during = gaps(stream.arrivals, start, end)
        if not before or not during:
            print(f"{i:>6} | not enough tokens ({len(before)} before, {len(during)} during)")
            ok_all = False
            continue
        median, worst = statistics.median(before), max(during)
        ok = worst <= BAR * median
        ok_all &= ok
        print(
            f"{i:>6} | {median * 1e3:>15.1f} | {worst * 1e3:>19.1f} | {worst / median:>6.2f} | "
            f"{'yes' if ok else 'NO'}"
        )
        report.append({"median_gap_s": median, "max_gap_during_s": worst, "ok": ok})
    verdict = "met" if ok_all else "NOT met"
    print(f"bar: max gap during admission ≤ {BAR:g}x median gap: {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "prompt_tokens": len(prompt_ids),
                    "admission": [start, end],
                    "streams": report,
                    "arrivals": [s.arrivals for s in streams],
                },
                f,
                indent=2,
            )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
