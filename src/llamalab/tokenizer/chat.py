"""Chat templates: the Jinja2 template a model carries, rendered in a sandbox.

A chat template comes from the checkpoint (GGUF ``tokenizer.chat_template``, Hugging Face
``tokenizer_config.json``), so it is untrusted input: it is compiled in Jinja's immutable
sandbox, where it cannot call unsafe methods, read private attributes or mutate the
messages. The environment matches the one `transformers` uses (``trim_blocks``,
``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text, the
``raise_exception`` and ``strftime_now`` globals) so templates render byte for byte
the same.

Rendering is bounded in time and size (`DEFAULT_RENDER_TIMEOUT_S`,
`DEFAULT_MAX_OUTPUT_CHARS`): a hostile template that loops for ever or builds a huge
string stops with a `LlamalabError` instead of hanging or exhausting memory.

Models that carry no template get a built-in one chosen from their vocabulary: Llama 3
headers, ChatML, or Llama 2's ``[INST] <<SYS>>`` format.
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import inspect
import json
import re
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from markupsafe import EscapeFormatter, Markup

from llamalab.errors import LlamalabError

# Meta's Llama 3 format (llama_models.llama3.chat_format): a header per message, the
# content as it is, <|eot_id|> after each; BOS once at the start.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML (SmolLM2, Qwen and others): <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Meta's Llama 2 chat format (llama/generation.py, chat_completion): every user turn is
# "<s>[INST] {user} [/INST]" and every answer " {answer} </s>", contents stripped; a
# system message is folded into the first user turn inside <<SYS>> markers. Roles must
# alternate user/assistant, as Meta's code asserts.
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}"
    "{% if message['role'] != expected %}"
    "{{ raise_exception('Llama 2 chat needs alternating user/assistant messages after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ content %}"
    "{% endif %}"
    "{{ bos_token }}[INST] {{ content | trim }} [/INST]"
    "{% else %}"
    " {{ message['content'] | trim }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

BUILTIN_TEMPLATES = {
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama2": LLAMA2_TEMPLATE,
}


# ---------------------------------------------------------------- render limits
#
# A template is code from a downloaded file, rendered inside a server. The sandbox
# stops it from touching anything it should not; these limits stop it from taking
# forever or allocating without bound, per render and per thread (never process-wide,
# which would hit the server's other requests):
#
# - time: a watchdog thread raises an exception *in the rendering thread* (CPython's
#   PyThreadState_SetAsyncExc) once the deadline passes, so a runaway loop stops where
#   it is instead of running on in the background; a render that finishes in time
#   costs a heap push and pop, nothing per line (a per-thread sys.settrace deadline
#   check was measured at about 1 ms on a 20-message ChatML render, 10x the render);
# - size: every operation that can make a value much larger than its inputs (``*``,
#   ``**``, ``+``, ``%``, ``~``, list/tuple/dict literals, the expanding ``str``
#   methods and filters) is checked *before* it runs, against the render's character
#   budget, and the output is counted as it streams out. A value's size is what
#   ``str()`` of it would be (`_Budget.weight`), so aliasing one big string a million
#   times in a list costs a million times its length.

DEFAULT_RENDER_TIMEOUT_S = 5.0
"""How long a render may take before it is stopped (seconds)."""

DEFAULT_MAX_OUTPUT_CHARS = 4 * 1024 * 1024
"""The character budget of a render, on top of twice the size of its inputs: a prompt
is the conversation plus the template's own text, so a few MiB more than the messages
is far beyond any real template, and a request with long messages still renders."""

# Integers a template computes stay below this many bits: Python's multiplication and
# power run in C without a chance to stop them, and str() refuses ints past 4300 digits.
_MAX_INT_BITS = 1 << 16


class _RenderLimitError(Exception):
    """A render ran past its deadline or its character budget."""


class _Budget:
    """The limits of one render on one thread."""

    def __init__(self, deadline: float, timeout_s: float, max_chars: int) -> None:
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        # Weights of containers already measured, with the objects themselves so their
        # ids cannot be reused while the render runs.
        self._known: dict[int, tuple[Any, int]] = {}

    def too_big(self) -> _RenderLimitError:
        return _RenderLimitError(f"produced more than {self.max_chars} characters")

    def check(self, size: int) -> None:
        if size > self.max_chars:
            raise self.too_big()

    def weight(self, value: Any) -> int:
        """About ``len(str(value))``, stopping early once past the budget."""
        if isinstance(value, (str, bytes)):
            return len(value) + 3
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            known = self._known.get(id(value))
            if known is not None and known[0] is value:
                return known[1]
            total = 2
            items = value.items() if isinstance(value, dict) else value
            for item in items:
                total += self.weight(item) + 2
                if total > self.max_chars:
                    raise self.too_big()
            self._known[id(value)] = (value, total)
            return total
        return 24  # numbers, None, booleans, Undefined and other small leaves

    def checked(self, value: Any) -> Any:
        self.check(self.weight(value))
        return value


class _RenderTimeoutError(BaseException):
    """Raised asynchronously in a rendering thread by the watchdog (a class, no args).

    A BaseException, so that no ``except Exception`` on the way handles it: Jinja's
    ``generate`` catches Exception to rewrite the traceback, and an exception delivered
    between two bytecodes can carry a frame without a line number, on which that rewrite
    itself fails with a TypeError that would hide the timeout.
    """


class _Watchdog:
    """One daemon thread that interrupts renders past their deadline."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._count = 0
        self._thread: threading.Thread | None = None
        # When the watchdog wakes up next: it is only woken early for an earlier deadline,
        # so a render that ends in time costs no thread switch.
        self._wake_at = float("inf")

    def watch(self, timeout_s: float) -> _Watch:
        watch = _Watch(threading.get_ident(), time.monotonic() + timeout_s)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="llamalab-template-watchdog", daemon=True
                )
                self._thread.start()
            self._count += 1
            heapq.heappush(self._heap, (watch.deadline, self._count, watch))
            if watch.deadline < self._wake_at:
                self._wake_at = watch.deadline
                self._lock.notify()
        return watch

    def finish(self, watch: _Watch) -> None:
        """End a watch; clear the interrupt if it was sent but not yet delivered."""
        with self._lock:
            if watch.active and watch.fired:
                _set_async_exc(watch.thread_id, None)
            watch.active = False

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and not self._heap[0][2].active:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._wake_at = float("inf")
                    self._lock.wait()
                    continue
                deadline, _, watch = self._heap[0]
                now = time.monotonic()
                if now < deadline:
                    self._wake_at = deadline
                    self._lock.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                watch.fired = True
                _set_async_exc(watch.thread_id, _RenderTimeoutError)


