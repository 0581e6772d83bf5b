"""The one generation engine that the CLI, the server and the tests all drive.

An :class:`Engine` owns a model with a preallocated KV cache of ``max_batch`` rows. Each
row holds one independent sequence with its own positions, so sequences of different
lengths share decode steps without any padding, and a new request can join between two
steps (continuous batching). A row remembers which tokens its cache holds; a new request
that starts with the same tokens (the next turn of a chat) only prefills what is new.

Per step the work is: one forward pass over the active rows (tokens (B, 1)), then for each
row a pure sampling function, the incremental detokenizer and the stop-string matcher.
Nothing per token grows with the length of the text.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llamalab.errors import LlamalabError
from llamalab.generation.sampling import SamplingParams, sample, top_logprobs
from llamalab.generation.stopping import StopStringMatcher

KV_LEN_ROUNDING = 64  # attend over a multiple of this many cache slots


@dataclass(frozen=True)
class Request:
    """What to generate: a prompt (ids), how to sample, and when to stop."""

    prompt_ids: Sequence[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: no logprobs; k ≥ 0: the chosen token's and k alternatives
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationEvent:
    """One generated token (or the final flush) as the caller sees it."""

    token_id: int | None  # None for an event that only releases held-back text
    text: str  # newly printable text (held back while it may be part of a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length" or None while running


@dataclass
class Timing:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else 0.0,
            "time_to_first_token_s": self.first_token_s,
        }


class Generation:
    """The state of one request while it runs (the public name is ``Engine.submit``'s result)."""

    _ids = itertools.count()

    def __init__(self, request: Request, row: int, tokenizer) -> None:
        self.id = next(self._ids)
        self.request = request
        self.row = row
        self.ids: list[int] = []  # generated ids (stop tokens and stop-string tokens excluded at the end)
        self._starts: list[int] = []  # where each generated token's text begins in the decoded text
        self._decoded = 0  # characters decoded so far
        self.text = ""
        self.finish_reason: str | None = None
        self.last_token: int | None = None
        self.pos = 0  # position of last_token, the next token to feed
        self.timing = Timing(prompt_tokens=len(request.prompt_ids))
        self._decoder = tokenizer.stream_decoder()
        self._matcher = StopStringMatcher(request.stop)
        self._stop_ids = frozenset() if request.ignore_eos else tokenizer.stop_ids
        seed = request.sampling.seed
        self._generator = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        self._recent: list[int] = list(request.prompt_ids[-request.sampling.repeat_last_n :])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: torch.Tensor, max_pos: int) -> GenerationEvent:
        """Choose the next token from this row's logits (V,) and turn it into an event."""
        req = self.request
        recent = None
        if req.sampling.repeat_penalty != 1.0 and req.sampling.repeat_last_n > 0:
            recent = torch.tensor(self._recent[-req.sampling.repeat_last_n :], dtype=torch.long)
        token = sample(logits, req.sampling, self._generator, recent)
        logprob = alternatives = None
        if req.logprobs is not None:
            logprob, alternatives = top_logprobs(logits, token, req.logprobs)
        if token in self._stop_ids:
            return self._finish("stop", token, logprob, alternatives)
        self.ids.append(token)
        self._recent.append(token)
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
        if len(self.ids) >= req.max_tokens or self.pos >= max_pos:
            return self._finish("length", token, logprob, alternatives, out)
        self.text += out
        return GenerationEvent(token, out, logprob, alternatives)

    def _finish(self, reason, token, logprob, alternatives, out: str = "") -> GenerationEvent:
        if reason == "length" or not self._matcher.stopped:
            tail = self._decoder.flush()
            out += self._matcher.feed(tail) if tail else ""
            out += self._matcher.flush()
        self.text += out
        self.finish_reason = reason
        return GenerationEvent(token, out, logprob, alternatives, reason)


