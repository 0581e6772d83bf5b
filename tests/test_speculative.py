"""Prompt lookup decoding (``generation/speculative.py``): the same output, sooner.

The drafts are verified in one pass of the model on SmolLM2's native step, which gives
each token of a pass the same logits, bit for bit, as a one-token step; the expected
outputs are the engine's own without speculation, run from a fresh engine (a cache row
that reused a prefix computed its first token in another pass shape).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from scipy import stats

from llamalab import load_model
from llamalab.errors import LlamalabError
from llamalab.generation import GREEDY, Engine, Grammar, Request, SamplingParams
from llamalab.generation.params import LookupParams
from llamalab.generation.speculative import (
    PassCost,
    PromptLookup,
    Speculation,
    accept_point_draft,
)

SOURCE = '''def window_sum(values, width):
    """Sum of every run of `width` consecutive values."""
    total = sum(values[:width])
    sums = [total]
    for i in range(width, len(values)):
        total += values[i] - values[i - width]
        sums.append(total)
    return sums
'''
REPEAT = "Rewrite this Python code with the parameter `width` renamed to `span`:\n\n" + SOURCE
FREE = "Write a short poem about the sea at night."


# ------------------------------------------------------------------ the drafter
def test_lookup_drafts_what_followed_the_longest_match() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 3, 4, 7, 2, 3], ngram=3)
    # The 2-gram (2, 3) occurred at 1..2, followed by 4, 5, 9.
    assert lookup.predict(3) == ([4, 5, 9], 2)
    lookup.push(4)  # (2, 3, 4) now matches as a 3-gram
    assert lookup.predict(4) == ([5, 9, 3, 4], 3)


def test_lookup_uses_the_latest_occurrence_and_never_the_suffix_itself() -> None:
    lookup = PromptLookup([5, 1, 6, 5, 1, 8, 5], ngram=2)
    assert lookup.predict(2) == ([1, 8], 1)  # the later 5 was followed by 1, 8
    assert PromptLookup([1, 2, 3], ngram=2).predict(4) == ([], 0)  # nothing repeats


def test_a_prediction_that_reaches_the_end_goes_round_again() -> None:
    assert PromptLookup([7, 1, 2, 3, 1, 2, 3], ngram=2).predict(7) == ([1, 2, 3, 1, 2, 3, 1], 2)


@pytest.mark.parametrize(
    "kwargs", [{"ngram": 0}, {"ngram": -1}, {"draft_max": 0}, {"draft_max": -3}, {"ngram": 1.5}]
)
def test_bad_lookup_sizes_are_refused(kwargs) -> None:
    with pytest.raises(LlamalabError, match="lookup n-gram|drafted at once|must be an integer"):
        LookupParams(**kwargs)


def test_drafting_stops_where_drafts_miss_and_resumes_where_they_hit() -> None:
    spec = Speculation(LookupParams(ngram=1, draft_max=8), [1, 2, 3, 1])
    cost = PassCost()
    assert spec.draft(8, cost) == []  # no one-token step timed yet: a plain step first
    cost.observe(1, 0.010)
    assert spec.draft(8, cost) == [2, 3]  # the prior's acceptance (0.5): two tokens pay
    rng = random.Random(0)
    for _ in range(80):  # text that barely repeats: about one prediction in ten hits
        spec.draft(8, cost)
        spec.push(rng.randrange(10, 20))
    assert spec.acceptance(1) < 0.2
    assert spec.draft(8, cost) == []  # plain steps
    for _ in range(20):  # "1 2 3" repeats: the predictions made for plain steps hit
        for t in (1, 2, 3):
            spec.draft(8, cost)
            spec.push(t)
    assert spec.acceptance(1) > 0.9
    assert spec.draft(8, cost) == [1, 2, 3, 1, 2, 3, 1, 2]
    assert spec.draft(2, cost) == [1, 2]  # never past the limit


def test_drafting_stops_where_verifications_are_slower_than_predicted() -> None:
    """Drafts that hit but whose passes cost far more than the cost model says (a loaded
    machine) calibrate the prediction down until plain steps win."""
    spec = Speculation(LookupParams(ngram=1, draft_max=4), [1, 2, 1])
    cost = PassCost()
    cost.single_s = 0.010
    for _ in range(20):
        drafts = spec.draft(4, cost)
        if not drafts:
            break
        for t in drafts:
            spec.push(t)  # every draft hits ...
        spec.push(1)
        spec.verified(len(drafts), len(drafts), 0.2, cost)  # ... at 20 single passes' time
    assert spec.draft(4, cost) == []
    assert spec.calibration < 0.5


class _TimedDrafter:
    """A drafter that always drafts the right tokens, each call taking ``call_s``."""

    def __init__(self, text: list[int], call_s: float) -> None:
        self.text, self.call_s = text, call_s

    def draft(self, tokens, k: int) -> list[int]:
        return self.text[len(tokens) : len(tokens) + k]


def test_a_draft_model_that_misses_looks_again_less_and_less_often() -> None:
    """A cheap draft model whose drafts all miss: a look after 16 steps, then 32, 64, ...
    up to 256 (each look makes the draft model read every token it missed)."""
    spec = Speculation(LookupParams(draft_max=4), list(range(10)))
    spec.drafter = _TimedDrafter([-1] * 5000, 0.0005)  # drafts -1, never chosen
    cost = PassCost()
    cost.observe(1, 0.010)
    looks = []
    for step in range(2000):
        d = spec.draft(4, cost)
        if d:
            looks.append(step)
            spec.verified(len(d), 0, 0.010 * (1 + cost.extra * len(d)), cost)
        spec.push(step + 100)
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert gaps[:4] == [16, 32, 64, 128] and set(gaps[4:]) == {256}, looks


@pytest.mark.parametrize(("call_share", "drafts"), [(0.05, True), (1.0, False)])
def test_a_draft_model_drafts_only_while_its_steps_are_cheap(call_share, drafts) -> None:
    """Every draft hits; a draft model whose steps cost as much as the target's cannot pay
    (each drafted token costs a step of each model), even if every draft hit: after its
    first draft, which measures that, it drafts no more."""
    text = list(range(3000))
    spec = Speculation(LookupParams(draft_max=4), text[:10])
    spec.drafter = _TimedDrafter(text, call_share * 0.010)
    cost = PassCost()
    cost.observe(1, 0.010)
    drafting_steps = 0
    while len(spec.lookup.tokens) < 2000:
        d = spec.draft(4, cost)
        drafting_steps += bool(d)
        for t in [*d, text[len(spec.lookup.tokens) + len(d)]]:
            spec.push(t)
        if d:
            spec.verified(len(d), len(d), 0.010 * (1 + cost.extra * len(d)), cost)
    if drafts:
        assert drafting_steps > 300  # about 2000 / 5 steps, each drafting four tokens
    else:
        assert drafting_steps == 1


# ------------------------------------------------------------------ rejection sampling
def test_a_point_draft_is_accepted_with_its_target_probability() -> None:
    """Leviathan et al.'s rule for q = δ_d: accept with p(d), else draw from p without d."""
    probs = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    draft, n = 3, 20000
    g = torch.Generator().manual_seed(0)
    draws = [accept_point_draft(probs, draft, g) for _ in range(n)]
    accepted = sum(ok for _, ok in draws)
    assert stats.binomtest(accepted, n, float(probs[draft])).pvalue > 1e-3
    rejected = [t for t, ok in draws if not ok]
    assert draft not in rejected
    keep = [i for i in range(len(probs)) if i != draft]
    residual = probs[keep].double()
    expected = (residual / residual.sum() * len(rejected)).tolist()
    chi2 = stats.chisquare([rejected.count(t) for t in keep], expected)
    assert chi2.pvalue > 1e-3


