"""Constrained decoding: a grammar or JSON Schema that every generated token must fit.

The grammar work is llguidance's (the Rust library behind llama.cpp's and vLLM's
structured output). Before each draw it gives the set of tokens that keep the text a
prefix of something the grammar accepts; every other token's score becomes -inf, and the
drawn token advances its parser. So the reply is valid by construction, whatever the
temperature, and the cost is one mask per token (tens of microseconds for a JSON Schema
on a 49k vocabulary, measured in ``bench/bench_grammar.py``).

Three kinds of constraint are accepted, each spelled as its users spell it:

* a JSON Schema (OpenAI's ``response_format: {"type": "json_schema", ...}``, the CLI's
  ``--json-schema FILE``); ``Grammar.any_json_object()`` is OpenAI's JSON mode;
* a context-free grammar in llama.cpp's GBNF or in Lark syntax (``--grammar FILE``;
  llguidance tells the two apart by their text);
* a regular expression.

Everything here is hostile input: a grammar or schema is bounded in size before it is
read, its compilation and each mask are bounded by llguidance's parser limits, and every
failure is one :class:`LlamalabError` that says what is wrong with the grammar.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError
from llamalab.files import read_file_bounded

if TYPE_CHECKING:
    import torch

    from llamalab.tokenizer.base import Tokenizer

GRAMMAR_KINDS = ("json_schema", "grammar", "regex")
MAX_GRAMMAR_BYTES = 1 << 20  # a grammar or schema longer than 1 MiB is refused unread
MAX_SCHEMA_DEPTH = 64  # nesting of a JSON Schema's objects and arrays
COMPILED_CACHE_SIZE = 32  # compiled grammars kept per tokenizer (a server sees repeats)
ERROR_CHARS = 300
JSON_LAYOUT = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}  # llguidance's messages can quote a whole grammar: keep the start


@dataclass(frozen=True)
class Grammar:
    """What a request's text must match: ``kind`` is one of ``GRAMMAR_KINDS``.

    ``text`` is the JSON Schema as JSON text, the GBNF or Lark grammar, or the regular
    expression. Make one with the class methods; they check the size and the JSON.
    """

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise LlamalabError(
                f"unknown grammar kind {self.kind!r}: use one of {', '.join(GRAMMAR_KINDS)}"
            )
        if not isinstance(self.text, str):
            raise LlamalabError(f"a {self.kind} must be text, got {type(self.text).__name__}")
        if len(self.text) > MAX_GRAMMAR_BYTES:
            raise LlamalabError(
                f"the {_noun(self.kind)} is {len(self.text):,} characters long; "
                f"the limit is {MAX_GRAMMAR_BYTES:,}"
            )
        if not self.text.strip():
            raise LlamalabError(f"the {_noun(self.kind)} is empty")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> Grammar:
        """A JSON Schema, given as a parsed object or as JSON text."""
        if isinstance(schema, str):
            if len(schema) > MAX_GRAMMAR_BYTES:
                raise LlamalabError(
                    f"the JSON schema is {len(schema):,} characters long; "
                    f"the limit is {MAX_GRAMMAR_BYTES:,}"
                )
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise LlamalabError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise LlamalabError(
                f"a JSON schema must be an object (or true/false), got {type(schema).__name__}"
            )
        _check_depth(schema)
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))

    @classmethod
    def any_json_object(cls) -> Grammar:
        """Any JSON object: OpenAI's ``response_format: {"type": "json_object"}``."""
        return cls("json_schema", '{"type": "object"}')

    @classmethod
    def from_file(cls, path: str | Path, kind: str) -> Grammar:
        """Read a grammar (``kind="grammar"``) or a JSON Schema (``"json_schema"``) file."""
        path = Path(path)
        data = read_file_bounded(path, MAX_GRAMMAR_BYTES)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise LlamalabError(f"{path} is not UTF-8 text") from None
        try:
            return cls.json_schema(text) if kind == "json_schema" else cls(kind, text)
        except LlamalabError as exc:
            raise LlamalabError(f"{path}: {exc}") from None


def _noun(kind: str) -> str:
    return {"json_schema": "JSON schema", "regex": "regular expression"}.get(kind, "grammar")