class _Watch:
    __slots__ = ("active", "deadline", "fired", "thread_id")

    def __init__(self, thread_id: int, deadline: float) -> None:
        self.thread_id = thread_id
        self.deadline = deadline
        self.active = True
        self.fired = False


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


_watchdog = _Watchdog()


_local = threading.local()


def _input_chars(value: Any) -> int:
    """The characters in a render's inputs (strings in nested dicts and lists), fast:
    this runs on every render, unlike `_Budget.weight`."""
    kind = type(value)
    if kind is str:
        return len(value)
    total = 0
    if kind is dict:
        for key, item in value.items():
            total += len(key) if type(key) is str else 8
            total += len(item) if type(item) is str else _input_chars(item)
    elif kind is list or kind is tuple:
        for item in value:
            total += len(item) if type(item) is str else _input_chars(item)
    else:
        total = (
            8 if not isinstance(value, (Mapping, Sequence)) else _Budget(0, 0, 2**62).weight(value)
        )
    return total


def _budget() -> _Budget:
    budget: _Budget | None = getattr(_local, "budget", None)
    if budget is None:
        # Outside ChatTemplate.render (a template rendered some other way): default limits.
        budget = _Budget(
            time.monotonic() + DEFAULT_RENDER_TIMEOUT_S,
            DEFAULT_RENDER_TIMEOUT_S,
            DEFAULT_MAX_OUTPUT_CHARS,
        )
    return budget


