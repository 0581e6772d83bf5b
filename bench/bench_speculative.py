"""Prompt lookup decoding: llamalab with and without it, beside llama.cpp, and in the server.

Workloads of real text found on this machine (the same prompts for every engine):

- grounded: replies that quote their input. Rewrite a Python standard-library function
  with an identifier renamed; extract the fields and the changes of the first entry of a
  Debian changelog (``/usr/share/doc/*/changelog.Debian.gz``); answer by quoting the
  sentence of a licence paragraph (``/usr/share/common-licenses``) that holds a word.
- chat: free-form requests (stories, explanations, advice) that quote nothing.

Engines, each in a fresh process per workload and round, at their own defaults apart
from greedy decoding and a context that holds the prompts (llama-cpp-python's default
is 512 tokens; its default thread count, half the cores, is kept):

- llamalab: ``--no-lookup``; llamalab-lookup: prompt lookup (the engine's defaults);
- llama.cpp: llama-cpp-python's plain decoding; llama.cpp-lookup: its
  ``LlamaPromptLookupDecoding`` draft model at its defaults.

Decode tokens/s is wall-clock: the tokens after the first over the time from the first
to the last, summed over the workload's prompts, so every engine is timed the same way.
Rounds interleave the engines (their order rotates), and the table gives the median with
min/max over rounds, with the load average (``/proc/loadavg``) read beside every run:
the machine is shared. llamalab's greedy text with lookup is checked token for token
against its text without.

The server workload (``--server``): one ``llamalab serve --max-batch 8`` answers the
grounded and the chat prompts together, 8 client threads in a closed loop (each sends
its next request when its answer arrives), greedy, with the request field ``lookup``
true or false, the two modes interleaved over rounds on the same server (after one
untimed warm-up pass). Throughput is completion tokens over the wall time of the whole
set; the replies of the two modes are compared text for text, and the drafted and
accepted tokens come from the server's ``/metrics``.

``--model PATH`` runs another GGUF file, e.g. the 0.9B random-weight model
(``artifacts/bench-models/random-0.9b-Q4_0.gguf``, written by ``bench/random_model.py``;
its text is noise, so its acceptance says nothing about real text).

``--paired`` runs llamalab alone, with and without prompt lookup in one process, the two
modes alternating prompt by prompt (which goes first alternating too), on a fresh engine
for every reply: no difference between processes (where a VM's speed can move by 20%
from one process to the next) enters the ratio.

``--draft PATH`` adds the engine llamalab-draft: the ``--model`` file speculating with
this smaller model as its drafter (same vocabulary) instead of prompt lookup, e.g. the
SmolLM2 Q4_1 file drafting for a float32 copy of itself
(``llamalab convert SMOLLM2.gguf smollm2-f32.gguf --to gguf --dtype f32``).

    python bench/bench_speculative.py --rounds 3 --prompts 20 [--max-tokens 128] [--json out.json]
    python bench/bench_speculative.py --server --rounds 3 --prompts 20 [--model PATH]
    python bench/bench_speculative.py --paired --rounds 2 --prompts 20 [--model PATH]
    python bench/bench_speculative.py --model F32.gguf --draft Q4_1.gguf \
        --engines llamalab,llamalab-lookup,llamalab-draft [--workloads grounded]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ENGINES = ("llamalab", "llamalab-lookup", "llama.cpp", "llama.cpp-lookup")
DRAFT_ENGINE = "llamalab-draft"  # with --draft: the draft model instead of prompt lookup
CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me three tips for sleeping better.",
    "Write a poem about autumn leaves.",
    "What are the benefits of learning a second language?",
    "Describe a perfect day at the beach.",
    "How do I make a good cup of tea?",
    "Write a letter to a friend you have not seen in years.",
    "What should I pack for a weekend hiking trip?",
    "Tell me about the history of bicycles.",
    "Why do cats purr?",
    "Suggest a plan for learning to play the guitar.",
    "Write a short speech for a friend's wedding.",
    "What makes a good team leader?",
    "Describe how bread is made.",
    "Invent a new board game and explain its rules.",
    "What are some ways to reduce stress at work?",
    "Write a dialogue between a robot and a gardener.",
    "Explain how rainbows form.",
    "Give me ideas for a birthday party for a seven-year-old.",
    "Describe the life cycle of a butterfly.",
    "Write a haiku sequence about winter mornings.",
]
KEYWORDS = {
    "self", "return", "None", "True", "False", "with", "from", "import", "else", "elif",
    "while", "raise", "except", "class", "lambda", "yield", "assert", "pass", "break",
    "continue", "global", "nonlocal", "finally", "isinstance", "len", "str", "int",
}  # fmt: skip
MAX_SNIPPET_CHARS = 1400


def rename_prompts(rng: random.Random, n: int) -> list[str]:
    """Functions of the standard library with their most used identifier renamed."""
    files = sorted(glob.glob(f"{os.path.dirname(os.__file__)}/*.py"))
    out: list[str] = []
    for path in rng.sample(files, len(files)):
        text = Path(path).read_text(errors="replace")
        for m in re.finditer(r"^def \w+\(.*?(?=^\S)", text, re.DOTALL | re.MULTILINE):
            body = m.group(0).rstrip()
            if not 300 <= len(body) <= MAX_SNIPPET_CHARS:
                continue
            names = Counter(w for w in re.findall(r"\b[a-z_][a-z0-9_]{3,}\b", body))
            names = Counter({k: v for k, v in names.items() if k not in KEYWORDS})
            if not names or names.most_common(1)[0][1] < 3:
                continue
            old = names.most_common(1)[0][0]
            out.append(
                f"Rewrite this Python function with `{old}` renamed to `{old}_value`. "
                f"Reply with the code only.\n\n```python\n{body}\n```"
            )
            break
        if len(out) == n:
            break
    return out


def changelog_prompts(rng: random.Random, n: int) -> list[str]:
    """The first entry of Debian changelogs: its fields and its changes."""
    files = sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz"))
    out: list[str] = []
    for path in rng.sample(files, len(files)):
        try:
            text = gzip.decompress(Path(path).read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        entry = text.split("\n\n -- ", 1)
        if len(entry) < 2:
            continue
        signature = entry[1].split("\n", 1)[0]
        entry = f"{entry[0]}\n\n -- {signature}"
        if not 200 <= len(entry) <= MAX_SNIPPET_CHARS:
            continue
        out.append(
            "From this Debian changelog entry, give the package, the version, the "
            "distribution, the maintainer and the date, then copy the list of changes "
            f"exactly.\n\n{entry}"
        )
        if len(out) == n:
            break
    return out


def quote_prompts(rng: random.Random, n: int) -> list[str]:
    """A licence paragraph and a word of it: quote the sentence that holds the word."""
    paragraphs = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            text = Path(path).read_text(errors="replace")
            paragraphs += [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if 400 <= len(p) <= MAX_SNIPPET_CHARS]
    out = []
    for p in rng.sample(paragraphs, min(n, len(paragraphs))):
        words = [w for w in re.findall(r"\b[a-z]{7,}\b", p)]
        word = rng.choice(words) if words else "the"
        out.append(
            f'Quote, word for word, the sentence of this paragraph that contains "{word}".\n\n{p}'
        )
    return out


def workloads(n: int) -> dict[str, list[str]]:
    """``n`` prompts per workload; the grounded one mixes its three kinds in turn."""
    rng = random.Random(0)
    kinds = [rename_prompts(rng, n), changelog_prompts(rng, n), quote_prompts(rng, n)]
    grounded = [p for group in zip(*kinds, strict=False) for p in group][:n]
    chat = (CHAT * (n // len(CHAT) + 1))[:n]
    return {"grounded": grounded, "chat": chat}


# ------------------------------------------------------------------ workers
def _timed(stream) -> tuple[list[int], float]:
    """Tokens of a stream and the seconds from its first to its last token."""
    ids, first, last = [], None, None
    for token in stream:
        last = time.perf_counter()
        first = first or last
        ids.append(token)
    return ids, (last - first) if ids else 0.0


def llamalab_reply(
    model, tok, text: str, max_tokens: int, lookup: bool, draft=None, draft_tok=None
) -> dict:
    """One greedy reply on a fresh engine: its ids, its tokens after the first and their
    seconds, and its drafted and accepted tokens."""
    from llamalab.generation import GREEDY, Engine, Request
    from llamalab.generation.params import LookupParams

    if tok.chat_template is not None:
        ids = tok.encode_chat([{"role": "user", "content": text}])
    else:
        ids = tok.encode(text)
    engine = Engine(
        model,
        tok,
        max_seq_len=min(2048, len(ids) + max_tokens + 64),
        draft=draft,
        draft_tokenizer=draft_tok,
    )
    request = Request(
        ids, max_tokens=max_tokens, sampling=GREEDY, lookup=LookupParams() if lookup else None
    )
    seq, first = engine.submit(request)

    def tokens():
        yield first.token_id
        while not seq.finished:
            for _, event in engine.step():
                if event.token_id is not None:
                    yield event.token_id

    got, seconds = _timed(tokens())
    return {
        "ids": seq.ids,
        "tokens": len(got),
        "seconds": seconds,
        "drafted": seq.timing.draft_tokens,
        "accepted": seq.timing.accepted_tokens,
    }


def worker_llamalab(
    prompts: list[str],
    max_tokens: int,
    lookup: bool,
    model_path: str | None = None,
    draft_path: str | None = None,
) -> list[dict]:
    from llamalab.runtime import load_runtime

    model, tok = load_runtime(model_path)
    draft, draft_tok = load_runtime(draft_path) if draft_path else (None, None)
    return [llamalab_reply(model, tok, t, max_tokens, lookup, draft, draft_tok) for t in prompts]


def paired(prompts: list[str], max_tokens: int, rounds: int, model_path: str | None) -> dict:
    """llamalab without and with prompt lookup in this process, alternating prompt by
    prompt: each mode's decode tokens/s per round, and whether their texts agree."""
    from llamalab.runtime import load_runtime

    model, tok = load_runtime(model_path)
    rates: dict[str, list[float]] = {"llamalab": [], "llamalab-lookup": []}
    same = total = 0
    for r in range(rounds):
        sums = {mode: [0, 0.0] for mode in rates}
        for i, text in enumerate(prompts):
            order = list(rates) if (i + r) % 2 == 0 else list(rates)[::-1]
            texts = {}
            for mode in order:
                got = llamalab_reply(model, tok, text, max_tokens, mode == "llamalab-lookup")
                sums[mode][0] += max(got["tokens"] - 1, 0)
                sums[mode][1] += got["seconds"]
                texts[mode] = got["ids"]
            same += texts["llamalab"] == texts["llamalab-lookup"]
            total += 1
        for mode, (n, seconds) in sums.items():
            rates[mode].append(n / seconds)
        print(
            f"round {r + 1} " + "  ".join(f"{m} {rates[m][-1]:6.1f} tok/s" for m in rates),
            file=sys.stderr,
        )
    return {"rates": rates, "same": same, "total": total}