# ------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_tokenizer):
    model = load_model(smollm2_path, packed=True)
    if model.decode_path is None or model.decode_path.native_step is None:
        pytest.skip("speculation verifies on llamalab's native step, which does not run here")
    return model, smollm2_tokenizer


def _run(smollm2, prompt: str, lookup: LookupParams | None, **request) -> tuple[list, object]:
    """Events and the finished timing of one request on a fresh engine."""
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    engine = Engine(model, tok, max_seq_len=512)
    events = list(engine.generate(Request(ids, lookup=lookup, **request)))
    return events, engine


def _same(smollm2, prompt: str, **request) -> tuple[list, list]:
    plain, _ = _run(smollm2, prompt, None, **request)
    fast, _ = _run(smollm2, prompt, LookupParams(), **request)
    assert [(e.token_id, e.text, e.finish_reason) for e in fast] == [
        (e.token_id, e.text, e.finish_reason) for e in plain
    ]
    return plain, fast


def _finished(smollm2, prompt: str, **request):
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    engine = Engine(model, tok, max_seq_len=512)
    seq, _ = engine.submit(Request(ids, lookup=LookupParams(), **request))
    while not seq.finished:
        engine.step()
    return seq


@pytest.mark.parametrize("prompt", [REPEAT, FREE])
def test_greedy_output_is_token_for_token_the_same(smollm2, prompt) -> None:
    _same(smollm2, prompt, max_tokens=90, sampling=GREEDY)


