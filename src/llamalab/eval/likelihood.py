"""Log-likelihoods of continuations, computed on the same model code as generation.

A multiple-choice item is one context and a few continuations. :meth:`LikelihoodScorer.score_many`
scores many items at once, spending the model's time only where items differ:

* **a shared prefix runs once**: consecutive items whose contexts open with the same
  tokens (MMLU's description and five exemplars, the same for every item of a subject)
  share those tokens' keys and values: they run once, in cache row 0, and are copied into
  every row; each item then runs only its own tokens, starting from there;
* **single-token choices cost no pass of their own**: every choice's first token is read
  from the logits at the context's last position (MMLU's letters: one row per item);
* **items run together**: several items' new tokens run as one batch, each item in its
  own cache row (shorter ones padded: the items of a group are sorted by length first),
  and logits are computed only at the positions that are scored: a pass's cost is its
  number of operations as much as its arithmetic, and a batch shares them;
* a choice of several tokens continues in a row of its own, holding a copy of its item's
  context, in a second pass shared by every such choice of the batch.

The result equals scoring each item from scratch, one forward pass per sequence, up to
floating-point rounding (``tests/test_eval_batching.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llamalab.errors import LlamalabError
from llamalab.kv_cache import cache_view

CONTEXT_CHUNK = 512  # most new tokens of one item in one pass (bounds its attention scores)
TOKENS_PER_PASS = 1024  # most new tokens packed into one pass (several items' together)
MIN_SHARED = 8  # a common prefix shorter than this is not worth a pass of its own
CACHE_STEP = 256  # the cache's length is rounded up to this (fewer reallocations)


@dataclass
class _Request:
    """One item (or part of an item's choices) to score: ``context`` already cut to fit."""

    index: int  # the caller's request
    first: int  # the index of continuations[0] among the request's continuations
    context: list[int]
    continuations: list[list[int]]
    shared: int = 0  # context tokens shared with its group, in every row before it runs
    start: int = 0  # the first context position not yet in its cache row
    row: int = 0  # its first cache row within a batch

    @property
    def rows(self) -> int:
        # Its context's row, and a row of its own for each choice of several tokens
        # (single-token choices are read from the context's last logits).
        multi = sum(len(c) > 1 for c in self.continuations)
        return 1 + multi if multi else 1

    @property
    def new_tokens(self) -> int:
        return len(self.context) - self.start + sum(len(c) - 1 for c in self.continuations)


class LikelihoodScorer:
    """Scores token continuations with a :class:`~llamalab.model.Transformer`.

    Args:
        model: the model (float or packed); its KV cache is (re)allocated here, so an
            :class:`~llamalab.generation.Engine` on the same model must be created after
            the last scoring call, or recreated.
        max_seq_len: the longest context plus continuation, in tokens (default: the
            model's context length); longer contexts lose their oldest tokens, as
            lm-eval's models do.
        max_rows: cache rows used together: items of single-token choices scored in one
            pass, or choices of several tokens (more run in several passes). The cache
            holds ``max_rows`` rows as long as the longest item (see :attr:`cache_bytes`).
    """

    def __init__(
        self, model: torch.nn.Module, *, max_seq_len: int | None = None, max_rows: int = 8
    ) -> None:
        self.model = model
        limit = model.config.context_length
        self.max_seq_len = min(max_seq_len or limit, limit)
        if self.max_seq_len < 2:
            raise LlamalabError(f"the context must hold at least 2 tokens, got {self.max_seq_len}")
        if max_rows < 1:
            raise LlamalabError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        # A choice of several tokens needs a row beside its context's: two at the least.
        self._rows = max(2, max_rows)
        self.device = model.device
        self.dtype = model.dtype
        self._cache = None  # the layer-0 cache object this scorer allocated
        self._cache_len = 0

    @property
    def cache_bytes(self) -> int:
        """The bytes of the KV cache this scorer holds now (0 before the first call)."""
        if self._cache is None:
            return 0
        return sum(
            layer.attention.kv_cache.k.nbytes + layer.attention.kv_cache.v.nbytes
            for layer in self.model.layers
            if layer.attention.kv_cache is not None
        )

    def _ensure_cache(self, length: int) -> None:
        """A cache of ``max_rows`` rows of at least ``length`` slots, allocated here.

        Someone else (an Engine) may have replaced the cache since: check identity."""
        current = self.model.layers[0].attention.kv_cache
        if current is None or current is not self._cache or self._cache_len < length:
            size = min(self.max_seq_len, -(-length // CACHE_STEP) * CACHE_STEP)
            self.model.clear_cache()  # the old cache's memory goes before the new one comes
            self._cache = None
            self.model.setup_cache(self._rows, size)
            self._cache = self.model.layers[0].attention.kv_cache
            self._cache_len = size

    def score(
        self, context: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, bool]]:
        """For each continuation: (sum of its tokens' log-probabilities given ``context``,
        whether greedy decoding would produce exactly it)."""
        return self.score_many([(context, continuations)])[0]

    def score_many(
        self,
        requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[tuple[float, bool]]]:
        """:meth:`score` for each (context, continuations) request, computed together.

        Consecutive requests whose contexts open with the same tokens share them: put the
        requests of one few-shot prompt next to each other. ``on_done(k)`` is told each
        time ``k`` more requests are finished (a progress bar)."""
        parts: list[_Request] = []
        for index, (context, continuations) in enumerate(requests):
            if not context:
                raise LlamalabError("a scored context needs at least one token")
            if not continuations or any(len(c) == 0 for c in continuations):
                raise LlamalabError("every continuation needs at least one token")
            longest = max(len(c) for c in continuations)
            if longest > self.max_seq_len - 1:
                raise LlamalabError(
                    f"a continuation of {longest} tokens does not fit the context of "
                    f"{self.max_seq_len} tokens"
                )
            if len(context) + longest - 1 > self.max_seq_len:
                # Too long for the window: each choice keeps the newest context tokens
                # that fit beside it (lm-eval's rule, per request), so each runs alone.
                for j, c in enumerate(continuations):
                    room = self.max_seq_len - (len(c) - 1)
                    parts.append(_Request(index, j, list(context)[-room:], [list(c)]))
                continue
            # More multi-token choices than rows: their own parts, each with the context.
            per_part = self._rows - 1
            for at in range(0, len(continuations), per_part):
                chunk = [list(c) for c in continuations[at : at + per_part]]
                parts.append(_Request(index, at, list(context), chunk))
        results: list[list[tuple[float, bool] | None]] = [
            [None] * len(continuations) for _, continuations in requests
        ]
        if not parts:
            return []  # type: ignore[return-value]
        self._ensure_cache(
            max(len(p.context) + max(len(c) for c in p.continuations) - 1 for p in parts)
        )
        remaining = [len(continuations) for _, continuations in requests]
        with torch.inference_mode():
            for prefix, members in _groups(parts):
                self._prefill_shared(prefix, members)
                # Similar lengths together: less waiting on the longest member of a pass.
                members.sort(key=lambda m: m.new_tokens, reverse=True)
                for batch in self._batches(members):
                    for m, scored in zip(batch, self._run_batch(batch), strict=True):
                        results[m.index][m.first : m.first + len(scored)] = scored
                        remaining[m.index] -= len(scored)
                        if remaining[m.index] == 0 and on_done is not None:
                            on_done(1)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ passes
    def _view(self, row: int, start: int, end: int, last_only: bool):
        return cache_view(
            torch.arange(start, end).unsqueeze(0), row=row, kv_len=end, last_only=last_only,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip

    def _prefill(self, tokens: Sequence[int], row: int, start: int, end: int) -> None:
        """Run ``tokens[start:end]`` at positions start..end in cache ``row`` (no logits used)."""
        for a in range(start, end, CONTEXT_CHUNK):
            b = min(a + CONTEXT_CHUNK, end)
            ids = torch.tensor([tokens[a:b]], dtype=torch.long, device=self.device)
            self.model(ids, cache=self._view(row, a, b, last_only=True))

    def _copy_slots(self, source: int, rows: range, start: int, end: int) -> None:
        """Copy cache row ``source``'s slots start..end into ``rows``."""
        if not rows or end <= start:
            return
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            cache.k[rows.start : rows.stop, :, start:end] = cache.k[
                source : source + 1, :, start:end
            ]
            cache.v[rows.start : rows.stop, :, start:end] = cache.v[
                source : source + 1, :, start:end
            ]

    def _prefill_shared(self, prefix: int, members: list[_Request]) -> None:
        """The group's common first ``prefix`` tokens: run once in row 0, copied to the
        rows its members will use; each member then starts at ``prefix``."""
        for m in members:
            m.shared = m.start = prefix
        if prefix == 0:
            return
        self._prefill(members[0].context, 0, 0, prefix)
        rows = min(self._rows, sum(m.rows for m in members))
        self._copy_slots(0, range(1, rows), 0, prefix)

    def _batches(self, members: list[_Request]):
        """Members (longest first) packed into passes of at most ``max_rows`` rows and
        (but for a single long member) ``TOKENS_PER_PASS`` tokens, padding included."""
        batch: list[_Request] = []
        rows = width = 0
        for m in members:
            # Its first pass takes at most one chunk of its context (see _run_batch).
            n = min(len(m.context) - m.start, CONTEXT_CHUNK)
            wider = max(width, n)
            if batch and (rows + m.rows > self._rows or wider * (len(batch) + 1) > TOKENS_PER_PASS):
                yield batch
                batch, rows, wider = [], 0, n
            batch.append(m)
            rows += m.rows
            width = wider
        if batch:
            yield batch

    def _padded_pass(
        self, first_row: int, rows: list[tuple[int, list[int]]], last_only: bool
    ) -> torch.Tensor:
        """One pass over several cache rows' new tokens: ``rows[i]`` = (position of its
        first token, tokens) for cache row ``first_row + i``. Logits (B, T or 1, vocab).

        Shorter rows are padded on the left, so that every row's last token is the
        batch's last column (``last_only`` reads it). The padding takes the slot just
        after its row's last token: no real token of that row looks at it (attention is
        causal by position), and a later pass writes its own there."""
        width = max(len(t) for _, t in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.empty(len(rows), width, dtype=torch.long)
        for i, (start, tokens) in enumerate(rows):
            pad = width - len(tokens)
            ids[i, pad:] = torch.tensor(tokens, dtype=torch.long)
            positions[i, pad:] = torch.arange(start, start + len(tokens))
            positions[i, :pad] = start + len(tokens)
        if len(rows) == 1 or bool((positions == positions[:1]).all()):
            positions = positions[:1]  # one run for every row: a slice write, one mask
        view = cache_view(
            positions, row=first_row, last_only=last_only, dtype=self.dtype, device=self.device
        )
        return self.model(ids.to(self.device), cache=view)

    def _run_batch(self, batch: list[_Request]) -> list[list[tuple[float, bool]]]:
        # Layout: the members' contexts in rows 0..M-1, then a row per multi-token choice.
        # A member's context beyond one chunk runs first in its own row, in chunks.
        for i, m in enumerate(batch):
            m.row = i
            if len(m.context) - m.start > CONTEXT_CHUNK:
                cut = len(m.context) - CONTEXT_CHUNK
                self._prefill(m.context, i, m.start, cut)
                m.start = cut
        # Pass 1: every member's remaining context; logits at its last position only.
        logits = self._padded_pass(
            0, [(m.start, m.context[m.start :]) for m in batch], last_only=True
        )
        firsts = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()  # (M, vocab)
        # Pass 2: the later tokens of every multi-token choice, each in a row holding a
        # copy of its item's context (the shared prefix is in every row already).
        rows, owners = [], []
        row = len(batch)
        for i, m in enumerate(batch):
            length = len(m.context)
            first_choice_row = row
            for j, c in enumerate(m.continuations):
                if len(c) > 1:
                    rows.append((length, c[:-1]))
                    owners.append((i, j))
                    row += 1
            self._copy_slots(i, range(first_choice_row, row), m.shared, length)
        rest: dict[tuple[int, int], torch.Tensor] = {}
        if rows:
            out = torch.log_softmax(self._padded_pass(len(batch), rows, False).float(), dim=-1)
            out = out.cpu()
            width = out.shape[1]
            for k, (owner, (_, tokens)) in enumerate(zip(owners, rows, strict=True)):
                rest[owner] = out[k, width - len(tokens) :]  # its own tokens, not the padding
        results = []
        for i, m in enumerate(batch):
            first = firsts[i]
            best = int(first.argmax())
            scored = []
            for j, c in enumerate(m.continuations):
                logprob = float(first[c[0]])
                greedy = best == c[0]
                if len(c) > 1:
                    steps = rest[i, j]  # (len - 1, vocab)
                    targets = torch.tensor(c[1:], dtype=torch.long)
                    logprob += float(steps.gather(1, targets.unsqueeze(1)).sum())
                    greedy = greedy and bool((steps.argmax(dim=-1) == targets).all())
                scored.append((logprob, greedy))
            results.append(scored)
        return results

    def token_logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        """Log-probabilities (float64, CPU) of ``tokens[1:]``, each given the ones before it,
        in one causal pass without the cache (perplexity windows)."""
        if not 2 <= len(tokens) <= self.max_seq_len:
            raise LlamalabError(
                f"a scored window needs 2 to {self.max_seq_len} tokens, got {len(tokens)}"
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(ids[:, :-1])  # (1, T - 1, vocab)
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            picked = logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        return picked.double().cpu()


def _common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first tokens ``a`` and ``b`` share, at most ``limit``."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _groups(parts: list[_Request]) -> list[tuple[int, list[_Request]]]:
    """Consecutive requests grouped by the context tokens they share: [(prefix, members)].

    A request joins the group before it while they still share at least ``MIN_SHARED``
    tokens and half the group's prefix so far (a few-shot prompt's exemplars, not a
    question's first words). Every member keeps at least its last context token to run
    itself (its logits score the choices). Groups that share nothing worth a pass are
    merged, so that their members still run together."""
    raw: list[tuple[int, list[_Request]]] = []
    for part in parts:
        own = len(part.context) - 1
        if raw:
            prefix, members = raw[-1]
            shared = _common_length(members[0].context, part.context, min(prefix, own))
            if shared >= MIN_SHARED and 2 * shared >= prefix:
                raw[-1] = (shared, members + [part])
                continue
        raw.append((own, [part]))
    out: list[tuple[int, list[_Request]]] = []
    for prefix, members in raw:
        if len(members) < 2 or prefix < MIN_SHARED:
            prefix = 0  # nothing shared: a pass of its own would only add work
        if out and prefix == 0 and out[-1][0] == 0:
            out[-1][1].extend(members)
        else:
            out.append((prefix, members))
    return out


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair, tokenized the way lm-eval does it.

    Spaces ending the context move to the continuation (a BPE vocabulary joins a space to
    the word after it); the two are encoded together and split where the context's own
    encoding ends, so the continuation's tokens are those of the joined text. An empty
    context becomes the document-start token (BOS, else EOS).
    """
    return split_pairs(tokenizer, context, [continuation])[0]


def split_pairs(
    tokenizer, context: str, continuations: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """:func:`split_pair` for each continuation of one context, the context encoded once."""
    if not context:
        return [_split_empty(tokenizer, c) for c in continuations]
    trailing = len(context) - len(context.rstrip())
    tail = context[len(context) - trailing :]
    context = context[: len(context) - trailing]
    head = tokenizer.encode(context, special=False)
    out = []
    for continuation in continuations:
        whole = tokenizer.encode(context + tail + continuation, special=False)
        out.append((head, whole[len(head) :]))
    return out


def _split_empty(tokenizer, continuation: str) -> tuple[list[int], list[int]]:
    # No context: the continuation follows the document-start token.
    ids = tokenizer.encode(continuation, add_bos=False, special=False)
    start = document_start(tokenizer)
    if ids and ids[0] == start:
        return ids[:1], ids[1:]
    return [start], ids


def document_start(tokenizer) -> int:
    """The token that stands before a text with no context: BOS, else EOS."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise LlamalabError("the tokenizer has neither BOS nor EOS to start a document with")
    return start