def _check_int_bits(bits: int) -> None:
    if bits > _MAX_INT_BITS:
        raise _RenderLimitError(f"computed an integer of more than {_MAX_INT_BITS} bits")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_SEQUENCES = (str, bytes, list, tuple)

# printf-style conversions, with their width and precision ("*" takes them from args).
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)")
# The width and precision of a str.format spec ("{:>1000}", "{:.500f}").
_FORMAT_SPEC = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[_,]?(?:\.(\d+))?")


def _check_percent(fmt: str, args: Any, budget: _Budget) -> None:
    """Bound ``fmt % args`` before it runs: widths, precisions and the values' sizes."""
    size = len(fmt) + budget.weight(args)
    for m in _PERCENT_SPEC.finditer(fmt):
        for part in (m.group(1), m.group(2)):
            if part == "*":
                # Widths from the arguments: bound by the largest integer among them.
                values = args if isinstance(args, tuple) else (args,)
                size += max([abs(v) for v in values if _is_int(v)], default=0)
            elif part:
                size += int(part)
    budget.check(size)


def _check_format_spec(spec: str, budget: _Budget) -> None:
    m = _FORMAT_SPEC.match(spec)
    if m:
        budget.check(sum(int(g) for g in m.groups() if g))


class _BoundedFormatter(SandboxedFormatter):
    """The sandbox's ``str.format`` with each field's width and precision bounded."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = _budget()
        _check_format_spec(format_spec, budget)
        budget.check(budget.weight(value))
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    """The same for ``Markup.format``."""


def _check_str_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Bound the ``str``/``bytes`` methods whose result can be much larger than the string."""
    s, name, budget = method.__self__, method.__name__, _budget()
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if _is_int(width):
            budget.check(width)
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tabsize):
            budget.check(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * tabsize)
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, type(s)) and isinstance(new, type(s)):
            budget.check(len(s) + s.count(old) * max(len(new) - len(old), 0) + len(new))
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            budget.check(budget.weight(items) + len(s) * len(items))
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max([budget.weight(v) for v in args[0].values()], default=0)
        budget.check(len(s) * longest)


