"""Speculation in the continuous batch and in ``llamalab serve``: the same replies, sooner.

Rows that decode together verify their drafted tokens in one pass of the native step, each
row's drafts in its own cache row; the expected replies are the engine's (or the
server's) own without speculation.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import http_request, run_cli
from test_speculative import FREE, REPEAT, SAMPLERS, SOURCE

from llamalab import load_model
from llamalab.generation import GREEDY, Engine, Grammar, Request
from llamalab.generation.params import LookupParams
from llamalab.generation.speculative import BatchPlanner, PassCost

COPY = "Copy this code exactly, then say nothing else:\n\n" + SOURCE
EXTRACT = "Which variable holds the running total in this code? Quote its line.\n\n" + SOURCE
PROMPTS = [REPEAT, FREE, COPY, EXTRACT]


# ------------------------------------------------------------------ the batch's plan
def test_a_batch_drafts_the_likeliest_tokens_first() -> None:
    cost = PassCost()
    cost.extra = 0.1
    plan = BatchPlanner().plan([([1, 2, 3, 4], 0.9), ([5, 6, 7], 0.2), ([], 0.0)], cost, 63)
    # 0.9^j beats the pass's average rate for the first row's tokens; 0.2 never does.
    assert plan == [[1, 2, 3, 4], [], []]
    tight = BatchPlanner().plan([([1, 2, 3, 4], 0.9), ([5, 6], 0.9)], cost, 5)
    assert sum(map(len, tight)) + 2 <= 5  # the pass stays within what verifies exactly
    assert tight == [[1, 2], [5]]  # 0.9, 0.9, then 0.81 of the first row


def test_a_batch_drafts_nothing_where_drafts_miss_or_passes_are_dear() -> None:
    cost = PassCost()
    assert BatchPlanner().plan([([1, 2], 0.05), ([3], 0.05)], cost, 63) == [[], []]
    cost.extra = 2.0  # a drafted token costs two passes: nothing can pay
    assert BatchPlanner().plan([([1, 2], 0.95), ([3], 0.95)], cost, 63) == [[], []]


def test_slow_batch_passes_turn_drafting_off_for_a_while_only() -> None:
    cost = PassCost()
    cost.single_s, cost.extra = 0.010, 0.1
    planner = BatchPlanner()
    rows = [([1, 2, 3], 0.8), ([4, 5, 6], 0.8)]
    for _ in range(20):
        if not any(planner.plan(rows, cost, 63)):
            break
        planner.verified(2, 2, 0.5, cost)  # one token a row, at fifty passes' time
    for _ in range(10):
        assert planner.plan(rows, cost, 63) == [[], []]
    # Plain steps: the calibration drifts back towards 1 until the rows draft again.
    assert any(any(planner.plan(rows, cost, 63)) for _ in range(200))


# ------------------------------------------------------------------ the engine's batch
@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_tokenizer):
    from llamalab.kernels.decode_path import native_pass_tokens

    model = load_model(smollm2_path, packed=True)
    if not native_pass_tokens(model):
        pytest.skip("speculation verifies on llamalab's native step, which does not run here")
    return model, smollm2_tokenizer


def _batch(smollm2, lookups, **request):
    model, tok = smollm2
    engine = Engine(model, tok, max_batch=len(PROMPTS), max_seq_len=512)
    requests = [
        Request(tok.encode_chat([{"role": "user", "content": p}]), lookup=lookup, **request)
        for p, lookup in zip(PROMPTS, lookups, strict=True)
    ]
    return engine.generate_batch(requests)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLERS["filters"], SAMPLERS["penalties"]])
def test_rows_decoding_together_verify_drafts_and_keep_their_text(smollm2, sampling) -> None:
    plain = _batch(smollm2, [None] * 4, max_tokens=60, sampling=sampling)
    # One row without lookup rides in the same passes as three with it.
    mixed = [LookupParams(), None, LookupParams(ngram=2, draft_max=4), LookupParams()]
    fast = _batch(smollm2, mixed, max_tokens=60, sampling=sampling)
    assert [s.ids for s in fast] == [s.ids for s in plain]
    assert [s.text for s in fast] == [s.text for s in plain]
    assert [s.finish_reason for s in fast] == [s.finish_reason for s in plain]
    assert fast[1].timing.draft_tokens == 0
    if sampling is GREEDY:
        # The copying rows accept drafts while all four still run (each took 60 tokens
        # at most, so none of them ran alone for long).
        assert fast[2].timing.accepted_tokens > 10
        assert all(s.timing.draft_tokens <= 0.8 * 60 for s in fast)


def test_a_batch_with_a_grammar_that_rejects_every_draft_keeps_its_text(smollm2) -> None:
    digits = Grammar("regex", "[0-9]{1,30}")
    plain = _batch(smollm2, [None] * 4, max_tokens=30, sampling=GREEDY, grammar=digits)
    fast = _batch(smollm2, [LookupParams()] * 4, max_tokens=30, sampling=GREEDY, grammar=digits)
    assert [s.ids for s in fast] == [s.ids for s in plain]
    assert all(s.text.isdigit() for s in fast)


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(smollm2_path):
    pytest.importorskip("fastapi")
    from llamalab.serve.launch import ServerProcess

    proc = ServerProcess(["--model", str(smollm2_path), "--ctx", "512", "--max-batch", "4"])
    try:
        yield proc.start()
    finally:
        proc.stop()


def _chat(server, prompt: str, **fields) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 48}
    body |= {"temperature": 0, **fields}
    status, data, _ = http_request(server.port, "POST", "/v1/chat/completions", body)
    return status, json.loads(data)


def _metrics(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, data, _ = http_request(server.port, "GET", "/metrics")
    assert status == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(data.decode())
        for sample in family.samples
    }


# Under concurrency a prompt is prefilled in chunks sized by time, and a pass of 64 tokens
# or more runs off the native step (other last bits): prompts this short keep every pass
# on it, so the replies cannot depend on how the prefill was cut (docs/serving.md).
SHORT = [
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea at night.",
    "Count from one to thirty in words, separated by commas.",
    "Copy this code exactly: def add(a, b): return a + b",
]


def _concurrently(server, **fields) -> list[str]:
    with ThreadPoolExecutor(len(SHORT)) as pool:
        replies = list(pool.map(lambda p: _chat(server, p, **fields), SHORT))
    assert all(status == 200 for status, _ in replies), replies
    return [reply["choices"][0]["message"]["content"] for _, reply in replies]


def test_concurrent_greedy_replies_are_the_same_and_metrics_count_drafts(server) -> None:
    before = _metrics(server)
    plain = _concurrently(server, lookup=False)
    after_plain = _metrics(server)
    assert after_plain["llamalab_draft_tokens_total"] == before["llamalab_draft_tokens_total"]
    fast = _concurrently(server)  # the server's default: lookup on
    assert fast == plain
    after = _metrics(server)
    drafted = after["llamalab_draft_tokens_total"]
    accepted = after["llamalab_accepted_draft_tokens_total"]
    assert drafted > after_plain["llamalab_draft_tokens_total"]
    assert 0 < accepted <= drafted
    assert after["llamalab_draft_acceptance_rate"] == pytest.approx(accepted / drafted)
    sized = _concurrently(server, lookup_ngram=2, draft_max=3)
    assert sized == plain


def test_a_grammar_that_rejects_every_draft_gets_the_same_reply(server) -> None:
    grammar = "root ::= [0-9]{1,12}"
    status, plain = _chat(server, REPEAT, grammar=grammar, lookup=False)
    assert status == 200, plain
    status, fast = _chat(server, REPEAT, grammar=grammar, lookup=True, draft_max=8)
    assert status == 200, fast
    text = fast["choices"][0]["message"]["content"]
    assert text == plain["choices"][0]["message"]["content"] and text.isdigit()


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"lookup_ngram": 0}, "lookup_ngram", "greater than or equal to 1"),
        ({"lookup_ngram": -2}, "lookup_ngram", "greater than or equal to 1"),
        ({"draft_max": 0}, "draft_max", "greater than or equal to 1"),
        ({"draft_max": 63}, "draft_max", "less than or equal to 62"),
        ({"lookup_ngram": "3"}, "lookup_ngram", "valid integer"),
        ({"lookup": "yes"}, "lookup", "valid boolean"),
        ({"lookup": False, "draft_max": 4}, None, "need lookup"),
    ],
)
def test_bad_lookup_fields_get_a_400(server, fields, param, message) -> None:
    status, data = _chat(server, "Hi", **fields)
    assert status == 400, data
    assert message in data["error"]["message"]
    if param is not None:
        assert data["error"]["param"] == param


def test_serve_refuses_bad_lookup_options_before_loading() -> None:
    result = run_cli("serve", "--model", "/nonexistent.gguf", "--lookup-ngram", "0")
    assert result.returncode == 1
    assert "--lookup-ngram: the lookup n-gram size must be between" in result.stderr
    result = run_cli("serve", "--model", "/nonexistent.gguf", "--no-lookup", "--draft-max", "3")
    assert result.returncode == 1 and "need speculation" in result.stderr
    assert "Traceback" not in result.stderr


def test_request_lookup_follows_the_server_default() -> None:
    from llamalab.serve.schemas import ChatCompletionRequest

    def parsed(**fields):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], **fields)

    server = LookupParams(ngram=2, draft_max=5)
    assert parsed().lookup_params(server) == server
    assert parsed().lookup_params(None) is None  # serve --no-lookup
    assert parsed(lookup=False).lookup_params(server) is None
    assert parsed(lookup=True).lookup_params(None) == LookupParams()
    assert parsed(draft_max=3).lookup_params(None) == LookupParams(draft_max=3)
    assert parsed(lookup_ngram=4).lookup_params(server) == LookupParams(ngram=4, draft_max=5)


# ------------------------------------------------------------------ chat
def _chat_replies(smollm2_path, *args: str) -> list[str]:
    """Two turns of `llamalab chat` on a pseudo-terminal: each reply with its stats line."""
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamalab", "chat", "--model", str(smollm2_path), "--temperature", "0", *args],
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "LLAMALAB_HISTORY": ""},
        encoding="utf-8",
        timeout=180,
    )
    child.expect_exact("> ")
    replies = []
    for line in (REPEAT.replace("\n", " "), "Now write it again with `span` renamed to `size`."):
        child.sendline(line)
        child.expect_exact("> ")
        replies.append(child.before.split("\n", 1)[1])  # past the echoed line
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return replies


def test_chat_replies_are_the_same_with_lookup_on_the_conversation(smollm2_path) -> None:
    import re

    stats = re.compile(r"\[(\d+) tokens, [^\]]*?(?:, (\d+) of (\d+) drafted tokens accepted)?\]")
    plain = _chat_replies(smollm2_path, "--no-lookup", "--max-tokens", "60")
    fast = _chat_replies(smollm2_path, "--lookup-ngram", "2", "--draft-max", "6", "-n", "60")
    for a, b in zip(plain, fast, strict=True):
        assert stats.sub("", a) == stats.sub("", b)
        assert stats.search(a)[2] is None  # no drafts without lookup
    accepted = [int(m[2] or 0) for m in map(stats.search, fast)]
    assert accepted[1] > 0  # the second turn quotes the first


def test_chat_refuses_bad_lookup_options() -> None:
    result = run_cli("chat", "--draft-max", "0")
    assert result.returncode == 1
    assert "--draft-max: the most tokens drafted at once must be between" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ eval
CHANGELOG = """hello (2.12.1-1) unstable; urgency=medium

  * New upstream release.
  * Fix the build with gettext 0.22 (Closes: #1051234).

 -- Santiago Vila <sanvila@debian.org>  Sun, 05 Nov 2023 12:00:00 +0100
"""


def _eval_items(path) -> None:
    """Six completion items that copy a Debian changelog entry (its first line answers)."""
    with open(path, "w", encoding="utf-8") as f:
        for minor in range(6):
            entry = CHANGELOG.replace("2.12.1-1", f"2.12.{minor}-1")
            prompt = f"Text:\n\n{entry}\nThe same text, copied exactly:\n\n"
            f.write(json.dumps({"prompt": prompt, "answer": entry.split("\n")[0]}) + "\n")


def test_eval_generation_counts_drafts_and_keeps_every_reply(smollm2, tmp_path) -> None:
    from llamalab.eval import runner
    from llamalab.eval.tasks import load_task

    model, tok = smollm2
    _eval_items(tmp_path / "items.jsonl")
    task = load_task(str(tmp_path / "items.jsonl"), max_tokens=40, stop=("\n\n",))

    def run(lookup):
        engine = Engine(model, tok, max_batch=3, max_seq_len=512)
        return runner.run_generate(task, engine, tok, batch_size=3, lookup=lookup)

    plain = run(None)
    fast = run(LookupParams())
    assert [r["reply"] for r in fast.records] == [r["reply"] for r in plain.records]
    assert fast.value == plain.value
    assert plain.summary()["speculation"] == {"draft_tokens": 0, "accepted_draft_tokens": 0}
    counts = fast.summary()["speculation"]
    assert 0 < counts["accepted_draft_tokens"] <= counts["draft_tokens"]


def test_eval_json_reports_the_drafts(tmp_path) -> None:
    _eval_items(tmp_path / "items.jsonl")
    result = run_cli("eval", "--task", str(tmp_path / "items.jsonl"), "--json", "--limit", "2",
                     "--max-tokens", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["speculation"]) == {"draft_tokens", "accepted_draft_tokens"}


# ------------------------------------------------------------------ replies independent of timing
def _long_prompts(tok) -> list[list[int]]:
    """Eight chat prompts of 100 to 400 tokens: long enough to be prefilled in chunks."""
    prompts = []
    for i in range(8):
        notes = "\n".join(
            f"Line {j}: crate {(j * 7 + i) % 13} holds {j * 3 + i} apples."
            for j in range(5 + 2 * i)
        )
        ask = "Copy the last three lines exactly." if i % 2 else "Which crate holds most apples?"
        prompts.append(tok.encode_chat([{"role": "user", "content": f"{notes}\n\n{ask}"}]))
    return prompts


def _arrivals(model, tok, prompts, arrive, lookup, **engine) -> list[list[int]]:
    """Greedy replies of ``prompts`` in one 8-row engine, prompt i added at step ``arrive[i]``."""
    eng = Engine(model, tok, max_batch=8, max_seq_len=512, **engine)
    seqs: dict[int, object] = {}
    step = 0
    while len(seqs) < len(prompts) or not all(s.finished for s in seqs.values()):
        for i, at in enumerate(arrive):
            if at == step:
                request = Request(prompts[i], max_tokens=32, sampling=GREEDY, lookup=lookup)
                seqs[i] = eng.add(request)
        eng.step()
        step += 1
    return [seqs[i].ids for i in range(len(prompts))]


def test_concurrent_greedy_replies_do_not_depend_on_timing_or_lookup(smollm2) -> None:
    model, tok = smollm2
    prompts = _long_prompts(tok)
    assert 100 <= min(map(len, prompts)) and max(map(len, prompts)) <= 400
    # Each alone, as `llamalab generate` runs it (Engine.submit prefills the whole prompt).
    alone = []
    for p in prompts:
        solo = Engine(model, tok, max_batch=1, max_seq_len=512)
        alone.append([e.token_id for e in solo.generate(
            Request(p, max_tokens=32, sampling=GREEDY, lookup=None)
        ) if e.token_id is not None])  # fmt: skip
    # Chunks of a fixed 128 tokens beside all 8 decode rows; then chunks sized by the
    # measured step times with staggered arrivals; then small chunks with lookup on.
    together = _arrivals(model, tok, prompts, [0] * 8, None, prefill_chunk=128, prefill_share=None)
    staggered = _arrivals(model, tok, prompts, [0, 1, 2, 4, 7, 11, 16, 22], None)
    fast = _arrivals(
        model, tok, prompts, [3, 0, 9, 1, 5, 0, 14, 2], LookupParams(),
        prefill_chunk=37, prefill_share=None,
    )  # fmt: skip
    for i, expected in enumerate(alone):
        # A stop token ends a reply without joining ids; the event stream carries it.
        expected = [t for t in expected if t not in tok.stop_ids]
        assert together[i] == expected, i
        assert staggered[i] == expected, i
        assert fast[i] == expected, i


def test_eval_lookup_options_keep_every_reply(tmp_path) -> None:
    _eval_items(tmp_path / "items.jsonl")
    common = ("eval", "--task", str(tmp_path / "items.jsonl"), "--json", "--limit", "3",
              "--max-tokens", "24", "--stop", "\n\n")  # fmt: skip
    runs = {}
    for name, flags in (("off", ["--no-lookup"]), ("on", ["--lookup", "--draft-max", "6"])):
        out = tmp_path / f"{name}.jsonl"
        result = run_cli(*common, *flags, "--output", str(out))
        assert result.returncode == 0, result.stderr
        lines = out.read_text(encoding="utf-8").splitlines()
        runs[name] = (json.loads(result.stdout), [json.loads(line) for line in lines])
    (off, off_records), (on, on_records) = runs["off"], runs["on"]
    assert [r["reply"] for r in on_records] == [r["reply"] for r in off_records]
    assert on["value"] == off["value"]
    assert off["speculation"]["draft_tokens"] == 0
    assert on["speculation"]["accepted_draft_tokens"] > 0  # the replies copy their prompts


def test_eval_lookup_options_are_refused_where_nothing_is_generated(tmp_path) -> None:
    items = tmp_path / "choice.jsonl"
    items.write_text(json.dumps({"context": "1 + 1 =", "choices": ["2", "3"], "label": 0}) + "\n")
    result = run_cli("eval", "--task", str(items), "--no-lookup")
    assert result.returncode == 1
    assert result.stderr == (
        "llamalab: error: --lookup/--no-lookup applies to generation tasks only\n"
    )
    result = run_cli("eval", "--task", str(items), "--draft-max", "0")
    assert result.returncode == 1 and "--draft-max: the most tokens drafted" in result.stderr


def test_every_pass_stays_on_the_native_step(smollm2) -> None:
    from llamalab.kernels.decode_path import native_pass_tokens

    model, tok = smollm2
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].numel()))
    try:
        engine = Engine(model, tok, max_batch=8, max_seq_len=512, prefill_chunk=128,
                        prefill_share=None)  # fmt: skip
        short = [engine.add(Request([1, 9690, 198, 20 + i], max_tokens=40, lookup=None))
                 for i in range(7)]  # fmt: skip
        engine.step()
        long = engine.add(Request(list(range(100, 400)), max_tokens=4, lookup=None))
        while not long.finished or not all(s.finished for s in short):
            engine.step()
        solo = Engine(model, tok, max_seq_len=512)
        for _ in solo.generate(Request(list(range(100, 400)), max_tokens=2)):
            pass
    finally:
        hook.remove()
    # 300 prompt tokens beside 7 decoding rows, and alone: never a pass the blocks run.
    assert max(sizes) <= native_pass_tokens(model) == 63
    assert sum(n > 8 for n in sizes) >= 300 // 63  # the prompt went in large chunks
