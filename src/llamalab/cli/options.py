"""Options that several subcommands share, defined once.

Nothing here imports torch: building the parser (``llamalab --help``) must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os

from llamalab.errors import LlamalabError
from llamalab.runtime import DEVICE_CHOICES, DTYPE_CHOICES, THREADS_PER_CPU, max_threads

MODEL_HELP = (
    "GGUF file, Hugging Face or Meta folder (default: $LLAMALAB_MODEL or SmolLM2-135M-Instruct)"
)


def add_model_option(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("-m", "--model", type=model_ref, default=None, help=help)


def model_ref(text: str) -> str:
    """An argparse type: a model reference; an empty one (an unset shell variable) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a path, or leave it out for the default")
    return text


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """What every command that runs a model takes: the model, context, weight form, device, threads."""
    add_model_option(p)
    p.add_argument(
        "-c",
        "--ctx",
        type=positive_int,
        default=2048,
        help="context size in tokens, prompt and reply together (default: %(default)s)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="auto: the fastest form the kernels allow; "
        "float32: dequantize everything (reference maths)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=DEVICE_CHOICES,
        help="where to run (default: auto, CUDA when there is a GPU)",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads, at most 4 per CPU (default: the physical cores)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the CPU decode step with torch.compile: seconds of compiling for "
        "about 20%% faster steps (default: on for serve, off otherwise; "
        "LLAMALAB_COMPILE=1 or 0 sets the default)",
    )


def load_runtime_from_args(args: argparse.Namespace, *, compile_by_default: bool = False):
    """``(model, tokenizer)`` for a command's runtime options.

    ``--compile`` / ``--no-compile`` decide whether the decode step is compiled; without
    either, ``$LLAMALAB_COMPILE`` (1 or 0), else ``compile_by_default``.

    On a terminal, one line names what is being loaded before the slow part starts; piped
    output (scripts, tests) gets no chatter, so stderr carries only errors there.
    """
    import sys

    from llamalab.runtime import load_runtime
    from llamalab.startup import freeze_start_up, paused_gc

    compile = args.compile
    if compile is None:
        env = os.environ.get("LLAMALAB_COMPILE")
        compile = compile_by_default if env is None else env != "0"
    # A command keeps its model to the end: what the load built is frozen before the
    # collector runs again (see startup.freeze_start_up).
    with paused_gc():
        loaded = load_runtime(
            args.model,
            args.dtype,
            device=args.device,
            threads=args.threads,
            ctx=args.ctx,
            compile=compile,
            announce=sys.stderr.isatty(),
        )
        freeze_start_up()
    return loaded


# The KV cache of a one-off command is sized to its prompt and reply, in steps of this
# many tokens: SmolLM2's full 2,048-slot cache is 94 MB of zeros to write before the
# first token, where "Hello" and 16 tokens need 64 slots.
CONTEXT_STEP = 256


