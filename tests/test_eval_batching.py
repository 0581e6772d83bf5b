"""Items scored together (a shared few-shot prefix, several items per pass) equal the
same items scored one by one from scratch.

The reference for "from scratch" is the scorer itself given one item at a time (nothing
shared, nothing batched) and, independently of the cache, one causal pass over the whole
sequence (``token_logprobs``: the path perplexity uses, with torch's fused attention).
"""

from __future__ import annotations

import random

import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.eval.likelihood import CONTEXT_CHUNK, LikelihoodScorer, _groups, _Request
from llamalab.model import Transformer

# float32 sums in another order (a pass of many items against a pass of one): the
# log-likelihood of a whole continuation moves by a few ulps of its size.
FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden_dim=96,
        context_length=1536,
    )  # fmt: skip
    model = Transformer(config)
    model.reset_parameters(std=0.2)  # peaked distributions: greedy flags are not all False
    return model.eval()


def _from_scratch(scorer, context, continuations):
    """Each continuation's log-likelihood from one uncached causal pass over it all, the
    context cut as lm-eval cuts it: the last ``max_seq_len`` + 1 tokens, less the last."""
    out = []
    for c in continuations:
        window = torch.tensor([(list(context) + list(c))[-(scorer.max_seq_len + 1) :]])
        with torch.inference_mode():
            logits = scorer.model(window[:, :-1])[0, -len(c) :].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, window[0, -len(c) :, None])
        out.append(float(picked.sum()))
    return out


def _few_shot_items(rng: random.Random, shared: list[int], n: int, choices: int, longest: int):
    items = []
    for _ in range(n):
        question = [rng.randrange(1, 97) for _ in range(rng.randrange(1, 40))]
        conts = [[rng.randrange(1, 97) for _ in range(rng.randrange(1, longest + 1))]
                 for _ in range(choices)]  # fmt: skip
        items.append((shared + question, conts))
    return items


@pytest.mark.parametrize("longest", [1, 4])  # letters (MMLU) and words (SIQA)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_items_sharing_a_prefix_equal_items_scored_alone(tiny, rows, longest):
    rng = random.Random(rows * 10 + longest)
    prefix_a = [rng.randrange(1, 97) for _ in range(50)]
    prefix_b = [rng.randrange(1, 97) for _ in range(30)]
    items = (
        _few_shot_items(rng, prefix_a, 5, 4, longest)
        + _few_shot_items(rng, prefix_b, 4, 3, longest)
        + _few_shot_items(rng, [], 3, 2, longest)  # nothing shared
    )
    scorer = LikelihoodScorer(tiny, max_seq_len=512, max_rows=rows)
    together = scorer.score_many(items)
    for (context, conts), scored in zip(items, together, strict=True):
        alone = LikelihoodScorer(tiny, max_seq_len=512, max_rows=rows).score(context, conts)
        assert len(scored) == len(conts)
        for (x, gx), (y, gy) in zip(scored, alone, strict=True):
            assert x == pytest.approx(y, abs=FLOAT32_TOLERANCE)
            assert gx == gy
        reference = _from_scratch(scorer, context, conts)
        assert [s[0] for s in scored] == pytest.approx(reference, abs=1e-4)


def test_long_contexts_run_in_chunks_and_are_cut_to_the_window(tiny):
    rng = random.Random(5)
    shared = [rng.randrange(1, 97) for _ in range(CONTEXT_CHUNK + 100)]
    items = _few_shot_items(rng, shared, 3, 3, 3)
    items.append(([rng.randrange(1, 97) for _ in range(1400)], [[5, 6], [7]]))  # over the window
    scorer = LikelihoodScorer(tiny, max_seq_len=1024, max_rows=2)
    together = scorer.score_many(items)
    for (context, conts), scored in zip(items, together, strict=True):
        reference = _from_scratch(scorer, context, conts)
        assert [s[0] for s in scored] == pytest.approx(reference, abs=1e-4)
    assert scorer.cache_bytes > 0


def test_greedy_flag_is_the_argmax_continuation(tiny):
    scorer = LikelihoodScorer(tiny, max_seq_len=256, max_rows=4)
    context = [3, 1, 4, 1, 5, 9, 2, 6]
    ids = torch.tensor([context])
    greedy = []
    with torch.inference_mode():
        for _ in range(3):  # the greedy continuation, one token at a time
            nxt = int(tiny(ids)[0, -1].argmax())
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    other = [(greedy[0] + 1) % 97, *greedy[1:]]
    scored = scorer.score_many([(context, [greedy, other, greedy[:1]])])[0]
    assert [g for _, g in scored] == [True, False, True]


def test_groups_share_what_consecutive_contexts_share():
    def req(context):
        return _Request(0, 0, context, [[1]])

    head = list(range(100, 120))
    parts = [req(head + [1, 2]), req(head + [1, 3]), req(head + [4]), req([7, 8, 9]), req([7, 8])]
    groups = _groups(parts)
    # The first three share the 20-token head (and the first two one more token: no matter,
    # a group shares what all its members share); the last two share too little.
    assert [(p, len(m)) for p, m in groups] == [(20, 3), (0, 2)]
    # A member always keeps its last context token to run itself.
    same = _groups([req(head), req(head)])
    assert same[0][0] == len(head) - 1


@pytest.mark.slow
def test_mmlu_items_from_the_shared_prefix_equal_items_from_scratch(smollm2_path):
    """SmolLM2 in float32: 5-shot MMLU items of two subjects scored together, against each
    item alone (within 1e-5) and against one uncached pass per sequence."""
    from llamalab.eval import data
    from llamalab.eval.runner import choice_pairs
    from llamalab.eval.tasks import load_task
    from llamalab.runtime import load_runtime

    if not data.available("mmlu"):
        pytest.skip(f"the MMLU data is not installed ({data.INSTALL_LINE})")
    model, tokenizer = load_runtime(str(smollm2_path), "float32", device="cpu", threads=2)
    task = load_task("mmlu", subjects=["us_foreign_policy", "management"], limit=2)
    requests = [choice_pairs(tokenizer, item) for item in task.items]
    scorer = LikelihoodScorer(model, max_seq_len=2048, max_rows=4)
    together = scorer.score_many(requests)
    groups = _groups([_Request(0, 0, c, k) for c, k in requests])
    assert len(groups) == 2 and all(prefix > 250 for prefix, _ in groups)  # the 5-shot heads
    for k, ((context, conts), scored) in enumerate(zip(requests, together, strict=True)):
        alone = LikelihoodScorer(model, max_seq_len=2048, max_rows=4).score(context, conts)
        for (x, _), (y, _) in zip(scored, alone, strict=True):
            assert x == pytest.approx(y, abs=FLOAT32_TOLERANCE)
        if k % 2 == 1:  # the second of each subject (float32 passes are slow)
            reference = _from_scratch(scorer, context, conts[:1])
            assert scored[0][0] == pytest.approx(reference[0], abs=1e-3)
