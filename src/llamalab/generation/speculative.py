"""Speculative decoding with prompt lookup: draft tokens cheaply, verify them in one pass.

A decode step reads every weight once to produce one token; a pass over a few tokens
reads them once for all of them. Prompt lookup drafts the tokens that followed the last
few tokens where those occurred before (in the prompt or in the reply so far: text that
quotes its input repeats long runs of it); the model then scores the last token and the
K drafted ones in one cached pass of K + 1 tokens, at positions ``pos .. pos + K`` of
the sequence's cache row.

Verification keeps the output exactly what decoding without speculation gives:

* Row ``i`` of the pass holds the logits after the last token and drafts ``0 .. i-1``.
  The engine feeds the rows one by one to the same choice it makes without speculation
  (``Generation.accept``: logit bias, penalties, grammar, temperature, filters, the
  sequence's own random generator, logprobs, stop strings, ``max_tokens``), and goes on
  to row ``i + 1`` only while the chosen token equals draft ``i``. Every row it reads is
  therefore conditioned on exactly the tokens chosen so far.
* A drafted token is a point mass q = δ_d. Speculative rejection sampling (Leviathan et
  al. 2023; Chen et al. 2023) accepts d with probability min(1, p(d)/q(d)) = p(d) and on
  rejection draws from norm(max(0, p − q)), which is p with d removed and renormalised.
  Drawing x ~ p and accepting iff x = d has that same law (P(x = d) = p(d); given
  x ≠ d, x ~ p(·)/(1 − p(d))), so the sampler draws exactly as it would without
  speculation, one draw per emitted token in the same order: with a seed, the text is
  the same as without speculation, not only its distribution (:func:`accept_point_draft`
  states the rule on its own).
* The rejected tail's keys and values stay in the cache beyond the row's length, which
  is simply not advanced past the accepted tokens: later passes overwrite those slots
  before anything attends to them.
* The logits must be the same bits as one-token steps give. llamalab's native step
  computes every token of a pass independently of the others' rounding (its tests hold a
  chunk to its tokens one at a time, bit for bit), so the engine speculates only where
  the pass runs on it (``kernels/decode_path.py``'s ``native_pass_tokens``).

Whether to draft at all, and how much, is decided per step from measurements: the
acceptance rate of drafts (tracked for every step, also those that verify nothing, by
comparing what lookup would have drafted with what was chosen) and what an extra token
costs a pass on this machine. Where drafts keep missing, nothing is verified and the
only cost left is the lookup itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.params import LookupParams
from llamalab.kernels.decode_path import native_pass_tokens
from llamalab.kv_cache import cache_view

# What one more token adds to a pass, as a share of a one-token pass: the prior until the
# engine measured it. Measured on SmolLM2-135M Q4_1, 2 shared cores: 9.0 ms for 1 token,
# 11.7 ms for 4, 16.6 ms for 8 (the output layer runs on every token of a verification).
PRIOR_EXTRA_TOKEN_COST = 0.15
MIN_EXTRA_TOKEN_COST = 0.02  # a measurement below this is noise, not a free token
COST_SMOOTHING = 0.2  # weight of the newest pass time in its running average
# Drafts' acceptance: a prior worth PRIOR_WEIGHT observations at PRIOR_ACCEPTANCE, and
# older outcomes fade by ACCEPTANCE_DECAY per new one (about the last 20 count).
PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 2.0
ACCEPTANCE_DECAY = 0.95
# Verify a draft only where its expected speed-up beats plain decoding by this much: a
# draft that only breaks even costs the estimate's noise.
MIN_GAIN = 1.05
# The model of a pass's cost misses what it does not see (a loaded machine's contention,
# caches): each verification's realised speed-up over the predicted one calibrates the
# predictions of the sequence's later drafts, within these bounds.
CALIBRATION_RANGE = (0.25, 1.5)
# A draft model's acceptance is measured only on the drafts it makes (drafting costs a
# pass of it): after this many steps without a draft, one token is drafted to look again.
# Each look that does not turn drafting back on doubles the wait, up to PROBE_MAX steps.
PROBE_EVERY = 16
PROBE_MAX = 256
# A look costs the draft model a pass over every token it missed meanwhile. A draft model
# whose measured steps could not beat plain decoding by this much even if every draft hit
# (a drafter nearly as large as its target) stops for the rest of the sequence instead.
MIN_DRAFTER_GAIN = 1.25
DRAFT_PREFILL_CHUNK = 512  # tokens per pass where the draft model catches up with the text
# A draft model's catch-up of at most this many tokens costs about one step of it.
SHORT_CATCH_UP = 8


def accept_point_draft(
    probs: torch.Tensor, draft: int, generator: torch.Generator | None = None
) -> tuple[int, bool]:
    """Speculative rejection sampling of one drafted token ``draft`` (a point-mass draft).

    Returns the emitted token and whether the draft was accepted: the token is drawn from
    ``probs`` (the target's sampling distribution), and the draft is accepted iff it was
    drawn. That accepts ``draft`` with probability p(draft) and, on rejection, gives a
    token distributed as p with ``draft`` removed and renormalised: Leviathan et al.'s
    rule for q = δ_draft. The engine applies the same rule through the sampler it uses
    without speculation.
    """
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, token == draft


def verifies_exactly(model: torch.nn.Module, n_tokens: int) -> bool:
    """Whether a pass of ``n_tokens`` gives each token the same logits, bit for bit, as
    one-token steps would: only llamalab's native step promises that (see the module)."""
    return n_tokens <= native_pass_tokens(model)


class PromptLookup:
    """The tokens so far (prompt and reply) and an index of where each n-gram occurred.

    For every n ≤ ``ngram`` the index maps an n-gram to the position just after its most
    recent occurrence that something already followed; :meth:`predict` looks up the
    last n tokens, longest first, and returns what followed them there.
    """

    def __init__(self, tokens: Sequence[int], ngram: int) -> None:
        self.ngram = ngram
        self.tokens: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(ngram + 1)]
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        """Append ``token``: the n-grams that end just before it now have a follower."""
        toks = self.tokens
        end = len(toks)  # the new token's position
        for n in range(1, min(self.ngram, end) + 1):
            self._index[n][tuple(toks[end - n : end])] = end
        toks.append(token)

    def predict(self, limit: int) -> tuple[list[int], int]:
        """``limit`` tokens that followed the longest earlier occurrence of the last
        n-gram, and that n (0 and no tokens when even the last token never occurred).

        Where what followed runs into the end of the text, the text since that
        occurrence repeats: if it is followed the same way again, it comes round again
        (a loop, a list of like lines).
        """
        toks = self.tokens
        for n in range(min(self.ngram, len(toks)), 0, -1):
            follow = self._index[n].get(tuple(toks[len(toks) - n :]))
            if follow is not None:
                period = len(toks) - follow
                return [toks[follow + i % period] for i in range(limit)], n
        return [], 0