_EXPANDING_METHODS = frozenset(
    ("center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join", "translate")
)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with literals and ``~`` checked against the budget.

    A list or dict literal can hold the same big value many times and ``~`` joins the
    ``str()`` of its operands, so both are measured before ``str()`` could run on them.
    """

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_List(node, frame)
        self.write(")")

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        # Tuples are also assignment targets ({% for a, b in ... %}): only wrap loads.
        if node.ctx != "load":
            super().visit_Tuple(node, frame)
            return
        self.write("environment.checked(")
        super().visit_Tuple(node, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_Dict(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Jinja's choice of join function, with the operands measured on the way in.
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"{join}(environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


def _guard_filter(filt: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    """A filter that calls ``check`` with its bound arguments before it runs."""
    signature = inspect.signature(filt)
    skip = 1 if getattr(filt, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(filt)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(list(bound.arguments.items())[skip:])
        check(_budget(), **values)
        return filt(*args, **kwargs)

    return guarded


def _text_len(budget: _Budget, value: Any) -> int:
    return budget.weight(value)


def _check_center(budget: _Budget, value: Any, width: Any = 80) -> None:
    budget.check(_text_len(budget, value) + (width if _is_int(width) else 0))


def _check_indent(budget: _Budget, s: Any, width: Any = 4, **_: Any) -> None:
    text = _text_len(budget, s)
    per_line = width if _is_int(width) else _text_len(budget, width)
    lines = s.count("\n") + 1 if isinstance(s, str) else text
    budget.check(text + lines * per_line)


def _check_format(budget: _Budget, value: Any, args: Any = (), kwargs: Any = None) -> None:
    if isinstance(value, str):
        _check_percent(value, kwargs or tuple(args), budget)


def _check_wordwrap(
    budget: _Budget, s: Any, width: Any = 79, wrapstring: Any = None, **_: Any
) -> None:
    text = _text_len(budget, s)
    budget.check(text * (2 + (_text_len(budget, wrapstring) if wrapstring else 0)))


def _check_replace(budget: _Budget, s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = s.count(old) if count is None or not _is_int(count) else min(count, s.count(old))
        budget.check(len(s) + n * max(len(new) - len(old), 0) + len(new))


def _check_batch(budget: _Budget, value: Any, linecount: Any, fill_with: Any = None) -> None:
    if _is_int(linecount) and fill_with is not None:
        budget.check(linecount * (budget.weight(fill_with) + 2))


def _check_slice(budget: _Budget, value: Any, slices: Any, fill_with: Any = None) -> None:
    if _is_int(slices):
        budget.check(slices * (4 + (budget.weight(fill_with) if fill_with is not None else 0)))


def _check_sum(budget: _Budget, iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    # Summing lists or strings copies them over and over, in C; numbers are cheap.
    if isinstance(start, _SEQUENCES):
        budget.check(budget.weight(iterable) + budget.weight(start))


def _check_urlize(budget: _Budget, value: Any, **options: Any) -> None:
    extra = sum(_text_len(budget, v) for v in options.values() if isinstance(v, str))
    budget.check(_text_len(budget, value) * (4 + extra))


def _check_lipsum(
    budget: _Budget, n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100
) -> None:
    if _is_int(n) and _is_int(max):
        budget.check(n * max * 16)


def _bounded_join(join: Callable[..., Any]) -> Callable[..., Any]:
    """``join`` with the items and separator measured first (the items are listed, as
    Jinja's own ``join`` does, so a generator is read once)."""

    @functools.wraps(join)
    def bounded(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        items = list(value)
        budget = _budget()
        budget.check(budget.weight(items) + budget.weight(d) * len(items))
        return join(eval_ctx, items, d, attribute)

    return bounded


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "batch": _check_batch,
    "slice": _check_slice,
    "sum": _check_sum,
    "urlize": _check_urlize,
}


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing loudly on unsafe access.

    Jinja's sandbox answers ``x.__class__`` with an undefined value that prints as an
    empty string; an escape attempt should stop the render instead, so the caller learns
    the template is hostile rather than getting a silently different prompt.
    """

    code_generator_class = _BoundedCodeGenerator
    # Operators whose result can be far larger than their operands; Jinja compiles them
    # to call_binop. The others (-, /, //, comparisons) cannot grow anything.
    intercepted_binops = frozenset(("*", "**", "+", "%"))

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:  # type: ignore[override]
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe"
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = getattr(_local, "budget", None) or _budget()
        if operator == "+" and type(left) is str and type(right) is str:
            # The common case (message + '\n'), kept cheap.
            if len(left) + len(right) > budget.max_chars:
                raise budget.too_big()
            return left + right
        if operator == "*":
            if _is_int(left) and _is_int(right):
                _check_int_bits(left.bit_length() + right.bit_length())
            elif _is_int(left) and isinstance(right, _SEQUENCES):
                budget.check(budget.weight(right) * left)
            elif _is_int(right) and isinstance(left, _SEQUENCES):
                budget.check(budget.weight(left) * right)
        elif operator == "**":
            if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
                _check_int_bits(left.bit_length() * right)
        elif operator == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                budget.check(budget.weight(left) + budget.weight(right))
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right, budget)
        return super().call_binop(context, operator, left, right)

    def call(  # type: ignore[override]
        self,
        context: Context,
        obj: Any,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if (
            isinstance(obj, types.BuiltinMethodType)
            and isinstance(obj.__self__, (str, bytes))
            and obj.__name__ in _EXPANDING_METHODS
        ):
            _check_str_method(obj, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Jinja's wrapper for str.format/format_map, with width-checked formatters.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        f_self = value.__self__
        formatter: SandboxedFormatter = (
            _BoundedEscapeFormatter(self, escape=f_self.escape)
            if isinstance(f_self, Markup)
            else _BoundedFormatter(self)
        )
        is_format_map = value.__name__ == "format_map"

        @functools.wraps(value)
        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                kwargs, args = args[0], ()
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return bounded

    def checked(self, value: Any) -> Any:
        """A literal built by the template, measured against the render's budget."""
        return _budget().checked(value)

    def checked_concat(self, operands: tuple[Any, ...]) -> tuple[Any, ...]:
        """The operands of ``~``, measured before they are turned into strings."""
        budget = _budget()
        budget.check(sum(budget.weight(x) for x in operands))
        return operands


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    if indent is not None:
        budget = _budget()
        width = indent if _is_int(indent) else len(str(indent))
        budget.check(budget.weight(x) * (2 + max(width, 0)))
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _guard_filter(env.filters[name], check)
    env.filters["join"] = _bounded_join(env.filters["join"])
    env.globals["lipsum"] = _guard_filter(env.globals["lipsum"], _check_lipsum)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the token texts it is rendered with.

    Attributes:
        source: the Jinja text.
        name: where it came from (``"gguf"``, ``"tokenizer_config.json"``, or a
            built-in name such as ``"llama3"``).
        timeout_s: how long one render may take.
        max_chars: a render's character budget on top of twice its inputs' size
            (see `DEFAULT_MAX_OUTPUT_CHARS`).
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "template",
        timeout_s: float = DEFAULT_RENDER_TIMEOUT_S,
        max_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        try:
            self._template = _environment().from_string(source)
        except TemplateError as exc:
            raise LlamalabError(f"chat template ({name}) does not compile: {exc}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render a conversation.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: end with the header that starts the assistant's turn.
            **kwargs: extra template variables (``tools``, ``date_string``...).

        Raises:
            LlamalabError: the template raised an exception, failed, tried to escape
                the sandbox, ran longer than ``timeout_s`` or produced more than its
                character budget.
        """
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        variables = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            **context,
        }
        try:
            return self._render_bounded(variables)
        except _RenderLimitError as exc:
            raise LlamalabError(f"chat template ({self.name}) {exc}") from None
        except SecurityError as exc:
            raise LlamalabError(
                f"chat template ({self.name}) tried to escape its sandbox: {exc}"
            ) from None
        except TemplateError as exc:
            raise LlamalabError(f"chat template ({self.name}) failed: {exc}") from None
        # A template is code from the checkpoint: any error in it is the input's fault.
        except Exception as exc:  # noqa: BLE001
            raise LlamalabError(
                f"chat template ({self.name}) failed: {type(exc).__name__}: {exc}"
            ) from None

    def _render_bounded(self, variables: dict[str, Any]) -> str:
        budget = _Budget(time.monotonic() + self.timeout_s, self.timeout_s, 2**62)
        # The inputs are the caller's: the budget is on top of (twice) their size.
        budget.max_chars = self.max_chars + 2 * _input_chars(variables)
        outer = getattr(_local, "budget", None)
        _local.budget = budget
        watch = _watchdog.watch(self.timeout_s)
        try:
            try:
                chunks: list[str] = []
                total = 0
                for chunk in self._template.generate(**variables):
                    total += len(chunk)
                    if total > budget.max_chars:
                        raise budget.too_big()
                    chunks.append(chunk)
                return "".join(chunks)
            finally:
                _watchdog.finish(watch)
                _local.budget = outer
        except _RenderTimeoutError:
            # The interrupt may land anywhere up to finish(), even inside the finally
            # above: finish again (idempotent) and give the one clear message.
            _watchdog.finish(watch)
            _local.budget = outer
            raise _RenderLimitError(f"took longer than {self.timeout_s:g} s to render") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r})"


def builtin_template_name(vocabulary: Mapping[str, int]) -> str:
    """Choose a built-in template for a model without one, from its special tokens."""
    if "<|start_header_id|>" in vocabulary and "<|eot_id|>" in vocabulary:
        return "llama3"
    if "<|im_start|>" in vocabulary and "<|im_end|>" in vocabulary:
        return "chatml"
    return "llama2"