def worker_llamacpp(
    prompts: list[str],
    max_tokens: int,
    lookup: bool,
    model_path: str | None = None,
    draft_path: str | None = None,
) -> list[dict]:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from llamalab.default_model import default_model_path

    llm = Llama(
        model_path or str(default_model_path()),
        n_ctx=2048,
        verbose=False,
        draft_model=LlamaPromptLookupDecoding() if lookup else None,
    )
    out = []
    for text in prompts:
        stream = llm.create_chat_completion(
            [{"role": "user", "content": text}],
            temperature=0.0,
            max_tokens=max_tokens,
            stream=True,
        )
        pieces = (
            c["choices"][0]["delta"].get("content")
            for c in stream
            if c["choices"][0]["delta"].get("content")
        )
        got, seconds = _timed(pieces)
        out.append({"tokens": len(got), "seconds": seconds})
    return out


def run_worker(
    engine: str,
    prompts: list[str],
    max_tokens: int,
    model: str | None = None,
    draft: str | None = None,
) -> dict:
    """Run ``engine`` on ``prompts`` in a fresh process; its results and the load beside."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
        done = subprocess.run(
            [sys.executable, __file__, "--worker", engine, "--prompts-file", f.name,
             "--max-tokens", str(max_tokens), *(["--model", model] if model else []),
             *(["--draft", draft] if draft and engine == DRAFT_ENGINE else [])],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-2000:]}")
    return {"load": float(load), "prompts": json.loads(done.stdout.splitlines()[-1])}


def rate(prompts: list[dict]) -> float:
    """Decode tokens/s over a run: tokens after each first one over the time they took.

    llama-cpp-python's stream joins pieces: its count is of text pieces, one per token
    for this tokenizer's plain text."""
    tokens = sum(max(p["tokens"] - 1, 0) for p in prompts)
    seconds = sum(p["seconds"] for p in prompts)
    return tokens / seconds if seconds else 0.0