def context_in_use(prompt_tokens: int, max_tokens: int, ctx: int) -> int:
    """Slots a single request can fill: its prompt and ``max_tokens`` more, rounded up to
    :data:`CONTEXT_STEP`, at most ``ctx`` (``--ctx`` stays the bound and the error's number)."""
    needed = prompt_tokens + max_tokens
    return min(ctx, -(-needed // CONTEXT_STEP) * CONTEXT_STEP)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """How to sample and how much to generate (``generate`` and ``chat``)."""
    from llamalab.generation.params import SamplingParams

    d = SamplingParams()
    p.add_argument(
        "-n",
        "--max-tokens",
        type=positive_int,
        default=256,
        help="most tokens to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=finite_float,
        default=d.temperature,
        help="0 = greedy (default: %(default)s)",
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default: %(default)s)")
    p.add_argument(
        "--top-p", type=finite_float, default=d.top_p, help="1 = off (default: %(default)s)"
    )
    p.add_argument(
        "--min-p", type=finite_float, default=d.min_p, help="0 = off (default: %(default)s)"
    )
    p.add_argument(
        "--repeat-penalty",
        type=finite_float,
        default=d.repeat_penalty,
        help="1 = off (default: %(default)s)",
    )
    p.add_argument(
        "--presence-penalty",
        type=finite_float,
        default=d.presence_penalty,
        help="subtracted once from every token already generated, -2..2 (default: %(default)s)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=finite_float,
        default=d.frequency_penalty,
        help="subtracted per earlier occurrence in the reply, -2..2 (default: %(default)s)",
    )
    p.add_argument(
        "--logit-bias",
        type=logit_bias_entry,
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit; repeatable (e.g. 2=-100 bans id 2)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=None, help="random seed: the same seed gives the same text"
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="the reply is JSON valid against this JSON Schema (constrained while sampling)",
    )
    shape.add_argument(
        "--grammar",
        metavar="FILE",
        default=None,
        help="the reply matches this grammar, in llama.cpp's GBNF or in Lark syntax",
    )


def grammar_from_args(args: argparse.Namespace):
    """The Grammar that ``--json-schema`` or ``--grammar`` names, read and checked; or None.

    Checked before the model loads, so that a mistake in the file costs no waiting.
    """
    from llamalab.generation.grammar import Grammar, check_grammar

    if args.json_schema is not None:
        grammar = Grammar.from_file(args.json_schema, "json_schema")
    elif args.grammar is not None:
        grammar = Grammar.from_file(args.grammar, "grammar")
    else:
        return None
    try:
        check_grammar(grammar)
    except LlamalabError as exc:
        raise LlamalabError(f"{args.json_schema or args.grammar}: {exc}") from None
    return grammar


def logit_bias_entry(text: str) -> tuple[int, float]:
    """An argparse type: ``ID=BIAS`` (llama.cpp writes ``ID+BIAS`` / ``ID-BIAS``; both work)."""
    for sep in ("=", "+", "-"):
        head, found, tail = text.partition(sep)
        if found and head.strip().isdigit():
            try:
                bias = float(tail if sep != "-" else f"-{tail}")
            except ValueError:
                break
            if math.isfinite(bias):
                return int(head), bias
            break
    raise argparse.ArgumentTypeError(f"expected ID=BIAS (e.g. 2=-100), got {text!r}")


def sampling_from_args(args: argparse.Namespace):
    """The engine's SamplingParams from the options above; bad values are a LlamalabError."""
    from llamalab.generation.params import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=dict(args.logit_bias),
        seed=args.seed,
    )


def add_lookup_options(p: argparse.ArgumentParser) -> None:
    """Prompt lookup decoding: ``--lookup`` / ``--no-lookup``, ``--lookup-ngram``, ``--draft-max``."""
    from llamalab.generation.params import DEFAULT_DRAFT_MAX, DEFAULT_LOOKUP_NGRAM

    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--lookup",
        dest="lookup",
        action="store_true",
        default=None,
        help="draft tokens from the prompt and the reply and verify several in one pass: "
        "the same text, sooner where the reply repeats its input (on by default)",
    )
    group.add_argument("--no-lookup", dest="lookup", action="store_false", help="never draft")
    p.add_argument(
        "--lookup-ngram",
        type=int,
        default=None,
        metavar="N",
        help=f"match the last N (or fewer) tokens (default: {DEFAULT_LOOKUP_NGRAM})",
    )
    p.add_argument(
        "--draft-max",
        type=int,
        default=None,
        metavar="K",
        help=f"most tokens drafted at once (default: {DEFAULT_DRAFT_MAX})",
    )
    p.add_argument(
        "--draft",
        type=model_ref,
        default=None,
        metavar="REF",
        help="draft with this smaller model of the same vocabulary instead of prompt lookup",
    )


