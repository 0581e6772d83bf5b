"""The request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests accept what OpenAI's clients send: unknown fields are ignored (clients add new
ones often; the server logs a warning that names them, as vLLM does, so a misspelt
field is not silently lost), but every field we read is typed and range-checked, so a wrong type or an
impossible value becomes a 400 that names the field before anything reaches the engine.
Types are strict, as OpenAI's are: ``"0.5"`` is not a temperature, ``[true, false]`` is
not a prompt and ``"yes"`` is not a boolean. Numbers must be finite, and text must be
encodable as UTF-8 (JSON can spell a lone surrogate, ``"\\ud800"``, which no tokenizer can
take). OpenAI fields whose meaning this server does not implement (``tools``,
``echo``, ...) are refused with a 400 that names them when they ask for
anything but their default: a client that asks for a JSON reply or a tool call must not get
free text back as if it had been honoured. A few llama.cpp-style extensions (``top_k``,
``min_p``, ``repeat_penalty``, ``ignore_eos``) let a client ask for the same sampling as
``llamalab generate``.

Responses mirror OpenAI's objects field for field, so the official client parses them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from llamalab.generation.grammar import Grammar
from llamalab.generation.params import (
    DEFAULT_LOOKUP,
    LOGIT_BIAS_RANGE,
    MAX_DRAFT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOOKUP_NGRAM,
    MIN_TOP_P,
    PRESENCE_FREQUENCY_RANGE,
    REPEAT_PENALTY_RANGE,
    SEED_LIMIT,
    LookupParams,
    SamplingParams,
)

_ENGINE_DEFAULTS = SamplingParams()
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16  # n: each choice takes a batch row, as a request of its own would


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
Penalty = Annotated[
    FiniteFloat, Field(ge=PRESENCE_FREQUENCY_RANGE[0], le=PRESENCE_FREQUENCY_RANGE[1])
]
Bias = Annotated[FiniteFloat, Field(ge=LOGIT_BIAS_RANGE[0], le=LOGIT_BIAS_RANGE[1])]
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")

# OpenAI's request fields that this server does not implement, each with the values that
# ask for nothing (the field's default, or an empty list): those are accepted, since
# clients often send them; anything else is refused with a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple[object, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


# ---------------------------------------------------------------------------- requests
class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: a named schema."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: Annotated[Text, Field(max_length=64)] = "response"
    description: Text | None = None
    # OpenAI's JSON Schema dialect; llguidance implements the parts it names.
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON for a schema.

    llama.cpp's server spelling, ``{"type": "json_object", "schema": {...}}``, is accepted
    too.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with a schema')
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "json_schema":
            return Grammar.json_schema(self.json_schema.schema_)  # type: ignore[union-attr]
        if self.type == "json_object":
            if self.schema_ is not None:
                return Grammar.json_schema(self.schema_)
            return Grammar.any_json_object()
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Lenient(BaseModel):
    """A request body: unknown top-level fields are kept aside, to be named in the log."""

    # strict: no coercion from strings or booleans (JSON integers still count as floats).
    # extra="allow" only so that the unknown names can be reported; nothing reads them.
    model_config = ConfigDict(extra="allow", strict=True)

    @property
    def unknown_fields(self) -> list[str]:
        """The body's top-level fields that this server does not know, sorted."""
        return sorted(self.model_extra or {})


