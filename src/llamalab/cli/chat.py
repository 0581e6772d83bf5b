"""``llamalab chat``: an interactive conversation in the model's chat template.

The REPL keeps the conversation as messages and re-renders it every turn; the engine's
cache row remembers the tokens it already holds, so each turn prefills only what is new.
When the conversation no longer fits the context, the oldest turns are dropped (the
system message stays) and the user is told, as llama.cpp and Ollama do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from llamalab.cli.distributed import add_distributed_options
from llamalab.cli.options import (
    add_lookup_options,
    add_lora_option,
    add_runtime_options,
    add_sampling_options,
    check_text_argument,
    draft_from_args,
    grammar_from_args,
    load_runtime_from_args,
    lookup_from_args,
    lora_from_args,
    sampling_from_args,
)
from llamalab.cli.resident import add_server_options
from llamalab.errors import LlamalabError

DESCRIPTION = (
    "An interactive multi-turn conversation in the model's chat template, with line editing "
    "and history. Type /help for the commands; Ctrl-C interrupts a reply, Ctrl-D leaves."
)

COMMANDS_HELP = """\
/help          this list
/system TEXT   set the system message (/system alone shows it; /system - removes it)
/save FILE     write the conversation to FILE as JSON (never overwrites a file)
/reset         start a new conversation (the system message stays)
/exit, /quit   leave (Ctrl-D too); Ctrl-C stops a reply"""

# The share of the context kept free for the reply when old turns must go: with less,
# a long conversation would leave the model room for only a few words.
REPLY_SHARE = 4
HISTORY_FILE_ENV = "LLAMALAB_HISTORY"
# One message must fit the context with room for a reply: a megabyte is about 250,000
# tokens of English, more than any context llamalab runs.
MAX_MESSAGE_BYTES = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_options(p)
    add_sampling_options(p)
    # The conversation so far is what prompt lookup drafts from.
    add_lookup_options(p)
    p.add_argument("--system", default=None, help="system message")
    add_lora_option(p)
    add_server_options(p)
    add_distributed_options(p)


def _history_file() -> Path | None:
    override = os.environ.get(HISTORY_FILE_ENV)
    if override is not None:
        return Path(override) if override else None  # empty: no history file
    return Path.home() / ".llamalab" / "chat_history"


def _setup_line_editing() -> None:
    """Arrow keys, Ctrl-R and a history kept across sessions, where readline exists."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return
    path = _history_file()
    if path is None:
        return
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    import atexit

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home must not spoil leaving

    atexit.register(save)


