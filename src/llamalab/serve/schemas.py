"""The request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests accept what OpenAI's clients send: unknown fields are ignored (clients add new
ones often), but every field we read is typed and range-checked, so a wrong type or an
impossible value becomes a 400 that names the field before anything reaches the engine.
Types are strict, as OpenAI's are: ``"0.5"`` is not a temperature, ``[true, false]`` is
not a prompt and ``"yes"`` is not a boolean. Numbers must be finite, and text must be
encodable as UTF-8 (JSON can spell a lone surrogate, ``"\\ud800"``, which no tokenizer can
take). A few llama.cpp-style
extensions (``top_k``, ``min_p``, ``repeat_penalty``, ``ignore_eos``) let a client ask
for the same sampling as ``llamalab generate``.

Responses mirror OpenAI's objects field for field, so the official client parses them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from llamalab.generation.sampling import (
    MIN_TOP_P,
    REPEAT_PENALTY_RANGE,
    SEED_LIMIT,
    SamplingParams,
)

_ENGINE_DEFAULTS = SamplingParams()
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def _utf8(text: str) -> str:
    # A lone surrogate survives JSON parsing but not encoding; say so here, as a 400 naming
    # the field, instead of failing in the tokenizer. The message never repeats the text.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} "
            f"at position {exc.start}"
        ) from None
    return text


def _top_p_floor(value: float) -> float:
    if value < MIN_TOP_P:
        raise ValueError(
            f"must be at least {MIN_TOP_P:g} (smaller values underflow), got {value:g}"
        )
    return value


Text = Annotated[str, AfterValidator(_utf8)]
"""A string that can be encoded as UTF-8."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


# ---------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    """Fields that completions and chat completions share."""

    # strict: no coercion from strings or booleans (JSON integers still count as floats).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Text | None = None  # None: the one model this server runs
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[FiniteFloat, Field(gt=0.0, le=1.0), AfterValidator(_top_p_floor)] | None = None
    # llama.cpp's sampling extensions; their defaults are the engine's (as in `llamalab generate`).
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    # Outside this range a penalty overflows the logits (1e-40 turns them into inf).
    repeat_penalty: (
        Annotated[FiniteFloat, Field(ge=REPEAT_PENALTY_RANGE[0], le=REPEAT_PENALTY_RANGE[1])] | None
    ) = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None  # torch takes 64 bits
    stop: Text | list[Text] | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request (ask several times for more)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return [s for s in stops if s]

    def sampling(self) -> SamplingParams:
        """The engine's sampling settings: given fields, the engine's defaults for the rest."""
        d = _ENGINE_DEFAULTS
        return SamplingParams(
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_k=d.top_k if self.top_k is None else self.top_k,
            top_p=d.top_p if self.top_p is None else self.top_p,
            min_p=d.min_p if self.min_p is None else self.min_p,
            repeat_penalty=d.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``: continue a prompt (text, or token ids)."""

    prompt: Text | list[int] | list[Text]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: Literal[False] = False  # echoing the prompt back is not supported

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if isinstance(value, str):
            return value
        if isinstance(value, list) and (
            all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(isinstance(v, str) for v in value)
        ):
            return value
        raise ValueError("must be a string, a list of token ids (integers) or a list of one string")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError(
                    "one prompt per request (send several requests for several prompts)"
                )
            return value[0]
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One turn of a conversation; ``content`` may be a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: the next assistant turn of a conversation."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _newer_name_wins(self) -> ChatCompletionRequest:
        # OpenAI renamed max_tokens to max_completion_tokens; accept both, the new one first.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------------------- responses
FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_is_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: the role once, then content pieces.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamalab"
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """``/health``: "ok" with 200; otherwise 503 and why (the scheduler thread died or
    stopped making progress, or the server is draining before it exits)."""

    status: Literal["ok", "stalled", "dead", "draining"] = "ok"
    model: str
    active_slots: int  # batch rows generating right now
    queued: int  # requests waiting for a free row
    max_batch: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return ErrorResponse(
        error=ErrorDetail(message=message, type=type_, code=code, param=param)
    ).model_dump()
