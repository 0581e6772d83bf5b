"""A generation's events turned into OpenAI's completion and chat objects.

`Transcript` follows one generation (text, usage, logprob entries released with the
text they produced); a `Reply` formats it for one endpoint, streamed or whole. The two
endpoints differ only here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from llamalab.generation import GenerationEvent
from llamalab.serve import schemas as s

LogprobEntry = tuple[int, float, list[tuple[int, float]]]


class Transcript:
    """One generation's events turned into what the API reports.

    Logprob entries travel with the text they produced: while the engine holds text back
    (it may be the start of a stop string, or half a UTF-8 character) their entries wait
    too, and the token that ended generation (EOS, or the one that completed a stop
    string) gets no entry, so the entries describe the returned text.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, *, logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # every sampled token, the one that stopped generation included
        self.finish_reason: str | None = None
        self._pending: list[LogprobEntry] = []
        # For the request log and the metrics: the clock starts when the request is
        # queued, so the time to the first token includes waiting for a batch row.
        self.started = time.monotonic()
        self.first_token_at: float | None = None

    def add(self, event: GenerationEvent) -> tuple[str, list[LogprobEntry]]:
        """Take one event; return the text and the logprob entries now released."""
        if event.token_id is not None:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if self.logprobs and event.finish_reason != "stop":
                self._pending.append(
                    (event.token_id, event.logprob or 0.0, event.top_logprobs or [])
                )
        self.finish_reason = event.finish_reason or self.finish_reason
        released: list[LogprobEntry] = []
        if event.text or event.finish_reason == "length":
            released, self._pending = self._pending, []
        return event.text, released

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from queueing to the first sampled token; None if none came."""
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tokens_per_second(self, now: float) -> float | None:
        """Decoding speed after the first token (which prefill dominates); None below two."""
        if self.first_token_at is None or self.completion_tokens < 2:
            return None
        elapsed = now - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None

    def usage(self) -> s.Usage:
        """Token counts so far."""
        return s.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    # -------------------------------------------------------------- logprob formats
    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        return self.tokenizer.token_text(token_id), list(self.tokenizer.token_bytes(token_id))

    def chat_logprobs(self, entries: Sequence[LogprobEntry]) -> s.ChatLogprobs:
        """Entries in the chat format: one object per token with its alternatives."""
        content = []
        for token_id, logprob, top in entries:
            text, raw = self._piece(token_id)
            alternatives = []
            for alt_id, alt_logprob in top:
                alt_text, alt_raw = self._piece(alt_id)
                alternatives.append(
                    s.TopLogprob(token=alt_text, logprob=alt_logprob, bytes=alt_raw)
                )
            content.append(
                s.TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alternatives)
            )
        return s.ChatLogprobs(content=content)

    def completion_logprobs(
        self, entries: Sequence[LogprobEntry], offset: int
    ) -> s.CompletionLogprobs:
        """Entries in the legacy completions format, text offsets counted from ``offset``."""
        out = s.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, logprob, top in entries:
            text, _ = self._piece(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({self._piece(i)[0]: lp for i, lp in top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


# ---------------------------------------------------------------------------- reply formats
class Reply:
    """How one endpoint spells a reply: chunks while streaming, one object at the end.

    The streaming and the whole-answer paths are the same for both endpoints (see
    `_respond`); only this spelling differs.
    """

    def __init__(self, model_id: str, transcript: Transcript, *, logprobs: bool) -> None:
        self.model_id = model_id
        self.transcript = transcript
        self.logprobs = logprobs
        self.created = int(time.time())
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"

    prefix = ""
    endpoint = ""  # the route, for the request log and the metrics

    def opening(self) -> list[s.BaseModel]:
        """Chunks sent before the first token."""
        return []

    def chunks(
        self, delta: str, released: list[LogprobEntry], finish: str | None
    ) -> list[s.BaseModel]:
        """Chunks for new text, its logprob entries and, at the end, the finish reason."""
        raise NotImplementedError

    def usage_chunk(self) -> s.BaseModel:
        """The last chunk when the client asked for usage: no choices, the token counts."""
        raise NotImplementedError

    def whole(self, text: str, entries: list[LogprobEntry]) -> s.BaseModel:
        """The whole answer (``stream: false``)."""
        raise NotImplementedError


class CompletionReply(Reply):
    """``/v1/completions``: ``text_completion`` objects, streamed or whole."""

    prefix = "cmpl"
    endpoint = "/v1/completions"

    def __init__(self, model_id: str, transcript: Transcript, *, logprobs: bool) -> None:
        super().__init__(model_id, transcript, logprobs=logprobs)
        self._offset = 0  # characters streamed so far, for logprobs' text_offset

    def _completion(
        self, choices: list[s.CompletionChoice], usage: s.Usage | None = None
    ) -> s.Completion:
        return s.Completion(
            id=self.id, created=self.created, model=self.model_id, choices=choices, usage=usage
        )

    def chunks(
        self, delta: str, released: list[LogprobEntry], finish: str | None
    ) -> list[s.BaseModel]:
        logprobs = (
            self.transcript.completion_logprobs(released, self._offset) if self.logprobs else None
        )
        self._offset += len(delta)
        choice = s.CompletionChoice(text=delta, logprobs=logprobs, finish_reason=finish)
        return [self._completion([choice])]

    def usage_chunk(self) -> s.BaseModel:
        return self._completion([], self.transcript.usage())

    def whole(self, text: str, entries: list[LogprobEntry]) -> s.BaseModel:
        logprobs = self.transcript.completion_logprobs(entries, 0) if self.logprobs else None
        choice = s.CompletionChoice(
            text=text, logprobs=logprobs, finish_reason=self.transcript.finish_reason
        )
        return self._completion([choice], self.transcript.usage())


class ChatReply(Reply):
    """``/v1/chat/completions``: ``chat.completion`` objects, or chunks when streamed."""

    prefix = "chatcmpl"
    endpoint = "/v1/chat/completions"

    def _chunk(
        self, choice: s.ChatChunkChoice | None, usage: s.Usage | None = None
    ) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model_id,
            choices=[choice] if choice is not None else [],
            usage=usage,
        )

    def opening(self) -> list[s.BaseModel]:
        # The opening chunk names the role.
        return [self._chunk(s.ChatChunkChoice(delta=s.ChatDelta(role="assistant", content="")))]

    def chunks(
        self, delta: str, released: list[LogprobEntry], finish: str | None
    ) -> list[s.BaseModel]:
        out: list[s.BaseModel] = []
        if delta or released:
            logprobs = self.transcript.chat_logprobs(released) if self.logprobs else None
            out.append(
                self._chunk(s.ChatChunkChoice(delta=s.ChatDelta(content=delta), logprobs=logprobs))
            )
        if finish:  # OpenAI closes with an empty delta that carries finish_reason
            out.append(self._chunk(s.ChatChunkChoice(delta=s.ChatDelta(), finish_reason=finish)))
        return out

    def usage_chunk(self) -> s.BaseModel:
        return self._chunk(None, self.transcript.usage())

    def whole(self, text: str, entries: list[LogprobEntry]) -> s.BaseModel:
        logprobs = self.transcript.chat_logprobs(entries) if self.logprobs else None
        choice = s.ChatChoice(
            message=s.AssistantMessage(content=text),
            logprobs=logprobs,
            finish_reason=self.transcript.finish_reason,  # type: ignore[arg-type]
        )
        return s.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model_id,
            choices=[choice],
            usage=self.transcript.usage(),
        )


# ---------------------------------------------------------------------------- helpers