def test_a_reply_that_repeats_its_prompt_accepts_drafts(smollm2) -> None:
    seq = _finished(smollm2, REPEAT, max_tokens=90, sampling=GREEDY)
    # SmolLM2 copies the function's first two lines, then shortens its body.
    assert seq.timing.accepted_tokens >= len(seq.ids) / 2
    # The first token comes from the prefill, the stop token from a decode step.
    assert seq.timing.decode_tokens == len(seq.ids)


SAMPLERS = {
    "default": SamplingParams(seed=7),
    "hot": SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0, seed=3),
    "filters": SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, seed=5),
    "penalties": SamplingParams(
        repeat_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.4, seed=11
    ),
    "bias": SamplingParams(temperature=0.5, logit_bias={28: -100.0, 253: 5.0}, seed=13),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampled_output_with_a_seed_is_the_same(smollm2, name) -> None:
    """The sampler draws once per emitted token in the same order, and a draft is accepted
    iff the draw equals it: the same draws give the same text, not only the same law."""
    _same(smollm2, REPEAT, max_tokens=60, sampling=SAMPLERS[name])


def test_stop_strings_max_tokens_and_logprobs_behave_the_same(smollm2) -> None:
    plain, fast = _same(smollm2, REPEAT, max_tokens=20, sampling=GREEDY, logprobs=3)
    assert [(e.logprob, e.top_logprobs) for e in fast] == [
        (e.logprob, e.top_logprobs) for e in plain
    ]
    assert plain[-1].finish_reason == "length" and len(plain) == 20
    text = "".join(e.text for e in plain)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    plain, _ = _same(smollm2, REPEAT, max_tokens=40, sampling=GREEDY, stop=[stop])
    assert plain[-1].finish_reason == "stop"


def test_a_grammar_that_rejects_every_draft_gives_the_same_text(smollm2) -> None:
    digits = Grammar("regex", "[0-9]{1,30}")
    plain, _ = _same(smollm2, REPEAT, max_tokens=30, sampling=GREEDY, grammar=digits)
    assert "".join(e.text for e in plain).isdigit()


def test_a_model_off_the_native_step_decodes_without_speculating(smollm2_path) -> None:
    """Its passes may round a token differently from a one-token step: no drafts there."""
    from llamalab import load_tokenizer

    model, tok = load_model(smollm2_path), load_tokenizer(smollm2_path)
    assert model.decode_path is None
    ids = tok.encode_chat([{"role": "user", "content": REPEAT}])
    engine = Engine(model, tok, max_seq_len=512)
    seq, _ = engine.submit(Request(ids, max_tokens=12, sampling=GREEDY, lookup=LookupParams()))
    while not seq.finished:
        engine.step()
    assert len(seq.ids) == 12 and seq.timing.draft_tokens == 0