def lookup_from_args(args: argparse.Namespace):
    """The engine's LookupParams from the options above, or None for ``--no-lookup``."""
    from llamalab.generation.params import LookupParams

    sizes = {}
    for flag, attr, name in (
        ("--lookup-ngram", "lookup_ngram", "ngram"),
        ("--draft-max", "draft_max", "draft_max"),
    ):
        value = getattr(args, attr)
        if value is not None:
            try:
                LookupParams(**{name: value})
            except LlamalabError as exc:
                raise LlamalabError(f"{flag}: {exc}") from None
            sizes[name] = value
    if args.lookup is False:
        if sizes or getattr(args, "draft", None) is not None:
            raise LlamalabError(
                "--lookup-ngram, --draft-max and --draft need speculation: drop --no-lookup"
            )
        return None
    return LookupParams(**sizes)


def draft_from_args(args: argparse.Namespace, lookup) -> tuple:
    """``(draft model, its tokenizer)`` for ``--draft REF`` where speculation is on
    (``lookup`` not None), else ``(None, None)``."""
    if args.draft is None or lookup is None:
        return None, None
    from llamalab.runtime import load_runtime

    return load_runtime(args.draft, args.dtype, device=args.device)


def add_lora_option(p: argparse.ArgumentParser) -> None:
    """``--lora PATH[:SCALE]`` (repeatable): LoRA adapters run on top of the model, unmerged."""
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="run with this LoRA adapter (a PEFT folder or a GGUF adapter, as `llamalab "
        "finetune` writes), "
        "its update times SCALE (default 1); repeatable; runs the model here, never on a server",
    )


def lora_from_args(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``[(path, scale), ...]`` of ``--lora``, each checked to name an adapter folder."""
    adapters = []
    for text in getattr(args, "lora", None) or []:
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head and not os.path.exists(text):
            try:
                scale = float(tail)
            except ValueError:
                raise LlamalabError(
                    f"--lora {text}: SCALE must be a number, got {tail!r}"
                ) from None
            path = head
            if not math.isfinite(scale):
                raise LlamalabError(f"--lora {text}: SCALE must be finite, got {tail!r}")
        if not os.path.exists(path):
            raise LlamalabError(f"--lora {path}: no such file or folder")
        from llamalab.checkpoint.lora_files import check_adapter_path

        check_adapter_path(path)  # a PEFT folder or a GGUF adapter, before any model loads
        adapters.append((path, scale))
    return adapters


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text: str) -> int:
    """An argparse type: a number of threads or processes, 1 to :func:`max_threads`."""
    value = positive_int(text)
    limit = max_threads()
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"at most {limit} ({THREADS_PER_CPU} per CPU, {os.cpu_count() or 1} CPUs here), "
            f"got {value}"
        )
    return value


MAX_SEED = 2**64 - 1


def seed_int(text: str) -> int:
    """An argparse type: a seed in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# A prompt must fit the context: 128K tokens are about half a megabyte of English text.
# The bound keeps `cat /dev/zero | llamalab generate` from taking all memory.
MAX_PROMPT_BYTES = 16 << 20


def read_text_stdin(what: str = "prompt", limit: int = MAX_PROMPT_BYTES) -> str:
    """All of stdin as text, at most ``limit`` bytes; bytes that are not UTF-8 are an error."""
    import sys

    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise LlamalabError(f"the {what} on stdin is longer than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlamalabError(
            f"the {what} on stdin is not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None


def read_text_file(path: str, what: str = "prompt", limit: int = MAX_PROMPT_BYTES) -> str:
    """A user's text file (``--prompt-file``): a regular file of at most ``limit`` UTF-8 bytes.

    A FIFO, a device or a folder is refused with what it is (never read: a FIFO would
    wait forever and ``/dev/zero`` never ends); a byte-order mark opening it is dropped.
    """
    from llamalab.files import read_text_bounded

    return read_text_bounded(path, limit, what)


def check_text_argument(text: str, what: str) -> str:
    """Command-line text with bytes that are not UTF-8 (surrogate escapes) is refused, not crashed on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        shown = f"byte {bad - 0xDC00:#04x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
        raise LlamalabError(
            f"the {what} is not valid UTF-8 ({shown} at position {exc.start})"
        ) from None
    return text