class Engine:
    """A model, its tokenizer and a KV cache of ``max_batch`` independent rows."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch: int = 1,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        if max_seq_len is not None and max_seq_len < 2:
            raise LlamalabError(f"the context must hold at least 2 tokens, got {max_seq_len}")
        self.max_seq_len = min(max_seq_len or 2048, model.config.context_length)
        self.device = model.tok_embeddings.weight.device
        self.threads = torch.get_num_threads()
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        model.setup_cache(max_batch, self.max_seq_len)
        self._rows: list[Generation | None] = [None] * max_batch
        self._cached: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose K/V each row holds

    # ------------------------------------------------------------------ admission
    @property
    def active(self) -> list[Generation]:
        return [s for s in self._rows if s is not None]

    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self._rows)

    def submit(self, request: Request) -> tuple[Generation, GenerationEvent]:
        """Admit a request into a free row: prefill its prompt and choose its first token."""
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
        row = self._choose_row(prompt)
        seq = Generation(request, row, self.tokenizer)
        self._rows[row] = seq
        start = time.perf_counter()
        try:
            logits = self._prefill(row, prompt, seq.timing)
            seq.pos = len(prompt)
            event = seq.accept(logits, self.max_seq_len)
        except BaseException:
            self._rows[row] = None
            self._cached[row] = []
            raise
        seq.timing.first_token_s = time.perf_counter() - start
        if seq.finished:
            self._release(seq)
        return seq, event

    def _choose_row(self, prompt: list[int]) -> int:
        free = [r for r, s in enumerate(self._rows) if s is None]
        if not free:
            raise LlamalabError(f"all {self.max_batch} batch slots are busy")
        # Prefer the free row whose cache already holds the longest prefix of this prompt.
        return max(free, key=lambda r: (_common_prefix(self._cached[r], prompt), -r))

    def _prefill(self, row: int, prompt: list[int], timing: Timing) -> torch.Tensor:
        # Reuse the row's cached prefix; always recompute at least the last prompt token,
        # whose logits choose the first new token.
        reuse = min(_common_prefix(self._cached[row], prompt), len(prompt) - 1)
        self._cached[row] = prompt[:reuse]
        chunks = range(reuse, len(prompt), self.prefill_chunk)
        bar = None
        if self.progress and len(prompt) - reuse > self.prefill_chunk:
            from tqdm import tqdm

            bar = tqdm(total=len(prompt) - reuse, desc="prefill", unit="tok", leave=False)
        _use_threads(self.threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in chunks:
                end = min(start + self.prefill_chunk, len(prompt))
                tokens = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)
                pos = torch.arange(start, end, device=self.device).unsqueeze(0)
                logits = self.model(tokens, pos, row=row, kv_len=end, last_only=True)
                self._cached[row] = prompt[:end]
                if bar is not None:
                    bar.update(end - start)
        if bar is not None:
            bar.close()
        timing.prefill_s = time.perf_counter() - t0
        timing.prefill_tokens = len(prompt) - reuse
        return logits[0, -1].float().cpu()  # sampling runs on the CPU

    # ------------------------------------------------------------------ decoding
    def step(self) -> list[tuple[Generation, GenerationEvent]]:
        """One decode step for every running sequence; returns each one's event."""
        running = [s for s in self._rows if s is not None]
        if not running:
            return []
        lo = min(s.row for s in running)
        hi = max(s.row for s in running) + 1
        tokens = torch.zeros(hi - lo, 1, dtype=torch.long)
        pos = torch.zeros(hi - lo, 1, dtype=torch.long)
        for r in range(lo, hi):
            seq = self._rows[r]
            if seq is not None:
                tokens[r - lo, 0], pos[r - lo, 0] = seq.last_token, seq.pos
            else:
                # An idle row inside the span computes a throwaway token just past what its
                # cache holds, so its cached prefix stays intact.
                p = min(len(self._cached[r]), self.max_seq_len - 1)
                del self._cached[r][p:]
                pos[r - lo, 0] = p
        # One sequence attends to exactly its slots, with no mask; a batch rounds kv_len up
        # so that rows of different lengths share a small set of shapes.
        kv_len = int(pos.max()) + 1
        if hi - lo > 1:
            kv_len = _round_up(kv_len, self.max_seq_len)
        # Decoding one sequence is a chain of small ops where waking a second CPU thread
        # costs more than it gains (measured: 27 ms vs 43 ms per SmolLM2 step); prefill
        # and batches keep every thread.
        _use_threads(1 if hi - lo == 1 and self.device.type == "cpu" else self.threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(tokens.to(self.device), pos.to(self.device), row=lo, kv_len=kv_len)
            logits = logits[:, -1].float().cpu()  # (rows, vocab): sampling runs on the CPU
        elapsed = time.perf_counter() - t0
        events = []
        for seq in running:
            self._cached[seq.row].append(seq.last_token)
            seq.pos += 1
            seq.timing.decode_tokens += 1
            seq.timing.decode_s += elapsed
            event = seq.accept(logits[seq.row - lo], self.max_seq_len)
            events.append((seq, event))
            if seq.finished:
                self._release(seq)
        return events

    def cancel(self, seq: Generation) -> None:
        """Stop a sequence early (a client went away) and free its row at once."""
        if self._rows[seq.row] is seq:
            seq.finish_reason = seq.finish_reason or "cancelled"
            self._release(seq)

    def _release(self, seq: Generation) -> None:
        if self._rows[seq.row] is seq:
            self._rows[seq.row] = None

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

    def generate_batch(self, requests: Sequence[Request]) -> list[Generation]:
        """Run several requests together to the end; returns their finished states."""
        if len(requests) > self.max_batch:
            raise LlamalabError(f"{len(requests)} requests but the engine has {self.max_batch} rows")
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