# ------------------------------------------------------------------ the command line
def test_generate_json_reports_drafts_and_the_same_ids(smollm2) -> None:
    import json

    from conftest import run_cli

    common = ["generate", "--chat", "--temperature", "0", "-n", "40", "--json", REPEAT]
    plain = run_cli(*common, "--no-lookup")
    fast = run_cli(*common, "--lookup", "--draft-max", "6", "--lookup-ngram", "2")
    assert plain.returncode == 0 and fast.returncode == 0, plain.stderr + fast.stderr
    plain_out, fast_out = json.loads(plain.stdout), json.loads(fast.stdout)
    assert fast_out["ids"] == plain_out["ids"]
    assert plain_out["timing"]["draft_tokens"] == 0
    assert fast_out["timing"]["accepted_draft_tokens"] > 0
    assert fast_out["timing"]["draft_tokens"] >= fast_out["timing"]["accepted_draft_tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lookup-ngram", "0"], "--lookup-ngram: the lookup n-gram size must be between"),
        (["--draft-max", "-2"], "--draft-max: the most tokens drafted at once must be between"),
        (["--no-lookup", "--draft-max", "4"], "need speculation"),
        (["--no-lookup", "--draft", "x.gguf"], "need speculation"),
    ],
)
def test_bad_lookup_options_get_one_clear_error(args, message) -> None:
    from conftest import run_cli

    result = run_cli("generate", "hello", *args)
    assert result.returncode == 1
    assert result.stderr.startswith("llamalab: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_draft_model_is_not_handed_to_a_server() -> None:
    """A server drafts with its own --draft (lookup's options travel: test_resident.py)."""
    from conftest import run_cli

    result = run_cli("generate", "--server", "http://127.0.0.1:1", "--draft", "x.gguf", "Hi")
    assert result.returncode == 1
    assert "--draft is not sent to a server" in result.stderr


def test_lookup_is_on_by_default(smollm2) -> None:
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": REPEAT}])
    engine = Engine(model, tok, max_seq_len=512)
    seq, _ = engine.submit(Request(ids, max_tokens=30, sampling=GREEDY))
    while not seq.finished:
        engine.step()
    assert seq.timing.accepted_tokens > 0


def test_a_chat_turn_that_quotes_the_conversation_is_the_same(smollm2) -> None:
    """The second turn reuses the cache row the first left (its accepted drafts' slots
    included) and looks up the whole conversation."""
    model, tok = smollm2

    def conversation(lookup: LookupParams | None) -> tuple[list[int], list[int], int]:
        engine = Engine(model, tok, max_seq_len=768)
        messages = [{"role": "user", "content": REPEAT}]
        first = engine.generate_batch(
            [Request(tok.encode_chat(messages), max_tokens=60, sampling=GREEDY, lookup=lookup)]
        )[0]
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Now write it again with `span` renamed to `size`."},
        ]
        second = engine.generate_batch(
            [Request(tok.encode_chat(messages), max_tokens=60, sampling=GREEDY, lookup=lookup)]
        )[0]
        assert second.timing.prefill_tokens < second.timing.prompt_tokens  # the row was reused
        return first.ids, second.ids, second.timing.accepted_tokens

    plain, fast = conversation(None), conversation(LookupParams())
    assert fast[:2] == plain[:2]
    assert fast[2] > 0


# ------------------------------------------------------------------ a draft model
def _random_draft(vocab_size: int, seed: int = 0):
    """A random model with ``vocab_size`` tokens: its drafts mostly miss."""
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    torch.manual_seed(seed)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=vocab_size, ffn_hidden_dim=128)
    model = Transformer(config)
    model.reset_parameters(0.2)
    return model.eval()