def _check_depth(value: object) -> None:
    """Refuse a schema nested deeper than MAX_SCHEMA_DEPTH (walked without recursion)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise LlamalabError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


class GrammarCompiler:
    """Compiles grammars for one tokenizer and hands out a fresh :class:`Constraint` each.

    llguidance's view of the vocabulary (every token's bytes) is built on first use,
    about 0.1 s for a 49k vocabulary, and compiled grammars are kept in a small cache,
    so a server that sees the same schema again does not compile it again.

    Args:
        tokenizer: the model's tokenizer.
        stop_ids: the tokens that end a reply; the grammar allows them once its text is
            complete.
        vocab_size: the ids that sampling sees (the engine's ``vocab_size``).
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self._compiled: OrderedDict[Grammar, str] = OrderedDict()

    def _llg_tokenizer(self) -> Any:
        llg = _llguidance()
        if self._lltokenizer is None:
            tok = self.tokenizer
            # A special token's text is not text the model writes: llguidance's convention
            # marks such tokens with a leading 0xFF byte, which no UTF-8 text holds.
            tokens = [
                b"\xff" + tok.token_bytes(i) if tok.is_special(i) else tok.token_bytes(i)
                for i in range(tok.vocab_size)
            ]
            wrapper = _Vocabulary(tok, tokens, self.stop_ids)
            self._lltokenizer = llg.LLTokenizer(
                wrapper, n_vocab=tok.vocab_size, eos_token=self.stop_ids or None
            )
        return self._lltokenizer

    def compile(self, grammar: Grammar) -> str:
        """llguidance's form of ``grammar``, checked; :class:`LlamalabError` if it is invalid.

        Thread-safe: the server compiles off its event loop.
        """
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
            compiled = _compile(grammar, self._llg_tokenizer())
            self._compiled[grammar] = compiled
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
            return compiled

    def constraint(self, grammar: Grammar) -> Constraint:
        """A new parser for ``grammar`` at the start of a reply."""
        compiled = self.compile(grammar)
        llg = _llguidance()
        matcher = llg.LLMatcher(self._llg_tokenizer(), compiled, log_level=0, limits=_limits())
        if matcher.is_error():
            raise LlamalabError(f"invalid {_noun(grammar.kind)}: {_short(matcher.get_error())}")
        return Constraint(matcher, self.vocab_size)


def check_grammar(grammar: Grammar) -> None:
    """Raise :class:`LlamalabError` if ``grammar`` is invalid whatever the vocabulary.

    Cheap, and needs no model: the command line checks a grammar file before it loads one.
    """
    _compile(grammar, None)


def _compile(grammar: Grammar, lltokenizer: Any) -> str:
    """llguidance's form of ``grammar``, validated against ``lltokenizer`` (or none)."""
    llg = _llguidance()
    try:
        if grammar.kind == "json_schema":
            # Fixed separators, as json.dumps writes them: a small model left free to
            # choose whitespace can loop on newlines until max_tokens.
            compiled = llg.LLMatcher.grammar_from_json_schema(grammar.text, defaults=JSON_LAYOUT)
        elif grammar.kind == "regex":
            compiled = llg.LLMatcher.grammar_from_regex(grammar.text)
        else:  # GBNF or Lark: llguidance tells them apart
            compiled = llg.grammar_from("grammar", grammar.text)
        error = llg.LLMatcher.validate_grammar(compiled, lltokenizer, limits=_limits())
    except (ValueError, TypeError, RuntimeError) as exc:
        error = str(exc)
    if error:
        raise LlamalabError(f"invalid {_noun(grammar.kind)}: {_short(error)}")
    return compiled


class Constraint:
    """One reply's parser: which tokens may come next, and what was generated so far."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) with every token the grammar rules out at -inf (a new tensor)."""
        import numpy as np
        import torch

        bits = self._matcher.compute_bitmask()
        self._check()
        allowed = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
        allowed = torch.from_numpy(allowed[: logits.shape[-1]].astype(bool))
        if allowed.shape[0] < logits.shape[-1]:  # ids past the tokenizer's: never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        if not bool(allowed.any()):
            raise LlamalabError("the grammar allows no token here")
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> None:
        """Take the token that was drawn (one the mask allowed)."""
        if not self._matcher.consume_token(token):
            detail = self._matcher.get_error() if self._matcher.is_error() else ""
            raise LlamalabError(
                f"token {token} does not fit the grammar"
                + (f": {_short(detail)}" if detail else "")
            )

    @property
    def complete(self) -> bool:
        """Whether the grammar can take no more tokens: the reply is finished."""
        return bool(self._matcher.is_stopped())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise LlamalabError(f"grammar: {_short(self._matcher.get_error())}")


class _Vocabulary:
    """The tokenizer as llguidance reads one (its ``TokenizerWrapper`` protocol)."""

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], stop_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.eos_token_id = stop_ids[0] if stop_ids else tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(len(tokens)) if tokenizer.is_special(i)]

    def __call__(self, text: str | bytes) -> list[int]:
        # llguidance tokenizes short forced strings with this; plain text, no BOS.
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, special=False)


def _limits() -> Any:
    # llguidance's defaults bound each mask to a few milliseconds of work; only the
    # verbose errors are turned off (they can repeat large parts of a hostile grammar).
    return _llguidance().LLParserLimits(verbose_errors=False)


def _short(message: str) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= ERROR_CHARS else message[: ERROR_CHARS - 1] + "…"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover  (a declared dependency)
        raise LlamalabError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from None
    return llguidance