class _Request(_Lenient):
    """Fields that completions and chat completions share."""

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
    # OpenAI's penalties on tokens already generated, and biases by token id; the engine
    # applies them (see SamplingParams). logit_bias keys are token ids spelled as strings,
    # since JSON object keys are strings; `logit_bias_ids` reads them.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[Text, Bias] | None = None
    ignore_eos: bool = False
    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] | None = None  # torch takes 64 bits
    stop: Text | list[Text] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices, each sampled on its own
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # Declared only to be refused (see UNSUPPORTED_FIELDS); any JSON value is taken here
    # so that the 400 says "not supported" rather than "wrong type".
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    # llama.cpp's extension: a GBNF (or Lark) grammar the reply must match.
    grammar: Text | None = None
    # llamalab's speculation (prompt lookup; the reply is the same either way): None takes
    # the server's --lookup/--no-lookup; either size given turns it on (see lookup_params).
    lookup: bool | None = None
    lookup_ngram: Annotated[int, Field(ge=1, le=MAX_LOOKUP_NGRAM)] | None = None
    draft_max: Annotated[int, Field(ge=1, le=MAX_DRAFT)] | None = None
    best_of: Any = None
    suffix: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _few_biases(cls, value: object) -> object:
        # Counted before pydantic checks each entry, so the limit also bounds that work.
        if isinstance(value, dict) and len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # Ten digits cover any vocabulary; a longer key is a mistake, not a token.
        bad = next((k for k in value or {} if not _TOKEN_ID_KEY.fullmatch(k)), None)
        if bad is not None:
            raise ValueError(f"keys must be token ids (decimal integers), got {bad[:20]!r}")
        # "7" and "007" name one token; which bias was meant cannot be told.
        if value is not None and len({int(k) for k in value}) != len(value):
            raise ValueError("a token id is given more than once")
        return value

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @model_validator(mode="after")
    def _one_constraint(self) -> _Request:
        if (
            self.grammar is not None
            and self.response_format
            and self.response_format.type != "text"
        ):
            raise ValueError("give either grammar or response_format, not both")
        return self

    @model_validator(mode="after")
    def _lookup_sizes_need_lookup(self) -> _Request:
        if self.lookup is False and (self.lookup_ngram is not None or self.draft_max is not None):
            raise ValueError("lookup_ngram and draft_max need lookup: leave out lookup: false")
        return self

    def lookup_params(self, default: LookupParams | None) -> LookupParams | None:
        """The request's prompt lookup: ``default`` (the server's; None: off) unless the
        request says otherwise with ``lookup``, ``lookup_ngram`` or ``draft_max``."""
        if self.lookup is False:
            return None
        sizes = {
            name: value
            for name, value in (("ngram", self.lookup_ngram), ("draft_max", self.draft_max))
            if value is not None
        }
        if default is None and not self.lookup and not sizes:
            return None
        return replace(default or DEFAULT_LOOKUP, **sizes)

    def constraint_field(self) -> str:
        """The request field the constraint comes from, as an error's ``param`` names it."""
        fmt = self.response_format
        if self.grammar is not None or fmt is None:
            return "grammar"
        if fmt.type == "json_schema":
            return "response_format.json_schema.schema"
        return "response_format.schema" if fmt.schema_ is not None else "response_format"

    def constraint(self) -> Grammar | None:
        """The grammar the reply must match (``response_format`` or ``grammar``), or None.

        Raises :class:`LlamalabError` for a schema or grammar that cannot be one.
        """
        if self.grammar is not None:
            return Grammar("grammar", self.grammar)
        return self.response_format.grammar() if self.response_format else None

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _not_implemented(cls, value: object, info: ValidationInfo) -> object:
        # The error handler puts the field's name in front of the message.
        accepted = UNSUPPORTED_FIELDS[info.field_name or ""]
        # `type(v) is type(value)` keeps `true` from passing as 1 and `false` as 0.
        if not any(type(v) is type(value) and v == value for v in accepted):
            shown = " or ".join(json.dumps(v) for v in accepted if v is not None)
            raise ValueError(
                "not supported by this server; leave it out"
                + (f" or send {shown}" if shown else "")
            )
        return value

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
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias_ids,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``: continue a prompt (text, or token ids)."""

    prompt: Text | list[int] | list[Text]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported by this server; leave it out or send false")
        return value

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


class TokenizeRequest(_Lenient):
    """``POST /tokenize``, in llama.cpp's server shape."""

    content: Text
    add_special: bool = False  # the model's own BOS/EOS, as a prompt would get them
    with_pieces: bool = False  # each id with the text it stands for


class DetokenizeRequest(_Lenient):
    """``POST /detokenize``, in llama.cpp's server shape."""

    tokens: list[int]


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
    stopped making progress, a grammar compile ran far past its deadline, or the server
    is draining before it exits)."""

    status: Literal["ok", "stalled", "dead", "draining"] = "ok"
    model: str
    active_slots: int  # batch rows generating right now
    queued: int  # requests waiting for a free row
    max_batch: int
    compiling: int = 0  # grammars being compiled or waiting for the compiler
    # What `llamalab generate` needs to tell whether this server holds its model: the
    # model file's identity (path, size, mtime, content fingerprint) and the settings
    # that shape replies (dtype, device, context). None for an app built without them.
    llamalab: dict[str, Any] | None = None


class TokenPiece(BaseModel):
    id: int
    piece: str


class Tokenized(BaseModel):
    """``/tokenize``'s answer: ids, or ids with their pieces (``with_pieces``)."""

    tokens: list[int] | list[TokenPiece]


class Detokenized(BaseModel):
    content: str


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
