"""llamalab's own routes, for ``llamalab generate`` and ``llamalab chat`` on a resident model.

OpenAI's API cannot say everything a command prints: the token ids of the prompt and the
reply, each token's logprob by id, the engine's timing. These two routes speak the
engine's terms instead, so that a command answered by the server prints exactly what it
would print running the model itself:

* ``POST /llamalab/generate`` takes a prompt (text, with special tokens parsed; a
  conversation, rendered in the chat template; or ids) and the command's options, and
  streams server-sent events: first ``{"prompt_ids": [...]}``, then one event per engine
  event, then ``{"done": true, "ids", "text", "finish_reason", "timing"}`` and
  ``[DONE]``.
* ``POST /llamalab/tokenize`` renders and tokenizes a conversation (``llamalab chat``
  fits its history to the context with it).

Both reuse the OpenAI routes' checks, queueing and limits (this module imports
``app``, not the other way round: ``llamalab serve`` adds the router to the app). ``ctx`` is the context the
command would have run with: the reply ends where it would have ended there, and a
server whose own context is smaller refuses it rather than answer differently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator

from llamalab.errors import LlamalabError
from llamalab.generation.grammar import Grammar
from llamalab.serve import schemas as s
from llamalab.serve.app import (
    _check_model,
    _encode_chat,
    _encode_text,
    _engine_requests,
    _state,
    _submit,
    _warn_unknown,
    sse_event,
)
from llamalab.serve.errors import APIError
from llamalab.serve.scheduler import Unavailable

router = APIRouter()


class NativeTokenizeRequest(s._Lenient):
    """``POST /llamalab/tokenize``: a conversation's prompt ids."""

    messages: Annotated[list[s.ChatMessage], Field(min_length=1)]


class NativeGenerateRequest(s._Request):
    """``POST /llamalab/generate``: one of ``prompt``, ``messages``, ``prompt_ids``."""

    prompt: s.Text | None = None
    messages: Annotated[list[s.ChatMessage], Field(min_length=1)] | None = None
    prompt_ids: list[int] | None = None
    logprobs: Annotated[int, Field(ge=0, le=s.MAX_TOP_LOGPROBS)] | None = None
    json_schema: s.Text | None = None  # JSON Schema as JSON text (`--json-schema`)
    ctx: Annotated[int, Field(ge=2)] | None = None  # the command's --ctx

    @model_validator(mode="after")
    def _one_prompt(self) -> NativeGenerateRequest:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages and prompt_ids")
        if self.n != 1:
            raise ValueError("n: one reply per request")
        if self.json_schema is not None and (
            self.grammar is not None or self.response_format is not None
        ):
            raise ValueError("give one of json_schema, grammar and response_format")
        return self

    def constraint_field(self) -> str:
        return "json_schema" if self.json_schema is not None else super().constraint_field()

    def constraint(self) -> Grammar | None:
        if self.json_schema is not None:
            return Grammar.json_schema(self.json_schema)
        return super().constraint()


@router.post("/llamalab/tokenize", include_in_schema=False)
async def native_tokenize(body: NativeTokenizeRequest, request: HTTPRequest) -> dict[str, Any]:
    """The ids of a conversation in the chat template, with the generation prompt."""
    state = _state(request)
    if state.tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template", code="no_chat_template")
    ids = await _encode_chat(state, [m.as_template_message() for m in body.messages])
    return {"ids": ids}


@router.post("/llamalab/generate", include_in_schema=False)
async def native_generate(body: NativeGenerateRequest, request: HTTPRequest) -> StreamingResponse:
    """Generate as ``llamalab generate`` would, streaming the engine's own events."""
    state = _state(request)
    _warn_unknown(body, request)
    _check_model(state, body.model)
    engine = state.scheduler.engine
    # The command's context, as its own engine would have had it (capped by the model's).
    context = state.context
    if body.ctx is not None:
        wanted = min(body.ctx, engine.model.config.context_length)
        if wanted > state.context:
            raise APIError(
                400,
                f"this server's context holds {state.context} tokens, fewer than the "
                f"{wanted} asked for (start the server with --ctx {wanted} or more)",
                code="context_too_small",
                param="ctx",
            )
        context = wanted
    tokenizer = state.tokenizer
    if body.prompt is not None:
        prompt_ids = await _encode_text(state, body.prompt)
    elif body.messages is not None:
        if tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template", code="no_chat_template")
        prompt_ids = await _encode_chat(state, [m.as_template_message() for m in body.messages])
    else:
        prompt_ids = list(body.prompt_ids or [])
    # The engine's own words for a prompt that does not fit the command's context.
    if prompt_ids and len(prompt_ids) >= context:
        raise APIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; the context holds {context} "
            "(prompt and reply together)",
            code="context_length_exceeded",
            param="prompt",
        )
    max_tokens = body.max_tokens if body.max_tokens is not None else 256
    if prompt_ids:
        # The engine ends a reply with "length" once its position reaches the context:
        # at token `context - len(prompt) + 1`. Capping max_tokens there ends it at the
        # same token, with the same reason, on a server whose context is larger.
        max_tokens = min(max_tokens, context - len(prompt_ids) + 1)
    body = body.model_copy(update={"max_tokens": max_tokens})
    (engine_request,) = await _engine_requests(state, body, prompt_ids, max_tokens, body.logprobs)
    (ticket,) = _submit(state, [engine_request])

    def token_text(i: int) -> str:
        return tokenizer.token_text(i)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield sse_event({"prompt_ids": prompt_ids})
            async for event in ticket.events():
                if event.finish_reason == "error":
                    yield sse_event(
                        s.error_body(
                            f"generation failed: {event.error or 'unknown error'}",
                            "server_error",
                            "generation_failed",
                        )
                    )
                    break
                out: dict[str, Any] = {
                    "token_id": event.token_id,
                    "text": event.text,
                    "finish_reason": event.finish_reason,
                }
                if body.logprobs is not None and event.token_id is not None:
                    out["token"] = token_text(event.token_id)
                    out["logprob"] = event.logprob
                    out["top_logprobs"] = [
                        {"id": i, "token": token_text(i), "logprob": lp}
                        for i, lp in event.top_logprobs or []
                    ]
                yield sse_event(out)
                if event.finish_reason is not None:
                    seq = ticket.generation
                    yield sse_event(
                        {
                            "done": True,
                            "ids": list(seq.ids) if seq else [],
                            "text": seq.text if seq else "",
                            "finish_reason": event.finish_reason,
                            "timing": seq.timing.as_dict() if seq else {},
                        }
                    )
        except LlamalabError as exc:  # the engine refused the request
            yield sse_event(s.error_body(str(exc), "invalid_request_error", "invalid_request"))
        except Unavailable as exc:
            yield sse_event(s.error_body(str(exc), "server_error", "server_unavailable"))
        finally:
            state.scheduler.cancel(ticket)  # no-op when finished; frees the row otherwise
        yield sse_event("[DONE]")

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
