"""The one generation engine that the CLI, the server and the tests all drive.

An :class:`Engine` owns a model with a preallocated KV cache of ``max_batch`` rows. Each
row holds one independent sequence with its own positions, so sequences of different
lengths share decode steps without any padding, and a new request can join between two
steps (continuous batching). A row remembers which tokens its cache holds; a new request
that starts with the same tokens (the next turn of a chat) only prefills what is new.

Two ways in:

* :meth:`Engine.submit` prefills the whole prompt at once and returns the first token:
  the shortest time to first token when nothing else is running (the CLI).
* :meth:`Engine.add` only reserves a row and queues the prompt; every :meth:`Engine.step`
  then computes one prefill chunk besides one decode step for every running sequence, so
  a long prompt never stalls the streams already decoding for longer than one chunk (the
  server). The chunk is sized by time: about as long as a decode step takes (measured as
  the engine runs), so a step that carries one is about twice as long as one that does
  not, whatever the machine, the model or the load.

On a model with llamalab's native step (``kernels/decode_path.py``) no pass, prompt chunk
or decode step, ever holds more tokens than that step takes (63), so each token is
computed bit for bit as it would be alone: a reply does not depend on how timing cut its
prompt or on which rows shared its passes (see ``_native_room``).

Per step the decode work is one forward pass over the running rows (tokens (B, 1)), then
for each row a pure sampling function, the incremental detokenizer and the stop-string
matcher. A failure in one row's share of that work ends that row only, with an event
whose ``finish_reason`` is ``"error"``; the other rows carry on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.grammar import Constraint, Grammar, GrammarCompiler
from llamalab.generation.params import DEFAULT_LOOKUP, GREEDY, LookupParams
from llamalab.generation.sampling import SamplingParams, sample, top_logprobs
from llamalab.generation.speculative import (
    BatchPlanner,
    ModelDrafter,
    PassCost,
    Speculation,
    verifies_exactly,
)
from llamalab.generation.stopping import StopStringMatcher
from llamalab.kernels.decode_path import native_pass_tokens
from llamalab.kv_cache import CacheView, Segments, cache_view

if TYPE_CHECKING:
    from llamalab.tokenizer.base import Tokenizer

log = logging.getLogger("llamalab.generation")

KV_LEN_ROUNDING = 64  # attend over a multiple of this many cache slots
# Prefill chunks while other sequences decode. On SmolLM2-135M (Q4_1, 2 shared cores) a
# 4-stream decode step took ~40 ms and prefill 2.5-7 ms per prompt token depending on the
# load (more late in a 2,000-token prompt, where each token attends over more slots): a
# fixed token count cannot keep the streams' gaps under 3x their median both idle and
# loaded, so the chunk is sized by time, PREFILL_SHARE x the measured decode step time,
# between MIN_PREFILL_CHUNK and the engine's prefill_chunk tokens.
DEFAULT_PREFILL_CHUNK = 128  # the most prompt tokens a step takes while others decode
PREFILL_SHARE = 0.6  # what a chunk may add to a decode step, in decode steps
MIN_PREFILL_CHUNK = 4  # fewer would admit a long prompt too slowly
PROBE_PREFILL_CHUNK = 16  # the first chunk, before any prefill time was measured
TIMING_SMOOTHING = 0.25  # weight of the newest decode step time in its running average
# Prompt tokens per forward pass when nobody waits on the step: larger passes run the
# matmuls more efficiently, and this bounds the attention mask (chunk x context).
IDLE_PREFILL_CHUNK = 512
ERROR_MESSAGE_CHARS = 200  # an error event's message is cut to this length


@dataclass(frozen=True)
class Request:
    """What to generate: a prompt (ids), how to sample, and when to stop."""

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: no logprobs; k ≥ 0: the chosen token's and k alternatives
    ignore_eos: bool = False
    grammar: Grammar | None = None  # the text must match it (JSON Schema, GBNF/Lark, regex)
    # Prompt lookup decoding (generation/speculative.py): the same tokens, sooner where the
    # reply repeats its prompt; None turns it off. Used while the sequence is the only one
    # decoding. On by default: on SmolLM2 it doubled decode speed on replies that quote
    # their input and kept free-form chat at par (bench/bench_speculative.py).
    lookup: LookupParams | None = DEFAULT_LOOKUP
    # Which LoRA adapter the row runs where the model serves several (``model.lora_rows``,
    # train/lora.py's serve_adapters): 0 is the base.
    adapter: int = 0


@dataclass(frozen=True)
class GenerationEvent:
    """One generated token (or the final flush, or a failure) as the caller sees it."""

    token_id: int | None  # None for an event that carries no new token (a failure)
    text: str  # newly printable text (held back while it may be part of a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "error", or None while running
    error: str | None = None  # with finish_reason "error": a short message fit for a client


@dataclass
class Timing:
    """Where one request's time went; ``as_dict`` gives the rates the CLI reports."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    draft_tokens: int = 0  # tokens drafted by prompt lookup and verified by the model
    accepted_tokens: int = 0  # of those, the ones the model chose too

    def as_dict(self) -> dict[str, float]:
        """Token counts, tokens per second, and the time to the first token."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "time_to_first_token_s": self.first_token_s,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_tokens,
        }


class Generation:
    """The state of one request while it runs (returned by ``Engine.add`` and ``Engine.submit``)."""

    def __init__(
        self,
        request: Request,
        row: int,
        tokenizer: Tokenizer,
        constraint: Constraint | None = None,
    ) -> None:
        self.request = request
        self.constraint = constraint
        self.row = row
        self.prompt: list[int] = list(request.prompt_ids)
        self.prefilled = 0  # prompt tokens whose keys and values the row's cache holds
        self.ids: list[
            int
        ] = []  # generated ids (stop tokens and stop-string tokens excluded at the end)
        self._starts: list[int] = []  # where each generated token's text begins in the decoded text
        self._decoded = 0  # characters decoded so far
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it failed, when finish_reason is "error"
        self.last_token: int | None = None  # None until the prompt is prefilled
        self.pos = 0  # position of last_token, the next token to feed
        self.timing = Timing(prompt_tokens=len(self.prompt))
        self._added = time.perf_counter()
        self._decoder = tokenizer.stream_decoder()
        self._matcher = StopStringMatcher(request.stop)
        # A grammar allows the stop tokens only where its text is complete: there they end
        # the reply even with ignore_eos.
        ignore = request.ignore_eos and request.grammar is None
        self._stop_ids = frozenset() if ignore else tokenizer.stop_ids
        seed = request.sampling.seed
        self._generator = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        self._recent: list[int] = (
            self.prompt[-request.sampling.repeat_last_n :] if request.sampling.repeat_last_n else []
        )
        # How often each token was generated so far, for the presence and frequency
        # penalties: kept as tokens come, so a step costs O(distinct tokens), not a recount.
        self._counts: dict[int, int] = {}
        # Set by Engine.submit where the model can verify drafts: else no lookup at all.
        self.speculation: Speculation | None = None

    @property
    def finished(self) -> bool:
        """Whether the sequence ended (stop, length, error or cancelled)."""
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether the prompt is still being prefilled (no token chosen yet)."""
        return self.last_token is None and not self.finished

    def accept(self, logits: torch.Tensor, max_pos: int) -> GenerationEvent:
        """Choose the next token from this row's logits (V,) and turn it into an event."""
        req = self.request
        recent = None
        if req.sampling.repeat_penalty != 1.0 and req.sampling.repeat_last_n > 0:
            recent = torch.tensor(self._recent[-req.sampling.repeat_last_n :], dtype=torch.long)
        counts = None
        if req.sampling.presence_penalty != 0.0 or req.sampling.frequency_penalty != 0.0:
            counts = self._counts
        # The logprobs below come from the raw logits: the model's distribution, not the
        # one the grammar, the bias and the penalties shaped for the choice.
        allowed = logits if self.constraint is None else self.constraint.mask(logits)
        token = sample(allowed, req.sampling, self._generator, recent, counts)
        logprob = alternatives = None
        if req.logprobs is not None:
            logprob, alternatives = top_logprobs(logits, token, req.logprobs)
        if token in self._stop_ids:
            return self._finish("stop", token, logprob, alternatives)
        if self.constraint is not None:
            self.constraint.advance(token)
        self.ids.append(token)
        if self.speculation is not None:
            self.speculation.push(token)
        self._recent.append(token)
        self._counts[token] = self._counts.get(token, 0) + 1
        self._starts.append(self._decoded)
        delta = self._decoder.feed(token)
        self._decoded += len(delta)
        out = self._matcher.feed(delta)
        if self._matcher.stopped:
            # Drop every token that contributed a character to the stop string.
            cut = len(self._matcher.emitted)
            ends = self._starts[1:] + [self._decoded]
            self.ids = [t for t, end in zip(self.ids, ends, strict=True) if end <= cut]
            return self._finish("stop", token, logprob, alternatives, out)
        self.last_token = token
        if self.constraint is not None and self.constraint.complete:
            # The grammar's text is whole and nothing may follow it: the reply is done,
            # as if the model had chosen its stop token next.
            return self._finish("stop", token, logprob, alternatives, out)
        if len(self.ids) >= req.max_tokens or self.pos >= max_pos:
            return self._finish("length", token, logprob, alternatives, out)
        self.text += out
        return GenerationEvent(token, out, logprob, alternatives)

    def _finish(
        self,
        reason: str,
        token: int,
        logprob: float | None,
        alternatives: list[tuple[int, float]] | None,
        out: str = "",
    ) -> GenerationEvent:
        if reason == "length" or not self._matcher.stopped:
            tail = self._decoder.flush()
            out += self._matcher.feed(tail) if tail else ""
            out += self._matcher.flush()
        self.text += out
        self.finish_reason = reason
        return GenerationEvent(token, out, logprob, alternatives, reason)

    def fail(self, message: str) -> GenerationEvent:
        """End the sequence with an error; the returned event carries ``message``."""
        self.finish_reason = "error"
        self.error = message
        return GenerationEvent(None, "", finish_reason="error", error=message)


