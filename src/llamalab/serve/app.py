"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app.

Routes turn a validated request body into an engine `Request`, hand it to the
`Scheduler`, and turn the engine's events back into OpenAI's objects, either at once
(``stream: false``) or as server-sent events, one chunk per token. Every error a client
can cause comes back as OpenAI's ``{"error": {...}}`` body with a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from llamalab.errors import LlamalabError
from llamalab.generation import GenerationEvent, Request
from llamalab.serve import schemas as s
from llamalab.serve.scheduler import Scheduler, Ticket

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error to report to the client as OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            s.error_body(self.message, self.type, self.code, self.param), status_code=self.status
        )


class BearerAuth:
    """Pure ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY``.

    It runs before the body is read, so a request without the key gets 401 whatever else
    is wrong with it. The chat page, ``/health`` and ``/openapi.json`` stay open: they
    reveal nothing, and the page asks for the key itself.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing or wrong API key: send 'Authorization: Bearer KEY'"
                error = APIError(401, message, code="invalid_api_key").response()
                error.headers["WWW-Authenticate"] = "Bearer"
                await error(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Transcript:
    """One generation's events turned into what the API reports.

    Logprob entries travel with the text they produced: while the engine holds text back
    (it may be the start of a stop string, or half a UTF-8 character) their entries wait
    too, and the token that ended generation (EOS, or the one that completed a stop
    string) gets no entry, so the entries describe the returned text.
    """

    def __init__(self, tokenizer, prompt_tokens: int, *, logprobs: bool) -> None:
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # every sampled token, the one that stopped generation included
        self.finish_reason: str | None = None
        self._pending: list[tuple[int, float, list[tuple[int, float]]]] = []

    def add(
        self, event: GenerationEvent
    ) -> tuple[str, list[tuple[int, float, list[tuple[int, float]]]]]:
        """Take one event; return the text and the logprob entries now released."""
        if event.token_id is not None:
            self.completion_tokens += 1
            if self.logprobs and event.finish_reason != "stop":
                self._pending.append(
                    (event.token_id, event.logprob or 0.0, event.top_logprobs or [])
                )
        self.finish_reason = event.finish_reason or self.finish_reason
        released: list[tuple[int, float, list[tuple[int, float]]]] = []
        if event.text or event.finish_reason == "length":
            released, self._pending = self._pending, []
        return event.text, released

    def usage(self) -> s.Usage:
        return s.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    # -------------------------------------------------------------- logprob formats
    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", "replace"), list(raw)

    def chat_logprobs(self, entries) -> s.ChatLogprobs:
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

    def completion_logprobs(self, entries, offset: int) -> s.CompletionLogprobs:
        out = s.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, logprob, top in entries:
            text, _ = self._piece(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({self._piece(i)[0]: lp for i, lp in top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(payload: s.BaseModel | str) -> bytes:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n".encode()


async def _wait_for_disconnect(request: HTTPRequest) -> None:
    # The body has been read, so the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(scheduler: Scheduler, *, model_id: str, api_key: str | None = None) -> FastAPI:
    """The app for one model. The scheduler is started and stopped with the app."""
    engine = scheduler.engine
    tokenizer = engine.tokenizer
    context = engine.max_seq_len
    created = int(time.time())
    page = (
        resources.files("llamalab.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    )
    # Tokenizing a long prompt takes a while, so it runs off the event loop; one at a time,
    # because the tokenizer makes no promise about being thread-safe.
    encode_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(
        title="llamalab",
        summary="An OpenAI-compatible API for a LLaMA-family model",
        version="0.1.0",
        lifespan=lifespan,
    )
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(
                400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json"
            ).response()
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, code="invalid_value", param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _bug(_: HTTPRequest, exc: Exception) -> JSONResponse:
        return APIError(
            500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"
        ).response()

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": s.ErrorResponse, "description": "invalid request"},
        401: {"model": s.ErrorResponse, "description": "missing or wrong API key"},
        404: {"model": s.ErrorResponse, "description": "unknown model"},
    }
    streamed = {
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON, or server-sent events with stream: true",
        }
    }

    # ---------------------------------------------------------------- helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server runs {model_id!r}",
                code="model_not_found",
                param="model",
            )

    async def encode(fn: Callable[[], list[int]]) -> list[int]:
        def locked() -> list[int]:
            with encode_lock:
                return fn()

        try:
            return await asyncio.to_thread(locked)
        except LlamalabError as exc:
            raise APIError(400, str(exc), code="invalid_prompt") from exc

    def engine_request(
        body: s.CompletionRequest | s.ChatCompletionRequest,
        prompt_ids: list[int],
        default_max: int,
        logprobs: int | None,
    ) -> Request:
        # Check here what the engine would refuse, so the client gets a clear 400 and not
        # a failure half-way through a stream.
        if not prompt_ids:
            raise APIError(
                400,
                "the prompt is empty: give at least one token",
                code="empty_prompt",
                param="prompt",
            )
        if len(prompt_ids) >= context:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this server's context holds {context} (prompt and reply together)",
                code="context_length_exceeded",
            )
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max
        if max_tokens > context:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}; this server's context holds {context} tokens",
                code="invalid_value",
                param="max_tokens",
            )
        try:
            sampling = body.sampling()
        except LlamalabError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc
        # The engine ends a reply that reaches the end of the context with "length".
        return Request(
            prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=body.stop or (),
            logprobs=logprobs,
            ignore_eos=body.ignore_eos,
        )

    async def run_to_end(
        ticket: Ticket, request: HTTPRequest, transcript: Transcript
    ) -> tuple[str, list]:
        """Collect a whole reply; a client that leaves meanwhile frees its row at once."""
        text: list[str] = []
        entries: list = []

        async def collect() -> None:
            async for event in ticket.events():
                delta, released = transcript.add(event)
                text.append(delta)
                entries.extend(released)

        collector = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():  # the client is gone: nobody will read this answer
                raise APIError(
                    499, "the client closed the connection", code="client_closed_request"
                )
            try:
                collector.result()
            except LlamalabError as exc:
                raise APIError(400, str(exc)) from exc
            return "".join(text), entries
        finally:
            watcher.cancel()
            collector.cancel()
            scheduler.cancel(ticket)

    async def stream(
        ticket: Ticket,
        chunks: Callable[[str, list, str | None], list[s.BaseModel]],
        usage_chunk: Callable[[], s.BaseModel] | None,
        transcript: Transcript,
    ) -> AsyncIterator[bytes]:
        """Server-sent events; Starlette cancels this generator when the client disconnects."""
        try:
            for chunk in chunks("", [], None):  # the opening chunk (chat: the role)
                yield _sse(chunk)
            async for event in ticket.events():
                delta, released = transcript.add(event)
                if delta or released or event.finish_reason:
                    for chunk in chunks(delta, released, event.finish_reason):
                        yield _sse(chunk)
            if usage_chunk is not None:
                yield _sse(usage_chunk())
        except LlamalabError as exc:
            yield _sse(json.dumps(s.error_body(str(exc), "invalid_request_error")))
        finally:
            scheduler.cancel(ticket)  # no-op when finished; frees the row when the client left
        yield _sse("[DONE]")

    def sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", response_model=s.Health, summary="Liveness and batch occupancy")
    async def health() -> s.Health:
        return s.Health(
            model=model_id,
            active_slots=scheduler.active_slots,
            queued=scheduler.queued,
            max_batch=scheduler.max_batch,
        )

    def card() -> s.ModelCard:
        return s.ModelCard(id=model_id, created=created, context_length=context)

    @app.get(
        "/v1/models",
        response_model=s.ModelList,
        responses=errors,
        summary="The model this server runs",
    )
    async def list_models() -> s.ModelList:
        return s.ModelList(data=[card()])

    @app.get("/v1/models/{name}", response_model=s.ModelCard, responses=errors, summary="One model")
    async def get_model(name: str) -> s.ModelCard:
        check_model(name)
        return card()

    @app.post(
        "/v1/completions",
        response_model=s.Completion,
        responses={**errors, **streamed},
        summary="Continue a prompt",
    )
    async def completions(body: s.CompletionRequest, request: HTTPRequest):
        check_model(body.model)
        if isinstance(body.prompt, str):
            text_prompt = body.prompt
            prompt_ids = await encode(lambda: tokenizer.encode(text_prompt, special=True))
        else:
            prompt_ids = list(body.prompt)
            bad = next((i for i in prompt_ids if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"token id {bad} is outside the vocabulary of {tokenizer.vocab_size}",
                    code="invalid_value",
                    param="prompt",
                )
        req = engine_request(body, prompt_ids, DEFAULT_COMPLETION_MAX_TOKENS, body.logprobs)
        transcript = Transcript(tokenizer, len(prompt_ids), logprobs=body.logprobs is not None)
        cid, now = _new_id("cmpl"), int(time.time())
        ticket = scheduler.submit(req)

        if body.stream:
            offset = 0

            def chunks(delta: str, released: list, finish: str | None) -> list[s.BaseModel]:
                nonlocal offset
                if not (delta or released or finish):
                    return []  # no opening chunk in the completions format
                logprobs = (
                    transcript.completion_logprobs(released, offset)
                    if body.logprobs is not None
                    else None
                )
                offset += len(delta)
                choice = s.CompletionChoice(text=delta, logprobs=logprobs, finish_reason=finish)
                return [s.Completion(id=cid, created=now, model=model_id, choices=[choice])]

            usage = (
                (
                    lambda: s.Completion(
                        id=cid, created=now, model=model_id, choices=[], usage=transcript.usage()
                    )
                )
                if body.include_usage
                else None
            )
            return sse_response(stream(ticket, chunks, usage, transcript))

        text, entries = await run_to_end(ticket, request, transcript)
        logprobs = transcript.completion_logprobs(entries, 0) if body.logprobs is not None else None
        choice = s.CompletionChoice(
            text=text, logprobs=logprobs, finish_reason=transcript.finish_reason
        )
        return s.Completion(
            id=cid, created=now, model=model_id, choices=[choice], usage=transcript.usage()
        )

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletion,
        responses={**errors, **streamed},
        summary="Reply to a conversation",
    )
    async def chat_completions(body: s.ChatCompletionRequest, request: HTTPRequest):
        check_model(body.model)
        if tokenizer.chat_template is None:
            raise APIError(
                400, "this model has no chat template; use /v1/completions", code="no_chat_template"
            )
        messages = [m.as_template_message() for m in body.messages]
        prompt_ids = await encode(
            lambda: tokenizer.encode_chat(messages, add_generation_prompt=True)
        )
        # Without a limit a reply may fill the rest of the context (the engine stops there).
        req = engine_request(body, prompt_ids, max(1, context - len(prompt_ids)), body.logprobs_k)
        transcript = Transcript(tokenizer, len(prompt_ids), logprobs=body.logprobs)
        cid, now = _new_id("chatcmpl"), int(time.time())
        ticket = scheduler.submit(req)

        if body.stream:

            def chunks(delta: str, released: list, finish: str | None) -> list[s.BaseModel]:
                def chunk(choice: s.ChatChunkChoice) -> s.ChatCompletionChunk:
                    return s.ChatCompletionChunk(
                        id=cid, created=now, model=model_id, choices=[choice]
                    )

                if not (delta or released or finish):  # the opening chunk names the role
                    return [
                        chunk(s.ChatChunkChoice(delta=s.ChatDelta(role="assistant", content="")))
                    ]
                out = []
                if delta or released:
                    logprobs = transcript.chat_logprobs(released) if body.logprobs else None
                    out.append(
                        chunk(
                            s.ChatChunkChoice(delta=s.ChatDelta(content=delta), logprobs=logprobs)
                        )
                    )
                if finish:  # OpenAI closes with an empty delta that carries finish_reason
                    out.append(chunk(s.ChatChunkChoice(delta=s.ChatDelta(), finish_reason=finish)))
                return out

            usage = (
                (
                    lambda: s.ChatCompletionChunk(
                        id=cid, created=now, model=model_id, choices=[], usage=transcript.usage()
                    )
                )
                if body.include_usage
                else None
            )
            return sse_response(stream(ticket, chunks, usage, transcript))

        text, entries = await run_to_end(ticket, request, transcript)
        logprobs = transcript.chat_logprobs(entries) if body.logprobs else None
        choice = s.ChatChoice(
            message=s.AssistantMessage(content=text),
            logprobs=logprobs,
            finish_reason=transcript.finish_reason,
        )
        return s.ChatCompletion(
            id=cid, created=now, model=model_id, choices=[choice], usage=transcript.usage()
        )

    return app