class PassCost:
    """What a pass of the model costs per token beyond the first, measured as it runs.

    One per engine: it is a property of the model and the machine (and its load), not of
    a request. ``extra`` is an extra token's time as a share of a one-token pass.
    """

    def __init__(self) -> None:
        self.single_s: float | None = None  # running average of a one-token pass
        self.extra = PRIOR_EXTRA_TOKEN_COST
        self.draft = 0.0  # a draft model's time per drafted token, as a share of a pass

    def observe_draft(self, n_tokens: int, seconds: float) -> None:
        """Record that a draft model took ``seconds`` to draft ``n_tokens``."""
        if self.single_s:
            self.draft = _smooth(self.draft or None, seconds / (n_tokens * self.single_s))

    def observe(self, n_tokens: int, seconds: float) -> None:
        """Record that a pass of ``n_tokens`` took ``seconds``."""
        if n_tokens == 1:
            self.single_s = _smooth(self.single_s, seconds)
        elif self.single_s:
            share = (seconds - self.single_s) / (self.single_s * (n_tokens - 1))
            self.extra = max(MIN_EXTRA_TOKEN_COST, _smooth(self.extra, share))


class Speculation:
    """One sequence's prompt lookup: the drafter and the acceptance it has measured.

    The engine calls :meth:`draft` before a step and :meth:`push` with every token the
    sequence emits. Each draft's prediction (its verified part and the rest) is compared
    with the tokens pushed after it, so acceptance is measured on every step, also on
    steps that verified nothing: lookup turns itself back on where text starts to repeat.
    Acceptance is tracked apart per length of the matched n-gram (a longer match predicts
    better).
    """

    def __init__(self, params: LookupParams, tokens: Sequence[int]) -> None:
        self.params = params
        self.lookup = PromptLookup(tokens, params.ngram)
        self._hits = [0.0] * (params.ngram + 1)
        self._misses = [0.0] * (params.ngram + 1)
        self._pending: list[int] = []  # the last prediction's tokens not yet compared
        self._match = 0  # its n-gram length
        self.drafted = 0  # tokens verified as drafts
        self.accepted = 0  # of those, the ones the model chose too
        self.drafter: ModelDrafter | None = None  # set where a draft model drafts instead
        self.calibration = 1.0  # realised over predicted speed-up, running average
        self._predicted = 0.0  # the predicted speed-up of the last draft
        self.draft_s = 0.0  # what the last draft took the draft model
        self._idle = 0  # steps since the draft model last drafted
        self._probe_every = PROBE_EVERY  # steps without a draft before a look (see PROBE_MAX)
        self._probing = False  # the last draft was such a look
        self._stopped = False  # the draft model cannot pay: it drafts no more (see _model_draft)

    def acceptance(self, n: int) -> float:
        """The estimated chance that a token drafted from an n-gram match is chosen."""
        hits, misses = self._hits[n], self._misses[n]
        return (hits + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (hits + misses + PRIOR_WEIGHT)

    def push(self, token: int) -> None:
        """Record an emitted token: score the pending prediction with it, then index it."""
        if self._pending:
            hit = self._pending[0] == token
            n = self._match
            self._hits[n] = self._hits[n] * ACCEPTANCE_DECAY + hit
            self._misses[n] = self._misses[n] * ACCEPTANCE_DECAY + (not hit)
            self._pending = self._pending[1:] if hit else []
        self.lookup.push(token)

    def draft(self, limit: int, cost: PassCost) -> list[int]:
        """The tokens to verify in the next pass (at most ``limit``; none: a plain step).

        The length maximises the expected tokens per unit of time, (1 + a + … + a^k) /
        (1 + extra·k), with a this match length's acceptance; nothing is drafted unless
        that beats a plain step by ``MIN_GAIN``.
        """
        self.draft_s = 0.0
        if self.drafter is not None:
            return self._model_draft(limit, cost)
        prediction, n = self.lookup.predict(self.params.draft_max)
        self._pending, self._match = prediction, n
        # Until a one-token step has been timed, nothing calibrates what drafts cost: a
        # sequence that verified from its first step on would never learn it.
        if not prediction or limit < 1 or cost.single_s is None:
            return []
        k, self._predicted = _best_length(
            self.acceptance(n), min(len(prediction), limit), cost, self.calibration
        )
        return prediction[:k]

    def candidates(self, limit: int) -> tuple[list[int], float]:
        """What prompt lookup would draft now (at most ``limit`` tokens) and the chance
        that each of them is chosen, for a batch's plan (:class:`BatchPlanner`).

        The prediction is kept to be scored against the tokens that come, as
        :meth:`draft` keeps it. A sequence with a draft model drafts only while it
        decodes alone (its drafter has one cache row): nothing here.
        """
        self.draft_s = 0.0
        if self.drafter is not None:
            self._pending = []
            return [], 0.0
        prediction, n = self.lookup.predict(self.params.draft_max)
        self._pending, self._match = prediction, n
        if not prediction or limit < 1:
            return [], 0.0
        return prediction[:limit], self.acceptance(n)

    def counted(self, drafted: int, accepted: int) -> None:
        """Record the drafted and accepted tokens of a batch's verification pass."""
        self.drafted += drafted
        self.accepted += accepted

    def _model_draft(self, limit: int, cost: PassCost) -> list[int]:
        """The draft model's greedy continuation, as long as pays (point masses: the
        verification stays exact for any sampler)."""
        if self._stopped:
            return []
        if cost.draft and _best(1.0, self.params.draft_max, cost)[1] < MIN_DRAFTER_GAIN:
            self._stopped, self._pending = True, []
            return []
        k, self._predicted = _best_length(
            self.acceptance(0), min(self.params.draft_max, limit), cost, self.calibration
        )
        if k:  # drafting pays
            self._idle, self._probe_every, self._probing = 0, PROBE_EVERY, False
        else:
            if self._probing:  # a look just verified, and drafting still does not pay
                self._probe_every = min(2 * self._probe_every, PROBE_MAX)
                self._probing = False
            self._idle += 1
            if self._idle >= self._probe_every and limit >= 1:
                k, self._idle, self._probing = 1, 0, True
        if not k or cost.single_s is None:  # a plain step first: see draft()
            self._pending = []
            return []
        t0 = time.perf_counter()
        drafts = self.drafter.draft(self.lookup.tokens, k)
        self.draft_s = time.perf_counter() - t0
        if drafts and self.drafter.call_s is not None:
            # A draft of k tokens calls the draft model k times (a catch-up, k - 1 steps).
            cost.observe_draft(1, self.drafter.call_s)
        self._pending, self._match = list(drafts), 0
        return drafts

    def verified(self, drafted: int, accepted: int, seconds: float, cost: PassCost) -> None:
        """Record a verification pass: its drafted and accepted tokens (for reports), and
        its realised speed-up (emitted tokens per one-token pass time, drafting
        included) against the predicted one, which calibrates later predictions."""
        self.drafted += drafted
        self.accepted += accepted
        if cost.single_s and self._predicted > 0 and seconds > 0:
            realised = (accepted + 1) * cost.single_s / (seconds + self.draft_s)
            lo, hi = CALIBRATION_RANGE
            ratio = min(max(realised / self._predicted, lo), hi)
            self.calibration = min(max(_smooth(self.calibration, ratio), lo), hi)


def _best_length(
    a: float, most: int, cost: PassCost, calibration: float = 1.0
) -> tuple[int, float]:
    """The draft length k ≤ ``most`` that maximises the expected tokens per unit of time,
    (1 + a + … + a^k) / (1 + (extra + draft)·k), and that predicted speed-up; (0, 0.0)
    unless it, times ``calibration``, beats a plain step by ``MIN_GAIN``."""
    best_k, best_rate = _best(a, most, cost)
    if best_rate * calibration <= MIN_GAIN:
        return 0, 0.0
    return best_k, best_rate


def _best(a: float, most: int, cost: PassCost) -> tuple[int, float]:
    """:func:`_best_length`'s length and predicted speed-up, whatever that speed-up is."""
    best_k, best_rate = 0, 0.0
    expected, power = 1.0, 1.0
    for k in range(1, most + 1):
        power *= a
        expected += power
        rate = expected / (1.0 + (cost.extra + cost.draft) * k)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


class BatchPlanner:
    """Draft lengths for sequences that decode together, in one verification pass.

    A plain batch step of B rows costs about 1 + extra·(B − 1) one-token passes and
    emits B tokens; each drafted token adds ``extra`` to the pass and is expected to
    emit a^j more tokens (the j-th draft of a row whose drafts are chosen with chance
    a). The plan takes drafted tokens, most likely first across all rows, while each
    adds more tokens than the pass's average per unit of cost: the rate, tokens per
    time, is then the highest this cost model allows. It drafts at all only where that
    rate beats the plain step's by ``MIN_GAIN``, after ``calibration``: the running
    ratio of realised to predicted speed-ups of the batch passes verified so far (one
    per engine, as the pass cost is; it drifts back towards 1 while nothing is
    drafted, so a busy spell does not turn drafting off for good).
    """

    # How far calibration moves back to 1 per step that drafts nothing: after a pass that
    # was far slower than predicted, about 25 plain steps pass before the next draft.
    RECOVERY = 0.005

    def __init__(self) -> None:
        self.calibration = 1.0
        self._predicted = 0.0

    def plan(
        self,
        candidates: Sequence[tuple[Sequence[int], float]],
        cost: PassCost,
        max_tokens: int,
    ) -> list[list[int]]:
        """Each row's drafts (a prefix of its candidate tokens, maybe none), given each
        row's candidates and their acceptance; the pass holds at most ``max_tokens``."""
        rows = len(candidates)
        extra = cost.extra
        plain = 1.0 + extra * (rows - 1)
        tokens, spent = float(rows), plain
        room = max_tokens - rows
        # (value, row): a^j falls with j (0 < a < 1), so every row's tokens come in order.
        ranked = sorted(
            (
                (a**j, row)
                for row, (toks, a) in enumerate(candidates)
                for j in range(1, len(toks) + 1)
            ),
            key=lambda item: -item[0],
        )
        lengths = [0] * rows
        for value, row in ranked:
            if room <= 0 or value * spent <= extra * tokens:
                break
            lengths[row] += 1
            tokens += value
            spent += extra
            room -= 1
        gain = (tokens / spent) / (rows / plain)
        if not any(lengths) or gain * self.calibration <= MIN_GAIN:
            self._predicted = 0.0
            self.calibration += self.RECOVERY * (1.0 - self.calibration)
            return [[] for _ in candidates]
        self._predicted = gain
        return [list(toks[:k]) for (toks, _), k in zip(candidates, lengths, strict=True)]

    def verified(self, rows: int, emitted: int, seconds: float, cost: PassCost) -> None:
        """Record a batch verification pass: ``rows`` sequences emitted ``emitted`` tokens
        in ``seconds``; against a plain step's modelled time, that calibrates the plans."""
        if not (cost.single_s and self._predicted > 0 and seconds > 0):
            return
        plain_s = cost.single_s * (1.0 + cost.extra * (rows - 1))
        realised = (emitted / rows) * plain_s / seconds
        lo, hi = CALIBRATION_RANGE
        ratio = min(max(realised / self._predicted, lo), hi)
        self.calibration = min(max(_smooth(self.calibration, ratio), lo), hi)


class ModelDrafter:
    """A smaller model with the target's vocabulary that drafts greedily, with its own
    one-row KV cache, in the same process.

    Its drafts are its argmax tokens: point masses, so the target's verification accepts
    a draft iff its own sampler draws it, and the output is exactly the target's for any
    sampler settings. The cache holds the text it last saw; each draft first feeds what
    changed since (the tokens the target chose), from their common prefix on.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        target: torch.nn.Module,
        target_tokenizer,
        max_seq_len: int,
    ) -> None:
        if model is target:
            raise LlamalabError("the draft model must be another model than the target")
        size, target_size = model.config.num_parameters(), target.config.num_parameters()
        if size > target_size:
            raise LlamalabError(
                f"the draft model ({size:,} parameters) is larger than the target "
                f"({target_size:,}): drafting would cost more than it saves"
            )
        n = target_tokenizer.vocab_size
        if tokenizer.vocab_size != n:
            raise LlamalabError(
                f"the draft model's vocabulary has {tokenizer.vocab_size:,} tokens, the "
                f"target's {n:,}: a draft must share the target's vocabulary"
            )
        for i in range(n):
            if tokenizer.token_bytes(i) != target_tokenizer.token_bytes(i):
                raise LlamalabError(
                    f"the draft model's token {i} is {tokenizer.token_bytes(i)!r}, the "
                    f"target's {target_tokenizer.token_bytes(i)!r}: a draft must share the "
                    "target's vocabulary"
                )
        if model.config.vocab_size < n:
            raise LlamalabError("the draft model scores fewer tokens than its vocabulary holds")
        self.model = model
        self.vocab_size = n
        self.max_seq_len = min(max_seq_len, model.config.context_length)
        model.setup_cache(1, self.max_seq_len)
        self.cached: list[int] = []  # the tokens whose keys and values its cache holds
        self.call_s: float | None = None  # what one call of it takes (see draft)

    def sync(self, tokens: Sequence[int]) -> None:
        """Read ``tokens`` but the last into the cache (a prompt, ahead of its first
        draft, whose pass re-reads the last token for its logits)."""
        if len(tokens) > 1:
            with torch.inference_mode():
                self._feed(tokens[:-1])

    def _feed(self, tokens: Sequence[int]) -> tuple[torch.Tensor | None, int]:
        """Feed ``tokens`` from where they part from the cached ones (at least the last
        one): the last token's logits (None where nothing was fed) and how many were fed."""
        n = len(tokens)
        start = 0
        for a, b in zip(self.cached, tokens, strict=False):
            if a != b:
                break
            start += 1
        start = min(start, n - 1)
        fed = n - start
        model, logits = self.model, None
        while start < n:
            end = min(start + DRAFT_PREFILL_CHUNK, n)
            view = cache_view(
                torch.arange(start, end).unsqueeze(0), kv_len=end, last_only=True,
                dtype=model.dtype, device=model.device,
            )  # fmt: skip
            ids = torch.tensor([list(tokens[start:end])], dtype=torch.long)
            logits = model(ids.to(model.device), cache=view)
            start = end
        self.cached = list(tokens)
        return logits, fed

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens the draft model expects after ``tokens``, greedily.

        Sets ``call_s``, the time of one call of the draft model, from this draft's
        one-token steps, or from its catch-up pass where that fed a round's few tokens
        (a pass of a few tokens costs about a step; a long catch-up is a prefill, which
        says nothing of what drafting costs)."""
        n = len(tokens)
        k = min(k, self.max_seq_len - n + 1)
        if k < 1 or n < 1:
            return []
        model = self.model
        out: list[int] = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, fed = self._feed(tokens)
            t1 = time.perf_counter()
            for i in range(k):
                token = int(torch.argmax(logits[0, -1, : self.vocab_size]))
                out.append(token)
                if i + 1 == k:
                    break
                view = cache_view(torch.tensor([[n + i]]), dtype=model.dtype, device=model.device)
                ids = torch.tensor([[token]], dtype=torch.long)
                logits = model(ids.to(model.device), cache=view)
            t2 = time.perf_counter()
        if k > 1:
            self.call_s = (t2 - t1) / (k - 1)
        elif fed <= SHORT_CATCH_UP:
            self.call_s = t1 - t0
        self.cached = [*tokens, *out[:-1]]
        return out


def _smooth(average: float | None, value: float) -> float:
    return value if average is None else average + COST_SMOOTHING * (value - average)
