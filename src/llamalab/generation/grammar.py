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
read, and each mask is bounded by llguidance's parser limits. Compiling is bounded in
time, memory and stack by running in a child process that is killed at the deadline
(llguidance's GBNF reader is Python, quadratic in a chain of rules: 20,000 of them took
over 25 minutes; and a deep enough grammar overflows its Rust stack). Every failure is one
:class:`LlamalabError` that says what is wrong with the grammar, without llguidance's
internal names.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamalab.errors import LlamalabError
from llamalab.files import read_text_bounded

if TYPE_CHECKING:
    import torch

    from llamalab.tokenizer.base import Tokenizer

GRAMMAR_KINDS = ("json_schema", "grammar", "regex")
MAX_GRAMMAR_BYTES = 1 << 20  # a grammar or schema longer than 1 MiB is refused unread
MAX_SCHEMA_DEPTH = 64  # nesting of a JSON Schema's objects and arrays
COMPILED_CACHE_SIZE = 32  # compiled grammars kept per tokenizer (a server sees repeats)
# llguidance compiles a usual grammar or schema in milliseconds; a grammar that needs
# seconds is hostile or a mistake.
COMPILE_TIMEOUT_S = 10.0
MAX_PENDING_COMPILES = 16  # compiles waiting or running; more are refused (retry later)
WORKER_START_TIMEOUT_S = 60.0  # a child process's start (Python, llguidance, the vocabulary)
# A compile's thread in the child has a quarter of a usual thread's 8 MiB stack, so a
# grammar deep enough to overflow it is refused there, with margin for the server's threads.
WORKER_STACK_BYTES = 2 << 20
WORKER_MEMORY_BYTES = 4 << 30  # a child's address space
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
    # llguidance's form, once compiled (the server compiles before it queues a request,
    # so the engine never compiles); not part of the grammar's identity.
    compiled: str | None = field(default=None, compare=False, repr=False)

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
        # A leading byte-order mark (Windows editors write one) is dropped, not refused.
        text = read_text_bounded(path, MAX_GRAMMAR_BYTES, _noun(kind))
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


class GrammarTimeout(LlamalabError):
    """Compiling a grammar took longer than the compiler's bound; the work was abandoned."""


class CompilerBusy(LlamalabError):
    """Too many grammars are waiting to be compiled; the caller should retry later."""