class Conversation:
    """The messages of one chat and how they become a prompt that fits the context."""

    def __init__(self, tokenizer, context: int, max_tokens: int, system: str | None) -> None:
        self.tokenizer = tokenizer
        self.context = context
        self.reply_room = min(max_tokens, max(1, context // REPLY_SHARE))
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> tuple[list[int], int]:
        """The prompt for the next reply and how many old messages were dropped to fit it."""
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(self.messages())
            if len(ids) + self.reply_room <= self.context:
                return ids, dropped
            if len(self.turns) <= 1:
                raise LlamalabError(
                    f"the message needs {len(ids)} tokens; with room for a reply the context "
                    f"holds {self.context - self.reply_room} (use a larger --ctx)"
                )
            # Drop the oldest exchange: a user message and the reply to it.
            cut = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1
            del self.turns[:cut]
            dropped += cut

    def save(self, path: Path) -> None:
        try:
            with open(path, "x", encoding="utf-8") as f:  # "x": never overwrite
                json.dump({"messages": self.messages()}, f, ensure_ascii=False, indent=2)
                f.write("\n")
        except FileExistsError:
            raise LlamalabError(f"{path}: already exists; choose another name") from None
        except OSError as exc:
            raise LlamalabError(f"{path}: cannot write: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from llamalab.cli.resident import find_server

    # Ctrl-C stops a reply: take SIGINT even when started from a shell that ignores it
    # (a background job inherits SIG_IGN, and Python then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sampling = sampling_from_args(args)
    lookup = lookup_from_args(args)
    adapters = lora_from_args(args)
    server = find_server(args)
    if server is not None:
        return _run_on_server(server, args, sampling)
    from llamalab.generation import Engine, Request

    grammar = grammar_from_args(args)
    system = check_text_argument(args.system, "system message") if args.system else None
    model, tokenizer = load_runtime_from_args(args)
    if adapters:
        from llamalab.train.lora import load_adapters

        load_adapters(model, adapters)
    if tokenizer.chat_template is None:
        raise LlamalabError("this model has no chat template; use `llamalab generate` instead")
    draft, draft_tokenizer = draft_from_args(args, lookup)
    # One cache row, kept between turns: each turn prefills only the new messages.
    engine = Engine(
        model,
        tokenizer,
        max_seq_len=args.ctx,
        progress=sys.stderr.isatty(),
        draft=draft,
        draft_tokenizer=draft_tokenizer,
    )
    chat = Conversation(tokenizer, engine.max_seq_len, args.max_tokens, system)

    def reply(prompt_ids: list[int]) -> str:
        request = Request(
            prompt_ids,
            max_tokens=args.max_tokens,
            sampling=sampling,
            grammar=grammar,
            lookup=lookup,
        )
        return _stream_reply(engine, request)

    return _talk(args, chat, reply, "")


def _run_on_server(server, args: argparse.Namespace, sampling) -> int:
    """``run`` with a resident server's model: the same conversation, nothing loaded here."""
    from llamalab.cli.resident import grammar_error, read_grammar, request_body

    grammar = read_grammar(args)
    system = check_text_argument(args.system, "system message") if args.system else None
    if not server.info.get("chat_template"):
        raise LlamalabError("this model has no chat template; use `llamalab generate` instead")
    context = min(args.ctx, int(server.info.get("model_context") or args.ctx))
    chat = Conversation(_ServerTokenizer(server), context, args.max_tokens, system)
    body = request_body(args, sampling, grammar)

    def reply(prompt_ids: list[int]) -> str:
        try:
            return _stream_server_reply(server, {**body, "prompt_ids": prompt_ids})
        except LlamalabError as exc:
            raise grammar_error(exc, args) from None

    return _talk(args, chat, reply, f", served by {server.url}")


class _ServerTokenizer:
    """What `Conversation` needs of a tokenizer, asked of the server that holds the model."""

    def __init__(self, server) -> None:
        self.server = server

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.server.tokenize_chat(messages)


def _talk(args: argparse.Namespace, chat: Conversation, reply, where: str) -> int:
    """The conversation loop: read a line, run a command or get a reply, until EOF."""
    _setup_line_editing()
    name = Path(args.model).name if args.model else "the default model"
    print(
        f"llamalab chat with {name} (context {chat.context} tokens{where}). "
        "/help lists the commands.",
        file=sys.stderr,
    )
    while True:
        try:
            line = _read_message("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        try:
            if line is None:
                raise LlamalabError(
                    f"the message is longer than {MAX_MESSAGE_BYTES} bytes; it was skipped"
                )
            line = check_text_argument(line, "message")
            if line.strip().startswith("/"):
                if not _command(line.strip(), chat):
                    return 0
                continue
            if not line.strip():
                continue
            chat.turns.append({"role": "user", "content": line})
            try:
                prompt_ids, dropped = chat.prompt_ids()
            except LlamalabError:
                chat.turns.pop()
                raise
            if dropped:
                print(
                    f"(the context is full: dropped the oldest {dropped} message"
                    f"{'s' if dropped > 1 else ''}; the system message stays)",
                    file=sys.stderr,
                )
            chat.turns.append({"role": "assistant", "content": reply(prompt_ids)})
        except LlamalabError as exc:
            print(f"llamalab: error: {exc}", file=sys.stderr)


def _read_message(prompt: str) -> str | None:
    """One line of the user's; None for a line over MAX_MESSAGE_BYTES (its bytes are skipped).

    A terminal gets input() and its line editing. Piped input is read with a bound:
    input() would hold a line without end (``llamalab chat < /dev/zero``) whole.
    """
    if sys.stdin.isatty():
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    data = sys.stdin.buffer.readline(MAX_MESSAGE_BYTES + 1)
    if not data:
        raise EOFError
    if len(data) > MAX_MESSAGE_BYTES:
        while data and not data.endswith(b"\n"):
            data = sys.stdin.buffer.readline(
                1 << 20
            )  # the rest of the line, a bounded piece at a time
        return None
    # Bytes that are not UTF-8 stay as surrogate escapes for check_text_argument to name.
    return data.decode("utf-8", errors="surrogateescape").rstrip("\r\n")


def _command(line: str, chat: Conversation) -> bool:
    """Carry out a /command; False means leave."""
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name in ("/help", "/?"):
        print(COMMANDS_HELP, file=sys.stderr)
    elif name == "/reset":
        chat.turns.clear()
        print("(conversation reset)", file=sys.stderr)
    elif name == "/system":
        if not rest:
            print(f"(system message: {chat.system!r})", file=sys.stderr)
        else:
            chat.system = None if rest == "-" else rest
            print(
                "(system message set)" if chat.system else "(system message removed)",
                file=sys.stderr,
            )
    elif name == "/save":
        if not rest:
            raise LlamalabError("/save needs a file name")
        chat.save(Path(rest).expanduser())
        print(f"(saved {len(chat.messages())} messages to {rest})", file=sys.stderr)
    else:
        raise LlamalabError(f"unknown command {name}; /help lists the commands")
    return True


def _stream_reply(engine, request) -> str:
    """Stream one reply; mark it when cut off, then print its statistics on stderr."""
    seq = None
    last = None
    interrupted = False
    try:
        seq, last = engine.submit(request)
        sys.stdout.write(last.text)
        sys.stdout.flush()
        while not seq.finished:
            for _, last in engine.step():
                sys.stdout.write(last.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        sys.stdout.write(" [interrupted]")
    finally:
        if seq is not None:
            engine.cancel(seq)
        length = seq is not None and seq.finish_reason == "length" and not interrupted
        _end_line(len(seq.ids) if length and seq is not None else None)
    if seq is None:
        return ""
    if last is not None and last.finish_reason == "error":
        raise LlamalabError(f"the reply failed: {getattr(last, 'error', None) or 'unknown error'}")
    timing = seq.timing.as_dict()
    _print_stats(
        len(seq.ids),
        timing["decode_tokens_per_s"],
        timing["time_to_first_token_s"],
        (timing["accepted_draft_tokens"], timing["draft_tokens"]),
    )
    return seq.text


def _end_line(cut_off_at: int | None) -> None:
    """End a streamed reply's line, marking a reply cut off at ``cut_off_at`` tokens."""
    if cut_off_at is not None:
        sys.stdout.write(f" [cut off at {cut_off_at} tokens: --max-tokens or the context]")
    sys.stdout.write("\n")
    sys.stdout.flush()


def _print_stats(
    tokens: int, rate: float, first_token_s: float, drafts: tuple[int, int] = (0, 0)
) -> None:
    """A reply's statistics on stderr; ``drafts`` is (accepted, drafted) by speculation."""
    accepted, drafted = drafts
    spec = f", {accepted} of {drafted} drafted tokens accepted" if drafted else ""
    print(
        f"[{tokens} tokens, {rate:.1f} tok/s, first token after {first_token_s:.2f} s{spec}]",
        file=sys.stderr,
    )


def _stream_server_reply(server, body: dict) -> str:
    """`_stream_reply` for a server's reply: the same marks and statistics."""
    from llamalab.cli.resident import Stream

    stream = None
    interrupted = False
    texts: list[str] = []
    try:
        stream = Stream(server, body)
        for text in stream:
            texts.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        sys.stdout.write(" [interrupted]")
    finally:
        if stream is not None:
            stream.close()  # the server cancels the generation
        final = stream.final if stream is not None else None
        length = final is not None and final["finish_reason"] == "length" and not interrupted
        _end_line(len(final["ids"]) if length and final is not None else None)
    if stream is None:
        return ""
    timing = stream.timing()
    rate = timing.get("decode_tokens_per_s")
    if rate is None and stream.first_token_s is not None and stream.tokens > 1:
        # Interrupted: no summary came; the rate as seen here.
        elapsed = stream.last_token_at - stream.started - stream.first_token_s
        rate = (stream.tokens - 1) / elapsed if elapsed > 0 else 0.0
    tokens = len(final["ids"]) if final else stream.tokens
    _print_stats(tokens, rate or 0.0, stream.first_token_s or 0.0)
    return final["text"] if final else "".join(texts)