# ------------------------------------------------------------------ the server
SERVER_STREAMS = 8


def _chat(url: str, prompt: str, max_tokens: int, lookup: bool) -> tuple[str, int]:
    """One greedy chat completion: its text and its completion tokens."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "lookup": lookup,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=1200) as response:
        reply = json.loads(response.read())
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("llamalab_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def serve_pass(url: str, prompts: list[str], max_tokens: int, lookup: bool) -> dict:
    """Every prompt through ``SERVER_STREAMS`` clients in a closed loop: the replies,
    completion tokens over wall time, and the drafts the server counted meanwhile."""
    replies: list[str | None] = [None] * len(prompts)
    tokens = [0] * len(prompts)
    todo = list(range(len(prompts)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            try:
                replies[i], tokens[i] = _chat(url, prompts[i], max_tokens, lookup)
            except BaseException as exc:  # noqa: BLE001 (reported after the pass)
                errors.append(exc)

    before = _scrape(url)
    load = float(Path("/proc/loadavg").read_text().split()[0])
    threads = [threading.Thread(target=client) for _ in range(SERVER_STREAMS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    after = _scrape(url)

    def grew(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    return {
        "replies": replies,
        "tokens": sum(tokens),
        "seconds": seconds,
        "tokens_per_s": sum(tokens) / seconds,
        "drafted": grew("llamalab_draft_tokens_total"),
        "accepted": grew("llamalab_accepted_draft_tokens_total"),
        "load": load,
    }


def serve_bench(args: argparse.Namespace, prompts: list[str]) -> dict:
    """The server workload: lookup on and off, interleaved, on one server."""
    from llamalab.serve.launch import ServerProcess

    server_args = ["--max-batch", str(SERVER_STREAMS), "--ctx", "2048"]
    server_args += ["--model", args.model] if args.model else []
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with ServerProcess(server_args) as server:
        serve_pass(server.url, prompts[:SERVER_STREAMS], 16, True)  # warm-up, untimed
        for r in range(args.rounds):
            modes = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in modes:
                result = serve_pass(server.url, prompts, args.max_tokens, mode == "on")
                runs[mode].append(result)
                print(
                    f"round {r + 1} serve lookup {mode:3} {result['tokens_per_s']:6.1f} tok/s "
                    f"({result['tokens']} tokens, {result['accepted']}/{result['drafted']} "
                    f"accepted/drafted)  load {result['load']:.2f}",
                    file=sys.stderr,
                )
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct Q4_1"
    print(f"{name}, llamalab serve --max-batch {SERVER_STREAMS}, {SERVER_STREAMS} concurrent "
          f"clients, {len(prompts)} prompts (grounded and chat), at most {args.max_tokens} "
          f"tokens each, {args.rounds} rounds, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'lookup':7} {'tokens/s median [min-max]':27} {'accepted/drafted':17} load")
    base = statistics.median(x["tokens_per_s"] for x in runs["off"])
    for mode in ("off", "on"):
        rates = [x["tokens_per_s"] for x in runs[mode]]
        med = statistics.median(rates)
        drafted = sum(x["drafted"] for x in runs[mode])
        accepted = sum(x["accepted"] for x in runs[mode])
        loads = [x["load"] for x in runs[mode]]
        print(
            f"{mode:7} {med:6.1f} [{min(rates):6.1f}-{max(rates):6.1f}] ({med / base:.2f}x)"
            f" {f'{accepted}/{drafted}' if drafted else '-':17}"
            f" {statistics.median(loads):.2f} [{min(loads):.2f}-{max(loads):.2f}]"
        )
    # Every pass stays on the native step, which computes a token bit for bit whatever
    # its pass holds, so greedy replies should not depend on timing: each round of either
    # mode is held to the first lookup-off round (docs/serving.md says what is guaranteed).
    ref = runs["off"][0]["replies"]

    def agree(mode: str, skip: int) -> str:
        pairs = [(a, b) for x in runs[mode][skip:] for a, b in zip(ref, x["replies"], strict=True)]
        return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"

    print(
        f"replies equal to lookup-off round 1: lookup on {agree('on', 0)}, "
        f"lookup off (later rounds) {agree('off', 1)}"
    )
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", default=None, help="write every run's figures here")
    ap.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--draft", default=None, help="a draft model's GGUF file: adds llamalab-draft")
    ap.add_argument("--workloads", default="grounded,chat", help="which of grounded, chat")
    ap.add_argument("--server", action="store_true", help="the server workload instead")
    ap.add_argument(
        "--paired", action="store_true", help="llamalab with and without lookup in one process"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        prompts = json.loads(Path(args.prompts_file).read_text())
        lookup = args.worker.endswith(("-lookup", "-draft"))
        work = worker_llamalab if args.worker.startswith("llamalab") else worker_llamacpp
        print(json.dumps(work(prompts, args.max_tokens, lookup, args.model, args.draft)))
        return
    sets = workloads(args.prompts)
    sets = {w: sets[w] for w in args.workloads.split(",")}
    if args.paired:
        name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct Q4_1"
        print(f"{name}, llamalab with and without prompt lookup in one process, alternating "
              f"prompt by prompt; {args.rounds} rounds, {args.prompts} prompts per workload, "
              f"at most {args.max_tokens} tokens each")  # fmt: skip
        out = {}
        for workload, prompts in sets.items():
            out[workload] = got = paired(prompts, args.max_tokens, args.rounds, args.model)
            plain, fast = got["rates"]["llamalab"], got["rates"]["llamalab-lookup"]
            ratios = [b / a for a, b in zip(plain, fast, strict=True)]
            print(
                f"{workload:9} no lookup {statistics.median(plain):6.1f} "
                f"[{min(plain):.1f}-{max(plain):.1f}]  lookup {statistics.median(fast):6.1f} "
                f"[{min(fast):.1f}-{max(fast):.1f}]  ratio {statistics.median(ratios):.2f}x "
                f"[{min(ratios):.2f}-{max(ratios):.2f}]  same text {got['same']}/{got['total']}"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(out))
        return
    if args.server:
        # Grounded and chat prompts alternate, so every batch holds both kinds.
        mixed = [p for pair in zip(sets["grounded"], sets["chat"], strict=False) for p in pair]
        runs = serve_bench(args, mixed)
        if args.json:
            Path(args.json).write_text(json.dumps(runs))
        return
    engines = args.engines.split(",")
    if args.draft and DRAFT_ENGINE not in engines:
        engines.append(DRAFT_ENGINE)
    if DRAFT_ENGINE in engines and not args.draft:
        raise SystemExit(f"{DRAFT_ENGINE} needs --draft")
    runs: dict[str, dict[str, list[dict]]] = {w: {e: [] for e in engines} for w in sets}
    for r in range(args.rounds):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for workload, prompts in sets.items():
            for engine in order:
                result = run_worker(engine, prompts, args.max_tokens, args.model, args.draft)
                runs[workload][engine].append(result)
                print(
                    f"round {r + 1} {workload:8} {engine:16} {rate(result['prompts']):6.1f} tok/s"
                    f"  load {result['load']:.2f}",
                    file=sys.stderr,
                )
    name = Path(args.model).name if args.model else "SmolLM2-135M-Instruct Q4_1"
    name += f", draft {Path(args.draft).name}" if args.draft else ""
    print(f"{name}, {os.cpu_count()} cores, {args.rounds} rounds, "
          f"{args.prompts} prompts per workload, at most {args.max_tokens} tokens each")  # fmt: skip
    print(
        f"{'workload':9} {'engine':17} {'decode tok/s median [min-max]':31} {'accepted/drafted':17} load"
    )
    for workload in sets:
        base = None
        for engine in engines:
            results = runs[workload][engine]
            rates = [rate(x["prompts"]) for x in results]
            med = statistics.median(rates)
            base = med if engine == "llamalab" else base
            drafted = sum(p.get("drafted", 0) for x in results for p in x["prompts"])
            accepted = sum(p.get("accepted", 0) for x in results for p in x["prompts"])
            ratio = f"{accepted}/{drafted}" if drafted else "-"
            loads = [x["load"] for x in results]
            speedup = f" ({med / base:.2f}x)" if base else ""
            print(
                f"{workload:9} {engine:17} {med:6.1f} [{min(rates):6.1f}-{max(rates):6.1f}]{speedup:9}"
                f" {ratio:17} {statistics.median(loads):.2f} [{min(loads):.2f}-{max(loads):.2f}]"
            )
        for fast_engine in ("llamalab-lookup", DRAFT_ENGINE):
            if "llamalab" not in engines or fast_engine not in engines:
                continue
            plain = [p["ids"] for x in runs[workload]["llamalab"] for p in x["prompts"]]
            fast = [p["ids"] for x in runs[workload][fast_engine] for p in x["prompts"]]
            same = sum(a == b for a, b in zip(plain, fast, strict=True))
            print(f"{workload:9} {fast_engine}'s text equals llamalab's: {same}/{len(plain)}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