class GrammarCompiler:
    """Compiles grammars for one tokenizer and hands out a fresh :class:`Constraint` each.

    Compiling runs in child processes (see :class:`CompilePool`), so a grammar that would
    compile for minutes, or crash llguidance, is stopped at ``timeout`` seconds and costs
    this process nothing but a wait. Compiled grammars are kept in a small cache, so a
    server that sees the same schema again does not compile it again; the lock guards
    only the cache, never a compile.

    Args:
        tokenizer: the model's tokenizer.
        stop_ids: the tokens that end a reply; the grammar allows them once its text is
            complete.
        vocab_size: the ids that sampling sees (the engine's ``vocab_size``).
        timeout: seconds one compile may take.
        workers: child processes that compile at once.
        max_pending: compiles that may wait or run at once; more raise :class:`CompilerBusy`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_ids: Iterable[int],
        vocab_size: int,
        *,
        timeout: float = COMPILE_TIMEOUT_S,
        workers: int = 1,
        max_pending: int = MAX_PENDING_COMPILES,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_ids)
        self.vocab_size = vocab_size
        self.timeout, self.workers, self.max_pending = timeout, workers, max_pending
        self._lock = threading.Lock()  # the cache, the in-flight table and the pool's creation
        self._lltokenizer: Any = None
        self._compiled: OrderedDict[Grammar, str] = OrderedDict()
        self._inflight: dict[Grammar, Future[str]] = {}
        self._pool: CompilePool | None = None

    def configure(self, *, timeout: float, workers: int, max_pending: int) -> None:
        """Set the bounds (the server's options); call before the first compile."""
        if not timeout > 0 or workers < 1 or max_pending < 1:
            raise LlamalabError(
                "grammar compiling needs a positive timeout, at least one worker and one place"
            )
        with self._lock:
            if self._pool is not None:
                raise LlamalabError("the grammar compiler has started already")
            self.timeout, self.workers, self.max_pending = timeout, workers, max_pending

    def start(self) -> None:
        """Start the child processes now rather than on the first compile (a server's start)."""
        self._get_pool().warm_up()

    def close(self) -> None:
        """End the child processes; a later compile starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _vocabulary(self) -> list[bytes]:
        tok = self.tokenizer
        # A special token's text is not text the model writes: llguidance's convention
        # marks such tokens with a leading 0xFF byte, which no UTF-8 text holds.
        return [
            b"\xff" + tok.token_bytes(i) if tok.is_special(i) else tok.token_bytes(i)
            for i in range(tok.vocab_size)
        ]

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                tok = self.tokenizer
                wrapper = _Vocabulary(tok, self._vocabulary(), self.stop_ids)
                self._lltokenizer = _llguidance().LLTokenizer(
                    wrapper, n_vocab=tok.vocab_size, eos_token=self.stop_ids or None
                )
            return self._lltokenizer

    def _get_pool(self) -> CompilePool:
        with self._lock:
            if self._pool is None:
                tok = self.tokenizer
                vocab = _VocabMessage(
                    tokens=self._vocabulary(),
                    eos=self.stop_ids,
                    bos=tok.bos_id,
                    special=[i for i in range(tok.vocab_size) if tok.is_special(i)],
                )
                self._pool = CompilePool(
                    vocab,
                    workers=self.workers,
                    timeout=self.timeout,
                    max_pending=self.max_pending,
                )
            return self._pool

    def cached(self, grammar: Grammar) -> str | None:
        """llguidance's form of ``grammar`` if it was compiled already, else None."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
            return compiled

    def submit(self, grammar: Grammar) -> Future[str]:
        """Start compiling ``grammar`` (or find it cached, or already being compiled).

        The future holds llguidance's form of the grammar, or raises :class:`LlamalabError`
        (:class:`GrammarTimeout` past the bound); this call itself raises
        :class:`CompilerBusy` when ``max_pending`` compiles are under way already.
        """
        compiled = self.cached(grammar)
        if compiled is not None:
            done: Future[str] = Future()
            done.set_result(compiled)
            return done
        pool = self._get_pool()
        with self._lock:
            running = self._inflight.get(grammar)
            if running is not None:  # the same grammar from another request: one compile
                return running
            future = pool.submit(grammar)
            self._inflight[grammar] = future
        future.add_done_callback(lambda f: self._store(grammar, f))
        return future

    def _store(self, grammar: Grammar, future: Future[str]) -> None:
        with self._lock:
            self._inflight.pop(grammar, None)
            if future.cancelled() or future.exception() is not None:
                return
            self._compiled[grammar] = future.result()
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)

    def compile(self, grammar: Grammar) -> str:
        """llguidance's form of ``grammar``, checked; :class:`LlamalabError` if it is invalid,
        takes longer than ``timeout`` to compile, or fails on its first tokens."""
        return self.submit(grammar).result()

    def constraint(self, grammar: Grammar) -> Constraint:
        """A new parser for ``grammar`` at the start of a reply.

        A grammar that carries its compiled form (``Grammar.compiled``, as the server
        hands them to the engine) is not compiled again.
        """
        compiled = grammar.compiled or self.compile(grammar)
        llg = _llguidance()
        matcher = llg.LLMatcher(self._llg_tokenizer(), compiled, log_level=0, limits=_limits())
        if matcher.is_error():
            raise LlamalabError(f"invalid {_noun(grammar.kind)}: {_plain(matcher.get_error())}")
        return Constraint(matcher, self.vocab_size)

    @property
    def pending(self) -> int:
        """Compiles waiting or running."""
        return 0 if self._pool is None else self._pool.pending

    def stuck_for(self) -> float:
        """Seconds the oldest running compile has run (0 when none runs)."""
        return 0.0 if self._pool is None else self._pool.oldest_running()


