"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app.

Routes turn a validated request body into an engine `Request`, hand it to the
`Scheduler`, and turn the engine's events back into OpenAI's objects, either at once
(``stream: false``) or as server-sent events, one chunk per token. Every error a client
can cause comes back as OpenAI's ``{"error": {...}}`` body with a 4xx status; a bug comes
back as a 500 that says "internal error" and a request id (the traceback goes to the
log, never to the client). Every stream ends with a chunk that carries ``finish_reason``
or with an error event, and then ``data: [DONE]``.

Besides OpenAI's routes: ``/tokenize`` and ``/detokenize`` in llama.cpp's shapes, and
``/metrics`` in Prometheus' text format. Every generation that ends writes one line to
the ``llamalab.serve`` log at info::

    request cmpl-… /v1/completions prompt_tokens=5 completion_tokens=16 ttft_ms=41.2 \
tokens_per_s=58.3 finish=length

(``ttft_ms`` and ``tokens_per_s`` are ``-`` when no or one token came; ``finish`` is the
engine's finish reason, or ``error`` or ``cancelled``.)

The routes are module-level functions on one `APIRouter`; what they share (the
scheduler, the tokenizer, the limits, the metrics) is a `ServerState` on
``app.state.llamalab``. Four pure ASGI middlewares run before any route: the request
counter (for ``/metrics``), the Host check (DNS-rebinding protection when there is no API
key), the API key, and the body limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, cast

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamalab.errors import LlamalabError
from llamalab.generation import GenerationEvent, Request
from llamalab.generation.grammar import CompilerBusy
from llamalab.generation.params import DEFAULT_LOOKUP, SEED_LIMIT, LookupParams
from llamalab.serve import schemas as s
from llamalab.serve.metrics import Metrics, RequestCounter
from llamalab.serve.scheduler import Scheduler, Ticket, Unavailable

log = logging.getLogger("llamalab.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_QUEUE = 64
# A compile still running this long past its deadline means the pool that should have
# stopped it is stuck: /health says so.
COMPILE_STALL_GRACE_S = 30.0
MAX_UNKNOWN_SHOWN = 8  # unknown request fields named in the log line


from llamalab.serve.errors import APIError, unavailable
from llamalab.serve.middleware import LOOPBACK_HOSTS, BearerAuth, BodyLimit, HostCheck
from llamalab.serve.replies import ChatReply, CompletionReply, LogprobEntry, Reply, Transcript


# ---------------------------------------------------------------------------- state
@dataclass
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for a batch row; more get 503


@dataclass
class ServerState:
    """What every route needs, kept on ``app.state.llamalab``."""

    scheduler: Scheduler
    model_id: str
    limits: Limits
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # shutting down: running requests finish, new ones get 503
    # Prompt lookup for requests that do not say (serve's --lookup options); None: off.
    lookup: LookupParams | None = DEFAULT_LOOKUP
    # LoRA adapters served beside the model, by the name a request's `model` gives
    # (`MODEL:NAME`) -> their Request.adapter (see train/lora.py's serve_adapters).
    adapters: dict[str, int] = field(default_factory=dict)
    # Tokenizing runs off the event loop, one prompt at a time, because the tokenizer
    # makes no promise about being thread-safe. Each prompt's share is bounded (see
    # max_prompt_chars), so no request waits on this lock for long.
    encode_lock: threading.Lock = field(default_factory=threading.Lock)
    max_token_chars: int = 1
    # /health's `llamalab` field: the model's identity for `llamalab generate` (see client).
    identity: dict[str, Any] = field(default_factory=dict)
    page: str = ""
    # The page's own scripts, styles and the libraries it uses, by file name.
    assets: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.scheduler.engine.tokenizer

    @property
    def context(self) -> int:
        return self.scheduler.engine.max_seq_len

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt text that could fit the context.

        Every token stands for at most ``max_token_chars`` characters (the longest
        vocabulary entry, in bytes, which is never fewer than its characters), so a text
        longer than ``context × max_token_chars`` has more tokens than the context holds
        and is refused without being tokenized. Any shorter text is tokenized whole, so a
        prompt that fits is tokenized exactly, and no prompt costs more than this many
        characters of tokenizer work. (A tokenizer whose normalizer shrinks text, such as
        SentencePiece's collapsing of whitespace runs, could fit a longer text; such a
        prompt is refused too.)
        """
        return self.context * self.max_token_chars


def _state(request: HTTPRequest) -> ServerState:
    return cast(ServerState, request.app.state.llamalab)


def sse_event(payload: s.BaseModel | str | dict[str, Any]) -> bytes:
    """One server-sent event: ``data: <JSON>``, non-ASCII escaped (a lone surrogate in a
    token's text stays valid JSON and valid UTF-8)."""
    if isinstance(payload, s.BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n".encode()


def _request_id() -> str:
    return uuid.uuid4().hex[:16]


def _internal_error(exc: BaseException, where: str) -> str:
    """Log a bug with its traceback; return what the client may see (no exception text)."""
    rid = _request_id()
    log.error("internal error %s in %s", rid, where, exc_info=exc)
    return f"internal error (request id {rid})"


async def _wait_for_disconnect(request: HTTPRequest) -> None:
    # The body has been read, so the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _warn_unknown(body: s._Lenient, request: HTTPRequest) -> None:
    """Log one warning naming the body's unknown fields (accepted, as OpenAI's clients
    add fields often, but a misspelt one would otherwise vanish without a word)."""
    unknown = body.unknown_fields
    if unknown:
        # The names are the client's text: quoted (no line breaks reach the log), cut short.
        shown = ", ".join(ascii(name[:40]) for name in unknown[:MAX_UNKNOWN_SHOWN])
        more = (
            f" and {len(unknown) - MAX_UNKNOWN_SHOWN} more"
            if len(unknown) > MAX_UNKNOWN_SHOWN
            else ""
        )
        log.warning(
            "%s: the request has fields this server does not know, ignored: %s%s",
            request.url.path,
            shown,
            more,
        )


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_id and name not in state.adapters:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server runs {state.model_id!r}",
            code="model_not_found",
            param="model",
        )


def _check_prompt_chars(state: ServerState, chars: int, param: str) -> None:
    if chars > state.max_prompt_chars:
        raise APIError(
            400,
            f"the prompt has {chars} characters, more than a context of {state.context} tokens "
            f"can hold (each token stands for at most {state.max_token_chars} characters)",
            code="context_length_exceeded",
            param=param,
        )


async def _encode_text(state: ServerState, text: str) -> list[int]:
    """Tokenize a completion prompt, refusing one that cannot fit before doing the work."""
    _check_prompt_chars(state, len(text), "prompt")
    tokenizer = state.tokenizer

    def locked() -> list[int]:
        with state.encode_lock:
            return tokenizer.encode(text, special=True)

    try:
        return await asyncio.to_thread(locked)
    except LlamalabError as exc:
        raise APIError(400, str(exc), code="invalid_prompt", param="prompt") from exc


async def _encode_chat(state: ServerState, messages: list[dict[str, str]]) -> list[int]:
    """Render and tokenize a conversation, refusing one that cannot fit before tokenizing."""
    tokenizer = state.tokenizer

    def work() -> list[int]:
        # Rendering costs little next to tokenizing, so the text's length is checked on
        # the rendered template and only a conversation that may fit is tokenized.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        _check_prompt_chars(state, len(text), "messages")
        with state.encode_lock:
            return tokenizer.encode_chat(messages, add_generation_prompt=True)

    try:
        return await asyncio.to_thread(work)
    except LlamalabError as exc:
        raise APIError(400, str(exc), code="invalid_prompt", param="messages") from exc


async def _engine_requests(
    state: ServerState,
    body: s.CompletionRequest | s.ChatCompletionRequest,
    prompt_ids: list[int],
    default_max: int,
    logprobs: int | None,
) -> list[Request]:
    """The engine requests for ``body``: one per choice (``n``), checked as the engine would."""
    request = _engine_request(state, body, prompt_ids, default_max, logprobs)
    grammar = None
    param = body.constraint_field()
    try:
        grammar = body.constraint()
        if grammar is not None:
            # Compiling takes milliseconds, a hostile grammar minutes: it runs in the
            # compiler's own processes, bounded in time, and this coroutine only waits
            # (no thread that tokenizing needs is held meanwhile).
            future = state.scheduler.engine.grammars.submit(grammar)
            grammar = replace(grammar, compiled=await asyncio.wrap_future(future))
    except CompilerBusy as exc:
        raise unavailable(str(exc), "grammar_compiler_busy") from exc
    except LlamalabError as exc:
        raise APIError(400, f"{param}: {exc}", code="invalid_grammar", param=param) from exc
    seed = request.sampling.seed
    return [
        replace(
            request,
            grammar=grammar,
            adapter=state.adapters.get(body.model or "", 0),
            # Each choice draws its own tokens; with a seed, choice i uses seed + i, so
            # the whole answer is reproducible and its choices still differ.
            sampling=request.sampling
            if seed is None or i == 0
            else replace(request.sampling, seed=(seed + i) % SEED_LIMIT),
        )
        for i in range(body.n)
    ]


def _engine_request(
    state: ServerState,
    body: s.CompletionRequest | s.ChatCompletionRequest,
    prompt_ids: list[int],
    default_max: int,
    logprobs: int | None,
) -> Request:
    # Check here what the engine would refuse, so the client gets a clear 400 and not
    # a failure half-way through a stream.
    context = state.context
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
            f"the prompt has {len(prompt_ids)} tokens; this server's context holds {context} "
            "(prompt and reply together)",
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
    # The engine refuses these too, but only once the request reaches the batch; here the
    # client gets a 400 that names the field.
    vocab = state.tokenizer.vocab_size
    outside = next((i for i in body.logit_bias_ids if i >= vocab), None)
    if outside is not None:
        raise APIError(
            400,
            f"logit_bias: token id {outside} is outside the vocabulary of {vocab}",
            code="invalid_value",
            param="logit_bias",
        )
    try:
        sampling = body.sampling()
    except LlamalabError as exc:
        # SamplingParams names the field first ("top_p must be ..."); so does the 400.
        name = str(exc).split(" ", 1)[0]
        param = name if name in type(body).model_fields else None
        raise APIError(400, str(exc), code="invalid_value", param=param) from exc
    # The engine ends a reply that reaches the end of the context with "length".
    return Request(
        prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=body.stop or (),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        lookup=body.lookup_params(state.lookup),
    )


def _submit(state: ServerState, requests: list[Request]) -> list[Ticket]:
    """Queue a reply's requests, or refuse them with 503 while the server cannot take more."""
    scheduler = state.scheduler
    if state.draining:
        raise unavailable("the server is shutting down", "server_shutting_down")
    if scheduler.state() != "ok":
        raise unavailable("the server cannot generate right now", "server_unavailable")
    # Each choice waits for a row as a request of its own: all of them count.
    if scheduler.queued + len(requests) > state.limits.max_queue:
        raise unavailable(
            f"the server is busy: {scheduler.queued} requests are waiting; retry later",
            "server_busy",
        )
    return [scheduler.submit(request) for request in requests]


async def _events(tickets: list[Ticket]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Every choice's events as they come, each with its choice's index.

    Raises what a ticket raises (the engine refused a request, the server gave up).
    """
    if len(tickets) == 1:  # the usual case needs no merging
        async for event in tickets[0].events():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

    async def forward(index: int, ticket: Ticket) -> None:
        try:
            async for event in ticket.events():
                queue.put_nowait((index, event))
        except Exception as exc:  # noqa: BLE001  (re-raised by the reader below)
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(forward(i, t)) for i, t in enumerate(tickets)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _finished(state: ServerState, reply: Reply, ending: str) -> None:
    """Log one line for a generation that ended, and count it in the metrics.

    ``ending`` says how it ended when the engine gave no finish reason ("error",
    "cancelled"); a finish reason from the engine ("stop", "length") wins.
    """
    now = time.monotonic()
    first = reply.transcripts[0]
    finishes = [t.finish_reason for t in reply.transcripts]
    finish = finishes[0] if all(f not in (None, "error") for f in finishes) else None
    ttfts = [t.time_to_first_token for t in reply.transcripts]
    ttft = min((t for t in ttfts if t is not None), default=None)
    speeds = [t.tokens_per_second(now) for t in reply.transcripts]
    speed = sum(v for v in speeds if v is not None) if any(v is not None for v in speeds) else None
    usage = reply.usage()
    log.info(
        "request %s %s prompt_tokens=%d completion_tokens=%d ttft_ms=%s tokens_per_s=%s finish=%s",
        reply.id,
        reply.endpoint,
        usage.prompt_tokens,
        usage.completion_tokens,
        "-" if ttft is None else f"{ttft * 1000:.1f}",
        "-" if speed is None else f"{speed:.1f}",
        finish or ending,
    )
    metrics = state.metrics
    metrics.prompt_tokens.inc(usage.prompt_tokens)
    metrics.completion_tokens.inc(usage.completion_tokens)
    if ttft is not None:
        metrics.ttft.observe(ttft)
    metrics.duration.observe(now - first.started)


def _error_event(message: str, type_: str, code: str | None = None) -> bytes:
    return sse_event(s.error_body(message, type_, code))


async def _stream(
    state: ServerState, tickets: list[Ticket], reply: Reply, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events; Starlette cancels this generator when the client disconnects.

    Whatever happens, a stream that was not cancelled ends with a ``finish_reason`` chunk
    per choice or an error event, then ``[DONE]``.
    """
    ending = "cancelled"  # unless the loop below gets further
    try:
        for chunk in reply.opening():
            yield sse_event(chunk)
        failed = False
        async for index, event in _events(tickets):
            if event.finish_reason == "error":
                message = event.error or "the request failed"
                ending = "error"
                yield _error_event(message, "server_error", "generation_failed")
                failed = True
                break
            delta, released = reply.transcripts[index].add(event)
            if delta or released or event.finish_reason:
                for chunk in reply.chunks(index, delta, released, event.finish_reason):
                    yield sse_event(chunk)
        if include_usage and not failed:
            yield sse_event(reply.usage_chunk())
    except LlamalabError as exc:  # the engine refused the request
        ending = "error"
        yield _error_event(str(exc), "invalid_request_error", "invalid_request")
    except Unavailable as exc:
        ending = "error"
        yield _error_event(str(exc), "server_error", "server_unavailable")
    except Exception as exc:  # noqa: BLE001  (a bug: log it, end the stream properly)
        ending = "error"
        yield _error_event(_internal_error(exc, "a stream"), "server_error")
    finally:
        for ticket in tickets:  # no-op when finished; frees the rows when the client left
            state.scheduler.cancel(ticket)
        _finished(state, reply, ending)
    yield sse_event("[DONE]")


async def _run_to_end(
    state: ServerState, tickets: list[Ticket], request: HTTPRequest, reply: Reply
) -> list[tuple[str, list[LogprobEntry]]]:
    """Collect every choice whole; a client that leaves meanwhile frees the rows at once."""
    ending = "error"  # unless the reply is collected whole, or the client leaves
    texts: list[list[str]] = [[] for _ in tickets]
    entries: list[list[LogprobEntry]] = [[] for _ in tickets]
    failure: list[str] = []

    async def collect() -> None:
        async for index, event in _events(tickets):
            if event.finish_reason == "error":
                failure.append(event.error or "the request failed")
                return
            delta, released = reply.transcripts[index].add(event)
            texts[index].append(delta)
            entries[index].extend(released)

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():  # the client is gone: nobody will read this answer
            ending = "cancelled"
            raise APIError(499, "the client closed the connection", code="client_closed_request")
        try:
            collector.result()
        except LlamalabError as exc:
            raise APIError(400, str(exc)) from exc
        except Unavailable as exc:
            raise unavailable(str(exc), "server_unavailable") from exc
        if failure:
            raise APIError(500, failure[0], type_="server_error", code="generation_failed")
        return [("".join(t), e) for t, e in zip(texts, entries, strict=True)]
    finally:
        watcher.cancel()
        collector.cancel()
        for ticket in tickets:
            state.scheduler.cancel(ticket)
        # Before the answer is sent, so a client that reads /metrics next sees this request.
        _finished(state, reply, ending)


async def _respond(
    state: ServerState,
    request: HTTPRequest,
    body: s.CompletionRequest | s.ChatCompletionRequest,
    tickets: list[Ticket],
    reply: Reply,
) -> Any:
    """The one way both endpoints answer: server-sent events, or the whole object."""
    if body.stream:
        return StreamingResponse(
            _stream(state, tickets, reply, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return reply.whole(await _run_to_end(state, tickets, request, reply))


# ---------------------------------------------------------------------------- routes
router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": s.ErrorResponse, "description": "invalid request"},
    401: {"model": s.ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": s.ErrorResponse, "description": "unknown model"},
    413: {"model": s.ErrorResponse, "description": "request body too large"},
    503: {"model": s.ErrorResponse, "description": "busy or shutting down: retry later"},
}
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or server-sent events with stream: true",
    }
}


# The page runs only the scripts this server sends and talks only to this server, so a
# model's reply that slipped past the sanitizer still could not run script or load an
# image from elsewhere.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
ASSET_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page(request: HTTPRequest) -> HTMLResponse:
    """The chat page."""
    return HTMLResponse(
        _state(request).page,
        headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/static/{name}", include_in_schema=False)
async def page_asset(request: HTTPRequest, name: str) -> Response:
    """A script, style sheet or licence the chat page uses (a fixed set, read at start)."""
    asset = _state(request).assets.get(name)
    if asset is None:
        raise APIError(404, f"no such file: {name!r}", type_="not_found_error")
    body, media_type = asset
    return Response(
        body,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )


def _read_assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("llamalab.serve").joinpath("static")
    assets = {}
    for entry in folder.iterdir():
        media_type = ASSET_TYPES.get("." + entry.name.rpartition(".")[2])
        if media_type and entry.is_file():
            assets[entry.name] = (entry.read_bytes(), media_type)
    return assets


@router.get(
    "/health",
    response_model=s.Health,
    responses={503: {"model": s.Health, "description": "not serving"}},
    summary="Liveness and batch occupancy",
)
async def health(request: HTTPRequest) -> JSONResponse:
    """200 while the scheduler thread runs; 503 when it died or hangs, or while draining."""
    state = _state(request)
    scheduler = state.scheduler
    status = "draining" if state.draining else scheduler.state()
    grammars = getattr(scheduler.engine, "grammars", None)
    compiling = 0
    if grammars is not None:
        compiling = grammars.pending
        if status == "ok" and grammars.stuck_for() > grammars.timeout + COMPILE_STALL_GRACE_S:
            status = "stalled"  # the pool should have stopped that compile long ago
    report = s.Health(
        status=status,
        model=state.model_id,
        active_slots=scheduler.active_slots,
        queued=scheduler.queued,
        max_batch=scheduler.max_batch,
        compiling=compiling,
        llamalab=state.identity or None,
    )
    return JSONResponse(report.model_dump(), status_code=200 if status == "ok" else 503)


def _card(state: ServerState) -> s.ModelCard:
    return s.ModelCard(id=state.model_id, created=state.created, context_length=state.context)


@router.get(
    "/v1/models",
    response_model=s.ModelList,
    responses=_ERRORS,
    summary="The model this server runs",
)
async def list_models(request: HTTPRequest) -> s.ModelList:
    """The model, and each LoRA adapter served beside it (`MODEL:NAME`)."""
    state = _state(request)
    cards = [_card(state), *(_card(state).model_copy(update={"id": n}) for n in state.adapters)]
    return s.ModelList(data=cards)


@router.get("/v1/models/{name}", response_model=s.ModelCard, responses=_ERRORS, summary="One model")
async def get_model(name: str, request: HTTPRequest) -> s.ModelCard:
    """The model, if ``name`` is its name."""
    state = _state(request)
    _check_model(state, name)
    return _card(state).model_copy(update={"id": name})


@router.post(
    "/v1/completions",
    response_model=s.Completion,
    responses={**_ERRORS, **_STREAMED},
    summary="Continue a prompt",
)
async def completions(body: s.CompletionRequest, request: HTTPRequest) -> Any:
    """Continue a prompt given as text or as token ids."""
    state = _state(request)
    _warn_unknown(body, request)
    _check_model(state, body.model)
    tokenizer = state.tokenizer
    if isinstance(body.prompt, str):
        prompt_ids = await _encode_text(state, body.prompt)
    else:
        prompt_ids = list(body.prompt)
        # Length first: it is cheap, and the vocabulary scan below is then bounded.
        if len(prompt_ids) < state.context:
            bad = next((i for i in prompt_ids if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise APIError(
                    400,
                    f"token id {bad} is outside the vocabulary of {tokenizer.vocab_size}",
                    code="invalid_value",
                    param="prompt",
                )
    reqs = await _engine_requests(
        state, body, prompt_ids, DEFAULT_COMPLETION_MAX_TOKENS, body.logprobs
    )
    logprobs = body.logprobs is not None
    transcripts = [Transcript(tokenizer, len(prompt_ids), logprobs=logprobs) for _ in reqs]
    model = body.model if body.model in state.adapters else state.model_id
    reply = CompletionReply(model, transcripts, logprobs=logprobs)
    return await _respond(state, request, body, _submit(state, reqs), reply)


@router.post(
    "/v1/chat/completions",
    response_model=s.ChatCompletion,
    responses={**_ERRORS, **_STREAMED},
    summary="Reply to a conversation",
)
async def chat_completions(body: s.ChatCompletionRequest, request: HTTPRequest) -> Any:
    """The next assistant turn of a conversation."""
    state = _state(request)
    _warn_unknown(body, request)
    _check_model(state, body.model)
    if state.tokenizer.chat_template is None:
        raise APIError(
            400, "this model has no chat template; use /v1/completions", code="no_chat_template"
        )
    messages = [m.as_template_message() for m in body.messages]
    prompt_ids = await _encode_chat(state, messages)
    # Without a limit a reply may fill the rest of the context (the engine stops there).
    default_max = max(1, state.context - len(prompt_ids))
    reqs = await _engine_requests(state, body, prompt_ids, default_max, body.logprobs_k)
    transcripts = [
        Transcript(state.tokenizer, len(prompt_ids), logprobs=body.logprobs) for _ in reqs
    ]
    model = body.model if body.model in state.adapters else state.model_id
    reply = ChatReply(model, transcripts, logprobs=body.logprobs)
    return await _respond(state, request, body, _submit(state, reqs), reply)


@router.post(
    "/tokenize",
    response_model=s.Tokenized,
    responses=_ERRORS,
    summary="Text to token ids (llama.cpp's shape)",
)
async def tokenize(body: s.TokenizeRequest, request: HTTPRequest) -> s.Tokenized:
    """The ids of ``content``, special-token text parsed as a prompt's is.

    ``add_special`` adds what the model adds to a prompt (BOS, for models that use one);
    ``with_pieces`` pairs each id with its text.
    """
    state = _state(request)
    _warn_unknown(body, request)
    # The same bound as a prompt's: no text costs more tokenizer work than one that fits.
    _check_prompt_chars(state, len(body.content), "content")
    tokenizer = state.tokenizer
    add_special = body.add_special

    def locked() -> list[int]:
        with state.encode_lock:
            return tokenizer.encode(
                body.content,
                add_bos=add_special and tokenizer.add_bos_default,
                add_eos=add_special and tokenizer.add_eos_default,
                special=True,
            )

    try:
        ids = await asyncio.to_thread(locked)
    except LlamalabError as exc:
        raise APIError(400, str(exc), code="invalid_value", param="content") from exc
    if not body.with_pieces:
        return s.Tokenized(tokens=ids)
    # A piece may be part of a UTF-8 character; its bytes then read as U+FFFD.
    pieces = [s.TokenPiece(id=i, piece=tokenizer.token_text(i)) for i in ids]
    return s.Tokenized(tokens=pieces)


@router.post(
    "/detokenize",
    response_model=s.Detokenized,
    responses=_ERRORS,
    summary="Token ids to text (llama.cpp's shape)",
)
async def detokenize(body: s.DetokenizeRequest, request: HTTPRequest) -> s.Detokenized:
    """The text of ``tokens``, control tokens written out (as a completion's ids are)."""
    state = _state(request)
    _warn_unknown(body, request)
    tokenizer = state.tokenizer
    # The body limit bounds how many ids there are; each must name a vocabulary entry.
    bad = next((i for i in body.tokens if not 0 <= i < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"token id {bad} is outside the vocabulary of {tokenizer.vocab_size}",
            code="invalid_value",
            param="tokens",
        )
    try:
        content = await asyncio.to_thread(tokenizer.decode, body.tokens)
    except LlamalabError as exc:
        raise APIError(400, str(exc), code="invalid_value", param="tokens") from exc
    return s.Detokenized(content=content)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: HTTPRequest) -> Response:
    """Prometheus' text format: requests, tokens, queue, latencies."""
    registry = _state(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------- error handlers
async def _api_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
    return cast(APIError, exc).response()


def _clean_loc(loc: Sequence[Any]) -> str:
    # Drop "body" and pydantic's names for union members ("function-after[...]", "str"),
    # which are types, not fields the client wrote.
    parts = [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))
    ]
    return ".".join(parts)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


async def _invalid(_: HTTPRequest, exc: Exception) -> JSONResponse:
    errors = cast(RequestValidationError, exc).errors()
    # Prefer our own explanations (value errors) over "input should be a valid string" for
    # each member of a union.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return APIError(
            400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json"
        ).response()
    where = _clean_loc(first.get("loc", ()))
    # pydantic prefixes the message of a ValueError raised in a validator; ours read better bare.
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{where or 'body'}: {detail}"
    return APIError(400, message, code="invalid_value", param=where or None).response()


async def _http_error(_: HTTPRequest, exc: Exception) -> JSONResponse:
    http = cast(StarletteHTTPException, exc)
    code = "not_found" if http.status_code == 404 else None
    return APIError(http.status_code, str(http.detail), code=code).response()


async def _bug(request: HTTPRequest, exc: Exception) -> JSONResponse:
    message = _internal_error(exc, f"{request.method} {request.url.path}")
    return APIError(500, message, type_="server_error", code="internal_error").response()


# ---------------------------------------------------------------------------- the app
def create_app(
    scheduler: Scheduler,
    *,
    model_id: str,
    api_key: str | None = None,
    limits: Limits | None = None,
    allowed_hosts: Collection[str] | None = None,
    identity: dict[str, Any] | None = None,
    lookup: LookupParams | None = DEFAULT_LOOKUP,
    adapters: Sequence[str] = (),
) -> FastAPI:
    """The app for one model. The scheduler is started and stopped with the app.

    Args:
        scheduler: owns the engine (not started yet).
        model_id: the name clients use for the model.
        api_key: if set, ``/v1/*``, ``/tokenize`` and ``/detokenize`` need
            ``Authorization: Bearer KEY``.
        limits: body size and queue length (defaults: `Limits()`).
        allowed_hosts: if set, a request whose Host header names none of these (or a
            loopback name) gets 403; ``None`` turns the check off.
        identity: the model file's identity and the reply-shaping settings, reported
            in ``/health`` so that ``llamalab generate`` can use this server for the
            same model (see ``llamalab.client``); None leaves the report out.
        lookup: prompt lookup for requests that do not ask for their own (the request
            fields ``lookup``, ``lookup_ngram`` and ``draft_max``); None turns it off.
        adapters: the names of the LoRA adapters the engine's model serves, in the order
            of their ``Request.adapter`` (1, 2, ...); a request picks one as ``MODEL:NAME``.
    """
    tokenizer = scheduler.engine.tokenizer
    state = ServerState(
        scheduler=scheduler,
        model_id=model_id,
        limits=limits or Limits(),
        metrics=Metrics(scheduler),
        lookup=lookup,
        adapters={f"{model_id}:{n}": i + 1 for i, n in enumerate(adapters)},
        # The longest vocabulary entry bounds the characters one token stands for.
        max_token_chars=max(
            1, max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
        ),
        page=resources.files("llamalab.serve")
        .joinpath("static/index.html")
        .read_text(encoding="utf-8"),
        assets=_read_assets(),
    )
    if identity is not None:
        from llamalab.kernels import isa_in_use

        state.identity = {
            **identity,
            # The kernels' instruction set, which `generate --json` names in its timing.
            "isa": isa_in_use(scheduler.engine.model),
            "context": state.context,
            "model_context": scheduler.engine.model.config.context_length,
            "chat_template": tokenizer.chat_template is not None,
            "api_key": bool(api_key),
        }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        grammars = getattr(scheduler.engine, "grammars", None)
        if grammars is not None:
            grammars.start()  # the compiler's processes, before the first request needs one
        try:
            yield
        finally:
            scheduler.close()
            if grammars is not None:
                grammars.close()

    app = FastAPI(
        title="llamalab",
        summary="An OpenAI-compatible API for a LLaMA-family model",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.llamalab = state
    app.include_router(router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
    # The last one added runs first: Host check, then the key, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=[*LOOPBACK_HOSTS, *allowed_hosts])
    # Outermost, so that whatever the others refuse is counted too.
    app.add_middleware(RequestCounter, metrics=state.metrics)
    return app


async def drain(app: FastAPI, grace: float) -> None:
    """Get ready to exit: new generation requests get 503, running ones get ``grace``
    seconds to finish, and whatever is left then ends with an error event (streams) or a
    503 (whole answers), so that every client gets a proper ending."""
    state: ServerState = app.state.llamalab
    state.draining = True
    scheduler = state.scheduler
    deadline = time.monotonic() + grace
    while scheduler.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if scheduler.in_flight:
        log.warning("ending %d unfinished request(s) to shut down", scheduler.in_flight)
        scheduler.abort("the server is shutting down")
        # Let the responses take their last events before the server stops.
        deadline = time.monotonic() + 2.0
        while scheduler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