def _drafted(smollm2, draft, prompt: str, **request):
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    engine = Engine(model, tok, max_seq_len=512, draft=draft)
    seq, first = engine.submit(Request(ids, lookup=LookupParams(), **request))
    events = [first]
    while not seq.finished:
        events += [e for _, e in engine.step()]
    return events, seq


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLERS["filters"], SAMPLERS["penalties"]])
def test_a_draft_model_gives_the_targets_output(smollm2, smollm2_path, sampling) -> None:
    """SmolLM2 in float32 drafts for its Q4_1 self (most drafts hit); a random model of
    the same vocabulary drafts too (most miss): the text is the target's either way."""
    plain, _ = _run(smollm2, FREE, None, max_tokens=40, sampling=sampling)
    expected = [(e.token_id, e.text, e.finish_reason) for e in plain]
    for draft in (load_model(smollm2_path), _random_draft(smollm2[0].config.vocab_size)):
        events, seq = _drafted(smollm2, draft, FREE, max_tokens=40, sampling=sampling)
        assert [(e.token_id, e.text, e.finish_reason) for e in events] == expected
        assert seq.timing.draft_tokens > 0


def test_a_good_draft_model_is_accepted_and_a_random_one_turned_off(smollm2, smollm2_path):
    _, good = _drafted(smollm2, load_model(smollm2_path), FREE, max_tokens=60, sampling=GREEDY)
    assert good.timing.accepted_tokens >= 0.8 * good.timing.draft_tokens
    random_draft = _random_draft(smollm2[0].config.vocab_size)
    _, bad = _drafted(smollm2, random_draft, FREE, max_tokens=60, sampling=GREEDY)
    assert bad.timing.draft_tokens < 20  # a probe every few steps, not a draft per step


def test_the_draft_model_reads_the_prompt_in_the_prefill(smollm2) -> None:
    """The draft model's cache holds the prompt before the first token is chosen, so a
    long prompt is not read at the first draft, on the reply's time."""
    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": REPEAT}])
    draft = _random_draft(model.config.vocab_size)
    engine = Engine(model, tok, max_seq_len=512, draft=draft)
    seq, _ = engine.submit(Request(ids, max_tokens=2, lookup=LookupParams()))
    assert seq.speculation is not None
    assert seq.speculation.drafter.cached == ids[:-1]


def test_a_draft_with_another_vocabulary_or_larger_is_refused(smollm2, smollm2_path) -> None:
    model, tok = smollm2
    with pytest.raises(LlamalabError, match="vocabulary has 320 tokens, the target's 49,152"):
        Engine(model, tok, max_seq_len=64, draft=_random_draft(320), draft_tokenizer=_Vocab(320))
    from llamalab.config import ModelConfig
    from llamalab.model import Transformer

    with torch.device("meta"):  # only its size is read
        big = Transformer(
            ModelConfig(dim=2048, n_layers=4, n_heads=16, vocab_size=49152, ffn_hidden_dim=256)
        )
    with pytest.raises(LlamalabError, match="larger than the target"):
        Engine(model, tok, max_seq_len=64, draft=big)
    with pytest.raises(LlamalabError, match="another model than the target"):
        Engine(model, tok, max_seq_len=64, draft=model)


class _Vocab:
    """A tokenizer as far as the vocabulary check reads one."""

    def __init__(self, n: int) -> None:
        self.vocab_size = n

    def token_bytes(self, i: int) -> bytes:
        return bytes([i % 256])


def test_generate_with_a_draft_model_gives_the_same_ids(smollm2, smollm2_path) -> None:
    import json

    from conftest import run_cli

    common = ["generate", "--chat", "--temperature", "0", "-n", "30", "--json", FREE]
    plain = run_cli(*common, "--no-lookup")
    drafted = run_cli(*common, "--draft", str(smollm2_path))
    assert plain.returncode == 0 and drafted.returncode == 0, plain.stderr + drafted.stderr
    out = json.loads(drafted.stdout)
    assert out["ids"] == json.loads(plain.stdout)["ids"]
    assert out["timing"]["accepted_draft_tokens"] > 0