def check_grammar(grammar: Grammar, timeout: float = COMPILE_TIMEOUT_S) -> None:
    """Raise :class:`LlamalabError` if ``grammar`` is invalid whatever the vocabulary.

    Needs no model (the command line checks a grammar file before it loads one); the
    compile runs in a child process and is abandoned after ``timeout`` seconds.
    """
    pool = CompilePool(None, workers=1, timeout=timeout, max_pending=1)
    try:
        pool.submit(grammar).result()
    finally:
        pool.close()


# ---------------------------------------------------------------------------- child processes
@dataclass
class _VocabMessage:
    """What a child process needs to build llguidance's view of the vocabulary."""

    tokens: list[bytes]
    eos: list[int]
    bos: int | None
    special: list[int]

    def encode(self) -> bytes:
        # latin-1 maps each byte to one code point, so any token survives JSON.
        return json.dumps(
            {
                "tokens": [t.decode("latin-1") for t in self.tokens],
                "eos": self.eos,
                "bos": self.bos,
                "special": self.special,
            }
        ).encode()


class _Worker:
    """One child process that compiles grammars, one at a time, until it is killed."""

    def __init__(self, vocab: bytes, start_timeout: float) -> None:
        self.vocab = vocab
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._send: Any = None
        self._recv: Any = None

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llamalab.generation.grammar",
                    str(to_child_r),
                    str(from_child_w),
                ],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # a crash is reported as such to the client
            )
        except OSError as exc:
            for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
                os.close(fd)
            raise LlamalabError(f"cannot start a grammar compiler process: {exc}") from None
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        reply = self._exchange(self.vocab, self.start_timeout, starting=True)
        if not reply.get("ready"):
            self.kill()
            raise LlamalabError("the grammar compiler process did not start")

    def _exchange(
        self, message: bytes, timeout: float, *, starting: bool = False, noun: str = "grammar"
    ) -> dict:
        try:
            self._send.send_bytes(message)
            if not self._recv.poll(timeout):
                self.kill()
                if starting:
                    raise LlamalabError("the grammar compiler process did not start in time")
                raise GrammarTimeout(
                    f"compiling the {noun} took longer than {timeout:g} s and was stopped; "
                    "simplify it (fewer rules, smaller repetition counts)"
                )
            return json.loads(self._recv.recv_bytes())
        except (EOFError, OSError, ValueError):
            # The child died: llguidance crashed on the grammar (a stack overflow on deep
            # nesting, say) or it ran out of its memory bound.
            self.kill()
            if starting:
                raise LlamalabError("the grammar compiler process did not start") from None
            raise LlamalabError(
                f"the compiler failed on the {noun} (it may nest too deeply or need too "
                "much memory)"
            ) from None

    def run(self, grammar: Grammar, timeout: float) -> dict:
        """Send one compile; its reply, or :class:`GrammarTimeout` (the child is killed)."""
        if self.proc is None:
            self._start()
        request = json.dumps({"kind": grammar.kind, "text": grammar.text}).encode()
        return self._exchange(request, timeout, noun=_noun(grammar.kind))

    def kill(self) -> None:
        """End the child at once (a later `run` starts another)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None


class CompilePool:
    """Compiles grammars in child processes: bounded in time, memory, stack and queue.

    ``workers`` threads of this process each own one child and wait on it, so the
    threads that serve other work (tokenizing, the event loop's helpers) are never
    taken by a compile. A compile that runs past ``timeout`` seconds has its child
    killed and fails with :class:`GrammarTimeout`; at most ``max_pending`` compiles
    wait or run, and :meth:`submit` raises :class:`CompilerBusy` beyond that.

    ``vocab`` None compiles without a vocabulary (a grammar's own validity only).
    """

    def __init__(
        self, vocab: _VocabMessage | None, *, workers: int, timeout: float, max_pending: int
    ) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        message = vocab.encode() if vocab is not None else b"{}"
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(_Worker(message, WORKER_START_TIMEOUT_S))
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="llamalab-grammar")
        self._lock = threading.Lock()
        self._pending = 0
        self._started: dict[int, float] = {}  # running compiles by thread id: their start
        self._workers = workers

    @property
    def pending(self) -> int:
        """Compiles waiting or running."""
        return self._pending

    def oldest_running(self) -> float:
        """Seconds the oldest running compile has run (0 when none runs)."""
        started = list(self._started.values())
        return time.monotonic() - min(started) if started else 0.0

    def warm_up(self) -> None:
        """Start every child now, in the pool's threads (the first compile then waits less)."""
        for _ in range(self._workers):
            self._executor.submit(self._warm)

    def _warm(self) -> None:
        worker = self._idle.get()
        try:
            if worker.proc is None:
                worker._start()
        except LlamalabError:
            log.warning("a grammar compiler process did not start; the next compile retries")
        finally:
            self._idle.put(worker)

    def submit(self, grammar: Grammar) -> Future[str]:
        """Queue a compile; :class:`CompilerBusy` if ``max_pending`` are under way."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise CompilerBusy(
                    f"{self._pending} grammars are being compiled already; retry later"
                )
            self._pending += 1
        try:
            return self._executor.submit(self._compile, grammar)
        except RuntimeError:  # closed
            with self._lock:
                self._pending -= 1
            raise CompilerBusy("the grammar compiler is shutting down") from None

    def _compile(self, grammar: Grammar) -> str:
        worker = self._idle.get()
        me = threading.get_ident()
        self._started[me] = time.monotonic()
        try:
            reply = worker.run(grammar, self.timeout)
        finally:
            self._started.pop(me, None)
            self._idle.put(worker)
            with self._lock:
                self._pending -= 1
        if "error" in reply:
            raise LlamalabError(str(reply["error"]))
        return str(reply["compiled"])

    def close(self) -> None:
        """Stop taking compiles and end the children."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break


def _compile_here(kind: str, text: str, lltokenizer: Any) -> str:
    """llguidance's form of a grammar, checked; runs in a child process.

    With a vocabulary the check goes further than llguidance's own validation: a parser
    is made and walked for two tokens, since some grammars (a schema that refers to
    itself, a repetition counted in millions) validate but fail on their first mask or
    token. A failure here is a 400 for the client; during generation it would be a 500.
    """
    llg = _llguidance()
    noun = _noun(kind)
    try:
        if kind == "json_schema":
            # Fixed separators, as json.dumps writes them: a small model left free to
            # choose whitespace can loop on newlines until max_tokens.
            compiled = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        elif kind == "regex":
            compiled = llg.LLMatcher.grammar_from_regex(text)
        else:  # GBNF or Lark: llguidance tells them apart
            compiled = llg.grammar_from("grammar", text)
        error = llg.LLMatcher.validate_grammar(compiled, lltokenizer, limits=_limits())
    except (ValueError, TypeError, RuntimeError, RecursionError) as exc:
        error = str(exc)
    if error:
        raise LlamalabError(f"invalid {noun}: {_plain(error)}")
    if lltokenizer is not None:
        matcher = llg.LLMatcher(lltokenizer, compiled, log_level=0, limits=_limits())
        for step in range(2):
            if matcher.is_error() or matcher.is_stopped():
                break
            bits = matcher.compute_bitmask()
            if matcher.is_error():
                break
            token = next((i * 8 + (b & -b).bit_length() - 1 for i, b in enumerate(bits) if b), None)
            if token is None or step == 1:
                break
            matcher.consume_token(token)
        if matcher.is_error():
            raise LlamalabError(f"the {noun} cannot be followed: {_plain(matcher.get_error())}")
    return compiled


class _ChildVocabulary:
    """The vocabulary as llguidance reads one, in a child process (no tokenizer there)."""

    is_tokenizer_wrapper = True

    def __init__(self, message: dict[str, Any]) -> None:
        self.tokens = [t.encode("latin-1") for t in message["tokens"]]
        self.eos_token_id = message["eos"][0] if message["eos"] else None
        self.bos_token_id = message["bos"]
        self.special_token_ids = message["special"]
        self.lltokenizer: Any = None

    def __call__(self, text: str | bytes) -> list[int]:
        # Forced text is tokenized greedily here: the walk only checks that the grammar
        # can be followed, and the parent process tokenizes with the real tokenizer.
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return [] if self.lltokenizer is None else self.lltokenizer.greedy_tokenize(text)


def _child_main(read_fd: int, write_fd: int) -> None:
    """A compile worker's loop: one JSON request in, one JSON reply out, until EOF."""
    import resource
    from multiprocessing.connection import Connection

    parent = os.getppid()

    def watch_parent() -> None:  # the parent was killed: no one will read the reply
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    try:  # a grammar that needs more memory than this crashes the child, not the server
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    vocab = json.loads(inbox.recv_bytes())
    lltokenizer = None
    if vocab:
        wrapper = _ChildVocabulary(vocab)
        lltokenizer = _llguidance().LLTokenizer(
            wrapper, n_vocab=len(wrapper.tokens), eos_token=vocab["eos"] or None
        )
        wrapper.lltokenizer = lltokenizer
    outbox.send_bytes(b'{"ready": true}')
    # Compiles run on a thread with a smaller stack than the server's threads have, so a
    # grammar that llguidance walks recursively overflows here first, never in the server.
    threading.stack_size(WORKER_STACK_BYTES)
    while True:
        try:
            request = json.loads(inbox.recv_bytes())
        except EOFError:
            return
        reply: dict[str, str] = {}

        def work(request: dict[str, str] = request, reply: dict[str, str] = reply) -> None:
            try:
                reply["compiled"] = _compile_here(request["kind"], request["text"], lltokenizer)
            except LlamalabError as exc:
                reply["error"] = str(exc)
            except Exception:  # noqa: BLE001  (llguidance's own failure: no internals)
                reply["error"] = f"invalid {_noun(request['kind'])}: the compiler failed on it"

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        outbox.send_bytes(json.dumps(reply).encode())


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
                + (f": {_plain(detail)}" if detail else "")
            )

    @property
    def complete(self) -> bool:
        """Whether the grammar can take no more tokens: the reply is finished."""
        return bool(self._matcher.is_stopped())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise LlamalabError(
                f"the grammar cannot be followed: {_plain(self._matcher.get_error())}"
            )


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


_LIMIT_WORDS = ("too many", "fuel", "limit", "too large", "too big")


def _plain(error: str) -> str:
    """llguidance's error in words a client can act on, without its internal names.

    A bare identifier (``NoExtensionBias``) names a state inside the parser; a parser
    limit says which counter ran out. Neither helps the client, who gets a sentence
    instead; syntax errors, which point into the client's own text, are kept.
    """
    message = " ".join(str(error).replace("<non-verbose/>", " ").split())
    lowered = message.lower()
    if re.fullmatch(r"[A-Za-z_]+", message):
        return "the parser cannot make progress with it (a schema that refers to itself?)"
    if any(word in lowered for word in _LIMIT_WORDS):
        return "it needs more parser work per token than this server allows; simplify it"
    return _short(message)


def _short(message: str) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= ERROR_CHARS else message[: ERROR_CHARS - 1] + "…"


log = logging.getLogger(__name__)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover  (a declared dependency)
        raise LlamalabError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from None
    return llguidance


if __name__ == "__main__":  # a compile worker, started by CompilePool
    _child_main(int(sys.argv[1]), int(sys.argv[2]))