class Engine:
    """A model, its tokenizer and a KV cache of ``max_batch`` independent rows.

    Args:
        model: a :class:`~llamalab.model.Transformer` (float or packed).
        tokenizer: its tokenizer; ids the model can emit beyond the tokenizer's
            vocabulary (an embedding padded to a round size) are never sampled.
        max_batch: rows of the KV cache, the most sequences that run at once.
        max_seq_len: slots per row (prompt and reply together); at most the model's
            context length.
        prefill_chunk: the most prompt tokens a :meth:`step` computes while other
            sequences decode: smaller keeps their token gaps even, larger admits a
            prompt sooner. On a model with a native step, a chunk is also cut to what
            fits beside the decode rows in one native pass (:meth:`_native_room`).
        prefill_share: size each such chunk to take about this many decode steps' time
            (measured as the engine runs), within ``MIN_PREFILL_CHUNK .. prefill_chunk``
            tokens; ``None`` makes every chunk ``prefill_chunk`` tokens.
        progress: show a progress bar while :meth:`submit` prefills a long prompt.
        draft: a smaller model with the same vocabulary (``draft_tokenizer``'s) that
            drafts instead of prompt lookup, for requests that speculate
            (``Request.lookup`` set); it keeps its own KV cache.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefill_share: float | None = PREFILL_SHARE,
        progress: bool = False,
        draft: torch.nn.Module | None = None,
        draft_tokenizer: Tokenizer | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        if max_seq_len is not None and max_seq_len < 2:
            raise LlamalabError(f"the context must hold at least 2 tokens, got {max_seq_len}")
        if prefill_chunk < 1:
            raise LlamalabError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if prefill_share is not None and not prefill_share > 0:
            raise LlamalabError(f"prefill_share must be positive, got {prefill_share}")
        self.max_seq_len = min(max_seq_len or 2048, model.config.context_length)
        self.device = model.device
        self.dtype = model.dtype
        self.threads = torch.get_num_threads()
        self.prefill_chunk = prefill_chunk
        self.prefill_share = prefill_share
        self.progress = progress
        self._decode_step_s: float | None = None  # running average of a decode step
        self._pass_cost = PassCost()  # what speculation's extra tokens cost a pass
        self._batch_plan = BatchPlanner()  # how much rows decoding together draft
        self._prefill_token_s: float | None = None  # per token, in the last interleaved chunk
        # Logits past the tokenizer's last id belong to padding rows of the embedding:
        # cutting them off is the same as masking them to -inf, for sampling and logprobs.
        self.model_vocab_size = model.config.vocab_size
        self.vocab_size = min(self.model_vocab_size, tokenizer.vocab_size)
        model.setup_cache(max_batch, self.max_seq_len)
        self.drafter = None
        if draft is not None:
            self.drafter = ModelDrafter(
                draft, draft_tokenizer or tokenizer, model, tokenizer, self.max_seq_len
            )
        self.grammars = GrammarCompiler(tokenizer, tokenizer.stop_ids, self.vocab_size)
        self._rows: list[Generation | None] = [None] * max_batch
        # The ids whose keys and values each row of the cache holds, in slots 0, 1, ...
        self._cached: list[list[int]] = [[] for _ in range(max_batch)]
        self._prefilling: deque[Generation] = deque()  # added, prompt not done, oldest first

    # ------------------------------------------------------------------ admission
    @property
    def free_rows(self) -> int:
        """Rows that can take a new request now."""
        return sum(s is None for s in self._rows)

    def add(self, request: Request) -> Generation:
        """Admit a request into a free row and queue its prompt; returns at once.

        The prompt is prefilled by later :meth:`step` calls, a chunk at a time; the step
        that completes it also returns the sequence's first event. Raises
        :class:`LlamalabError` for a request that cannot run (empty prompt, prompt too
        long for the context or holding an id outside the model's vocabulary,
        ``max_tokens`` below 1, a ``logit_bias`` id outside the vocabulary, an invalid
        grammar) or when every row is busy.
        """
        prompt = self._check(request)
        constraint = self.grammars.constraint(request.grammar) if request.grammar else None
        row = self._choose_row(prompt)
        seq = Generation(request, row, self.tokenizer, constraint)
        # A model that cannot verify drafts exactly never speculates: no index to keep.
        if request.lookup is not None and verifies_exactly(self.model, 2):
            seq.speculation = Speculation(request.lookup, seq.prompt)
            seq.speculation.drafter = self.drafter
        adapters = getattr(self.model, "lora_rows", None)
        if adapters is None and request.adapter:
            raise LlamalabError("this model runs no LoRA adapters")
        if adapters is not None and adapters[row] != request.adapter:
            self._cached[row].clear()  # keys and values another adapter computed
            adapters[row] = request.adapter
        # Reuse the row's cached prefix; always recompute at least the last prompt token,
        # whose logits choose the first new token.
        reuse = min(_common_prefix(self._cached[row], prompt), len(prompt) - 1)
        del self._cached[row][reuse:]
        seq.prefilled = reuse
        seq.timing.prefill_tokens = len(prompt) - reuse
        self._rows[row] = seq
        self._prefilling.append(seq)
        return seq

    def submit(self, request: Request) -> tuple[Generation, GenerationEvent]:
        """Admit a request, prefill its whole prompt now, and choose its first token.

        Raises :class:`LlamalabError` as :meth:`add` does; if the prefill itself fails,
        the row is freed and the exception propagates.
        """
        seq = self.add(request)
        self._prefilling.remove(seq)  # it goes ahead of any queued prompt
        bar = None
        if self.progress and len(seq.prompt) - seq.prefilled > IDLE_PREFILL_CHUNK:
            from tqdm import tqdm

            bar = tqdm(
                total=len(seq.prompt) - seq.prefilled, desc="prefill", unit="tok", leave=False
            )
        # On the native step, passes of its size: every prompt token then comes out bit for
        # bit as in the server's chunks, whatever their size (see _native_room).
        budget = native_pass_tokens(self.model) or IDLE_PREFILL_CHUNK
        try:
            while True:
                done = seq.prefilled
                logits = self._prefill_chunk(seq, budget)
                if bar is not None:
                    bar.update(seq.prefilled - done)
                if logits is not None:
                    break
            spec = seq.speculation
            if spec is not None and spec.drafter is not None:
                # The draft model reads the prompt with it, as part of the prefill, rather
                # than at its first draft, where it would cost the reply's first tokens.
                t0 = time.perf_counter()
                spec.drafter.sync(seq.prompt)
                seq.timing.prefill_s += time.perf_counter() - t0
            event = self._first_token(seq, logits)
        except BaseException:
            self._release(seq)
            raise
        finally:
            if bar is not None:
                bar.close()
        return seq, event

    def _check(self, request: Request) -> list[int]:
        prompt = list(request.prompt_ids)
        if not prompt:
            raise LlamalabError("the prompt is empty: give at least one token")
        if len(prompt) >= self.max_seq_len:
            raise LlamalabError(
                f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len} "
                "(prompt and reply together)"
            )
        if request.max_tokens < 1:
            raise LlamalabError(f"max_tokens must be at least 1, got {request.max_tokens}")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.model_vocab_size:
            raise LlamalabError(
                f"the prompt holds {lo if lo < 0 else hi}, not a token id of this model "
                f"(0 to {self.model_vocab_size - 1})"
            )
        # SamplingParams checked the ids are non-negative; only here is the vocabulary known.
        # Sampling sees the tokenizer's ids only (see vocab_size), so that is the bound.
        bias = request.sampling.logit_bias_pairs
        if bias and bias[-1][0] >= self.vocab_size:  # sorted by id: the last is the largest
            raise LlamalabError(
                f"logit_bias holds {bias[-1][0]}, not a token id of this model "
                f"(0 to {self.vocab_size - 1})"
            )
        return prompt

    def _choose_row(self, prompt: list[int]) -> int:
        free = [r for r, s in enumerate(self._rows) if s is None]
        if not free:
            raise LlamalabError(f"all {self.max_batch} batch slots are busy")
        # Prefer the free row whose cache already holds the longest prefix of this prompt.
        return max(free, key=lambda r: (_common_prefix(self._cached[r], prompt), -r))

    def _prefill_chunk(self, seq: Generation, budget: int) -> torch.Tensor | None:
        """Run the next ≤ ``budget`` prompt tokens of ``seq``; the last chunk returns the
        logits (vocab,) that choose its first token, earlier ones ``None``."""
        tokens, view, end = self._chunk_inputs(seq, budget)
        _use_threads(self.threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self._first_logits(seq, end, self.model(tokens.to(self.device), cache=view))
        self._chunk_done(seq, end, time.perf_counter() - t0)
        return logits

    def _chunk_inputs(self, seq: Generation, budget: int) -> tuple[torch.Tensor, CacheView, int]:
        """The next ≤ ``budget`` prompt tokens of ``seq`` (1, n), their view, and where they end."""
        start = seq.prefilled
        end = min(start + budget, len(seq.prompt))
        tokens = torch.tensor([seq.prompt[start:end]], dtype=torch.long)
        view = cache_view(
            torch.arange(start, end).unsqueeze(0), row=seq.row, kv_len=end, last_only=True,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip
        return tokens, view, end

    def _first_logits(self, seq: Generation, end: int, logits: torch.Tensor) -> torch.Tensor | None:
        """A chunk's logits (1, 1, vocab) as the first token's (vocab,), if it ends the prompt.

        Sampling runs on the CPU, over the tokenizer's ids only.
        """
        return logits[0, -1, : self.vocab_size].float().cpu() if end == len(seq.prompt) else None

    def _chunk_done(self, seq: Generation, end: int, elapsed: float) -> None:
        """Record that ``seq``'s cache now holds its prompt up to ``end``."""
        seq.timing.prefill_s += elapsed
        self._cached[seq.row].extend(seq.prompt[seq.prefilled : end])
        seq.prefilled = end

    def _first_token(self, seq: Generation, logits: torch.Tensor) -> GenerationEvent:
        seq.pos = len(seq.prompt)
        event = seq.accept(logits, self.max_seq_len)
        seq.timing.first_token_s = time.perf_counter() - seq._added
        if seq.finished:
            self._release(seq)
        return event

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[tuple[Generation, GenerationEvent]]:
        """Advance every sequence: one decode step for each running one, one prefill chunk.

        The chunk goes to the oldest sequence still prefilling. While other sequences
        decode, it holds :meth:`chunk_budget` tokens and rides in the same forward pass as
        their decode step (the linear layers run once over both), so their tokens keep
        coming at an even pace; when none decodes it is up to ``IDLE_PREFILL_CHUNK``
        tokens. Returns each event produced, the first token of a sequence whose prompt
        this chunk completed included. A failure in one sequence's work ends that
        sequence with a ``finish_reason="error"`` event and frees its row; a failure of
        the batched decode pass ends every sequence in the batch that way. The engine
        stays usable either way.
        """
        running = [s for s in self._rows if s is not None and not s.prefilling]
        if not self._prefilling and any(s.speculation is not None for s in running):
            events = self._speculate(running)
            if events is not None:
                return events
        # The first time both kinds of work meet, they run apart: that times a decode
        # step on its own, which the chunk budget is measured against from then on.
        room = self._native_room(running)
        if running and self._prefilling and self._decode_step_s is not None and room != 0:
            events = self._decode_and_prefill(running, self._prefilling[0], room)
            if events is not None:
                return events
            # The packed pass failed: run its parts apart, so the failure lands on its owner.
        events = []
        if running:
            t0 = time.perf_counter()
            events = self._decode(running)
            self._decode_step_s = _smooth(self._decode_step_s, time.perf_counter() - t0)
        if self._prefilling:
            seq = self._prefilling[0]
            budget = self.chunk_budget() if running else IDLE_PREFILL_CHUNK
            native = native_pass_tokens(self.model)
            if native:  # a pass of its own, on the native step
                budget = min(budget, native)
            try:
                t0, done = time.perf_counter(), seq.prefilled
                logits = self._prefill_chunk(seq, budget)
                if running:  # a pass of its own: an upper bound on what it adds when packed
                    per_token = (time.perf_counter() - t0) / (seq.prefilled - done)
                    self._prefill_token_s = _smooth(self._prefill_token_s, per_token)
                if logits is not None:
                    self._prefilling.popleft()
                    events.append((seq, self._first_token(seq, logits)))
            except Exception as exc:  # noqa: BLE001 (isolation: only this sequence fails)
                events.append((seq, self._fail(seq, exc, "prefill")))
        return events

    def _native_room(self, running: list[Generation]) -> int | None:
        """How many prompt tokens a pass beside ``running``'s decode rows may carry and
        stay on the native step; None where the model has no native step (any number).

        The native step computes each token of a pass bit for bit as a pass of that token
        alone would, while a pass too long for it runs the model's blocks, whose results
        differ in the last bits. Keeping every pass on the native step makes each token's
        result a function of its request alone, not of the chunk sizes that timing chose
        or of the rows that shared its pass, so greedy replies do not vary between runs.
        It costs prefill nothing: on SmolLM2 Q4_1 (the shared 2-vCPU machine, best of 2-6
        runs) 63-token native passes took 1.1, 2.6 and 1.2 ms a prompt token on prompts of
        512, 1,800 and 4,000 tokens, the blocks' 512-token passes 2.2, 3.6 and 3.0 (and
        1.3-1.5 in passes of 64-256 tokens on the 512-token prompt). A chunk that does not
        fit is cut rather than run in a pass of its own: beside 8 decoding rows a 400-token
        prompt went in in 0.57 s with 94 tokens decoded meanwhile, against 0.62 s and 86
        tokens as two passes a step (decode rows, then 63 prompt tokens).
        """
        native = native_pass_tokens(self.model)
        if not native:
            return None
        span = max(s.row for s in running) - min(s.row for s in running) + 1 if running else 0
        return max(native - span, 0)

    def chunk_budget(self) -> int:
        """Prompt tokens the next step prefills beside the running sequences' decode step."""
        if self.prefill_share is None:
            return self.prefill_chunk
        if self._decode_step_s is None or self._prefill_token_s is None:
            return min(self.prefill_chunk, PROBE_PREFILL_CHUNK)
        if self._prefill_token_s <= 0.0:  # chunks measured as free: as many as allowed
            return self.prefill_chunk
        fit = int(self.prefill_share * self._decode_step_s / self._prefill_token_s)
        return max(min(MIN_PREFILL_CHUNK, self.prefill_chunk), min(fit, self.prefill_chunk))

    def _decode_inputs(self, running: list[Generation]) -> tuple[torch.Tensor, CacheView, int]:
        """The decode step's tokens (rows, 1), its cache view and its first cache row."""
        lo = min(s.row for s in running)
        hi = max(s.row for s in running) + 1
        tokens = torch.zeros(hi - lo, 1, dtype=torch.long)
        pos = torch.zeros(hi - lo, 1, dtype=torch.long)
        for r in range(lo, hi):
            seq = self._rows[r]
            if seq is not None and not seq.prefilling:
                tokens[r - lo, 0], pos[r - lo, 0] = seq.last_token, seq.pos
            else:
                # A free row, or one still prefilling, inside the span computes a throwaway
                # token just past what its cache holds, so its cached prefix stays intact
                # (a prefill chunk in the same pass writes that slot again, after it).
                p = min(len(self._cached[r]), self.max_seq_len - 1)
                del self._cached[r][p:]
                pos[r - lo, 0] = p
        # One sequence attends to exactly its slots, with no mask; a batch rounds kv_len up
        # so that rows of different lengths share a small set of shapes.
        kv_len = int(pos.max()) + 1
        if hi - lo > 1:
            kv_len = _round_up(kv_len, self.max_seq_len)
        view = cache_view(pos, row=lo, kv_len=kv_len, dtype=self.dtype, device=self.device)
        return tokens, view, lo

    def _decode(self, running: list[Generation]) -> list[tuple[Generation, GenerationEvent]]:
        tokens, view, lo = self._decode_inputs(running)
        _use_threads(self.threads)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self.model(tokens.to(self.device), cache=view)
                # (rows, vocab) over the tokenizer's ids: sampling runs on the CPU.
                logits = logits[:, -1, : self.vocab_size].float().cpu()
        except Exception as exc:  # noqa: BLE001 (the batch fails; the engine carries on)
            return [(seq, self._fail(seq, exc, "decode")) for seq in running]
        elapsed = time.perf_counter() - t0
        # A plain pass of this many tokens: what speculation's passes are weighed against.
        self._pass_cost.observe(tokens.shape[0], elapsed)
        return self._accept_decoded(running, lo, logits, elapsed)

    def _decode_and_prefill(
        self, running: list[Generation], seq: Generation, room: int | None = None
    ) -> list[tuple[Generation, GenerationEvent]] | None:
        """One packed pass: the running rows' decode step and ``seq``'s next prompt chunk,
        of at most ``room`` tokens where that is given (see :meth:`_native_room`).

        Returns None, having changed nothing a retry would not redo, if the pass failed.
        """
        tokens, decode_view, lo = self._decode_inputs(running)
        budget = self.chunk_budget() if room is None else min(self.chunk_budget(), room)
        chunk, chunk_view, end = self._chunk_inputs(seq, budget)
        n = chunk.shape[1]
        packed = torch.cat([tokens.view(1, -1), chunk], dim=1)
        # Decode rows first: a throwaway token of seq's row (if inside the decode span) is
        # then overwritten by the chunk in every layer.
        segments = Segments((decode_view, chunk_view), ((tokens.shape[0], 1), (1, n)))
        _use_threads(self.threads)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                decoded, prefilled = self.model(packed.to(self.device), cache=segments)
                logits = decoded[:, -1, : self.vocab_size].float().cpu()
                first = self._first_logits(seq, end, prefilled)
        except Exception:
            log.warning("a packed decode and prefill pass failed; retrying apart", exc_info=True)
            return None
        elapsed = time.perf_counter() - t0
        if self._decode_step_s is not None:
            # What the chunk added to the step, per prompt token: the budget's cost model.
            extra = max(elapsed - self._decode_step_s, 0.0) / n
            self._prefill_token_s = _smooth(self._prefill_token_s, extra)
        self._chunk_done(seq, end, elapsed)
        events = self._accept_decoded(running, lo, logits, elapsed)
        if first is not None:
            self._prefilling.popleft()
            try:
                events.append((seq, self._first_token(seq, first)))
            except Exception as exc:  # noqa: BLE001 (isolation: only this sequence fails)
                events.append((seq, self._fail(seq, exc, "sampling")))
        return events

    def _accept_decoded(
        self, running: list[Generation], lo: int, logits: torch.Tensor, elapsed: float
    ) -> list[tuple[Generation, GenerationEvent]]:
        """Each running row takes its token from ``logits`` (rows from ``lo``, vocab)."""
        events = []
        for seq in running:
            self._cached[seq.row].append(seq.last_token)  # type: ignore[arg-type]  # running: set
            seq.pos += 1
            seq.timing.decode_tokens += 1
            seq.timing.decode_s += elapsed
            try:
                event = seq.accept(logits[seq.row - lo], self.max_seq_len)
            except Exception as exc:  # noqa: BLE001 (isolation: only this row fails)
                event = self._fail(seq, exc, "sampling")
            events.append((seq, event))
            if seq.finished:
                self._release(seq)
        return events

    def _speculate(
        self, running: list[Generation]
    ) -> list[tuple[Generation, GenerationEvent]] | None:
        """One decode step of the ``running`` sequences that also verifies drafted tokens
        (``generation/speculative.py``), all rows in one pass; None, having run nothing,
        where nothing is drafted.

        A sequence alone drafts as its own measurements say (prompt lookup or the draft
        model); sequences decoding together draft as the batch's plan says (prompt lookup
        only). Row i of a sequence's share of the pass is read only while the tokens
        chosen from rows 0 .. i-1 were its drafts, each through ``Generation.accept``
        exactly as a plain step would; its cache row keeps the accepted tokens' slots and
        later passes overwrite the rest.
        """
        # Every fed position must fit the row, and drafts past max_tokens are wasted.
        limits = [
            min(self.max_seq_len - 1 - s.pos, s.request.max_tokens - len(s.ids) - 1)
            for s in running
        ]
        room = native_pass_tokens(self.model)  # the most tokens a pass verifies exactly
        if len(running) == 1:
            spec = running[0].speculation
            assert spec is not None
            drafts = [spec.draft(min(limits[0], room - 1), self._pass_cost)]
            running[0].timing.decode_s += spec.draft_s
        else:
            candidates = [
                s.speculation.candidates(n) if s.speculation is not None else ([], 0.0)
                for s, n in zip(running, limits, strict=True)
            ]
            drafts = self._batch_plan.plan(candidates, self._pass_cost, room)
        n = sum(len(d) + 1 for d in drafts)
        if n == len(running) or not verifies_exactly(self.model, n):
            return None
        views, shapes, fed = [], [], []
        for seq, d in zip(running, drafts, strict=True):
            k = len(d) + 1
            views.append(cache_view(
                torch.arange(seq.pos, seq.pos + k).unsqueeze(0), row=seq.row,
                kv_len=seq.pos + k, dtype=self.dtype, device=self.device,
            ))  # fmt: skip
            shapes.append((1, k))
            fed += [seq.last_token, *d]
        _use_threads(self.threads)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model(
                    torch.tensor([fed], dtype=torch.long).to(self.device),
                    cache=Segments(tuple(views), tuple(shapes)),
                )
                scores = [o[0, :, : self.vocab_size].float().cpu() for o in out]
        except Exception as exc:  # noqa: BLE001 (the batch fails; the engine carries on)
            return [(seq, self._fail(seq, exc, "decode")) for seq in running]
        elapsed = time.perf_counter() - t0
        self._pass_cost.observe(n, elapsed)
        events = []
        emitted = 0
        for seq, d, logits in zip(running, drafts, scores, strict=True):
            seq.timing.decode_s += elapsed
            accepted = 0
            for i, token in enumerate([seq.last_token, *d]):
                self._cached[seq.row].append(token)  # type: ignore[arg-type]  # running: set
                seq.pos += 1
                seq.timing.decode_tokens += 1
                emitted += 1
                try:
                    event = seq.accept(logits[i], self.max_seq_len)
                except Exception as exc:  # noqa: BLE001 (isolation: only this row fails)
                    event = self._fail(seq, exc, "sampling")
                events.append((seq, event))
                hit = i < len(d) and event.token_id == d[i]
                accepted += hit
                if seq.finished or not hit:
                    break
            if d:
                assert seq.speculation is not None
                if len(running) == 1:
                    seq.speculation.verified(len(d), accepted, elapsed, self._pass_cost)
                else:
                    seq.speculation.counted(len(d), accepted)
                seq.timing.draft_tokens += len(d)
                seq.timing.accepted_tokens += accepted
            if seq.finished:
                self._release(seq)
        if len(running) > 1:
            self._batch_plan.verified(len(running), emitted, elapsed, self._pass_cost)
        return events

    def _fail(self, seq: Generation, exc: Exception, stage: str) -> GenerationEvent:
        """End ``seq`` because of ``exc``: log it in full, tell the client in one line."""
        log.error("request in row %d failed during %s", seq.row, stage, exc_info=exc)
        event = seq.fail(_client_message(exc, stage))
        self._release(seq)
        return event

    def cancel(self, seq: Generation) -> None:
        """Stop a sequence early (a client went away) and free its row at once."""
        if self._rows[seq.row] is seq:
            seq.finish_reason = seq.finish_reason or "cancelled"
            self._release(seq)

    def _release(self, seq: Generation) -> None:
        # The cache keeps what the row computed (_cached says what that is, and a failed
        # pass only ever wrote past it), so a later request may reuse the prefix.
        if self._rows[seq.row] is seq:
            self._rows[seq.row] = None
        if seq in self._prefilling:
            self._prefilling.remove(seq)

    # ------------------------------------------------------------------ convenience
    def generate(self, request: Request) -> Iterator[GenerationEvent]:
        """Run one request to the end, yielding its events (other rows must be idle)."""
        seq, event = self.submit(request)
        try:
            yield event
            while not seq.finished:
                for other, ev in self.step():
                    if other is seq:
                        yield ev
        finally:
            self.cancel(seq)

    def warm_up(self) -> None:
        """Decode a few throwaway tokens, so that a compiled decode step compiles now.

        A server calls this before it takes requests, so that no client waits for the
        compiler.
        """
        prompt = [self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0]
        self.generate_batch([Request(prompt, max_tokens=3, sampling=GREEDY, ignore_eos=True)])

    def generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        """Run several requests together to the end; returns their finished states."""
        if len(requests) > self.max_batch:
            raise LlamalabError(
                f"{len(requests)} requests but the engine has {self.max_batch} rows"
            )
        seqs: list[Generation] = []
        try:
            for r in requests:
                seqs.append(self.submit(r)[0])
            while any(not s.finished for s in seqs):
                self.step()
        finally:
            for s in seqs:
                self.cancel(s)
        return seqs


def _client_message(exc: Exception, stage: str) -> str:
    """One short line about a failure: the exception's message only (the traceback goes
    to the log), on one line and cut to ``ERROR_MESSAGE_CHARS``."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, LlamalabError):  # a bug or a device failure, not the request's fault
        text = f"internal error during {stage}" + (f": {text}" if text else "")
    text = text or f"the request failed during {stage}"
    return text if len(text) <= ERROR_MESSAGE_CHARS else text[: ERROR_MESSAGE_CHARS - 1] + "…"


def _smooth(average: float | None, value: float) -> float:
    """A running average that follows the machine's load without jumping on one outlier."""
    return value if average is None else average + TIMING_SMOOTHING * (value - average)


def _use_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _round_up(n: int, limit: int) -> int:
    return min(-(-n // KV_LEN_ROUNDING) * KV_LEN_ROUNDING, limit)
