"""``llamalab generate``: continue one prompt, streaming the text (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from llamalab.cli.distributed import add_distributed_options
from llamalab.cli.options import (
    add_lookup_options,
    add_lora_option,
    add_runtime_options,
    add_sampling_options,
    check_text_argument,
    context_in_use,
    draft_from_args,
    grammar_from_args,
    load_runtime_from_args,
    lookup_from_args,
    lora_from_args,
    read_text_file,
    read_text_stdin,
    sampling_from_args,
)
from llamalab.cli.resident import add_server_options
from llamalab.errors import LlamalabError

DESCRIPTION = (
    "Generate text from PROMPT (or stdin), streaming it to stdout. Special tokens written in "
    "the prompt are parsed."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompt_arg", nargs="?", default=None, metavar="PROMPT", help="the prompt (default: stdin)"
    )
    p.add_argument("-p", "--prompt", default=None, help="the prompt, as an option (llama.cpp's -p)")
    p.add_argument(
        "-f",
        "--prompt-file",
        default=None,
        metavar="FILE",
        help="read the prompt from a UTF-8 text file (llama.cpp's -f)",
    )
    add_runtime_options(p)
    add_sampling_options(p)
    add_lookup_options(p)
    add_lora_option(p)
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop at this text (repeatable; never printed)",
    )
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="report each token's logprob and K alternatives (with --json)",
    )
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming text"
    )
    add_server_options(p)
    add_distributed_options(p)


def check_arguments(args: argparse.Namespace) -> None:
    """Options that only mean something together with another one are refused alone."""
    given = [args.prompt_arg is not None, args.prompt is not None, args.prompt_file is not None]
    if sum(given) > 1:
        raise LlamalabError(
            "give the prompt once: as an argument, with -p or with --prompt-file, not several"
        )
    if args.system is not None and not args.chat:
        raise LlamalabError("--system needs --chat (a system message only exists in a chat)")
    if args.logprobs is not None and not args.json:
        raise LlamalabError("--logprobs needs --json (logprobs are reported in the JSON object)")
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        raise LlamalabError(f"--logprobs must be between 0 and 20, got {args.logprobs}")


def _read_prompt(args: argparse.Namespace) -> str:
    prompt = args.prompt if args.prompt is not None else args.prompt_arg
    if prompt is not None:
        return check_text_argument(prompt, "prompt")
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file)
    if sys.stdin.isatty():
        raise LlamalabError("no prompt: pass it as an argument or on stdin")
    return read_text_stdin("prompt")


def run(args: argparse.Namespace) -> int:
    from llamalab.cli.resident import find_server

    # Everything about the command line is checked before the slow load.
    check_arguments(args)
    sampling = sampling_from_args(args)
    lookup = lookup_from_args(args)
    stops = [check_text_argument(stop, "--stop text") for stop in args.stop]
    adapters = lora_from_args(args)
    server = find_server(args)
    if server is not None:
        # A resident model answers: nothing here loads it, nor imports torch.
        return _run_on_server(server, args, sampling, stops)
    return _run_here(args, sampling, stops, lookup, adapters)


def _run_here(
    args: argparse.Namespace, sampling, stops: list[str], lookup=None, adapters=()
) -> int:
    from llamalab.startup import import_torch_in_background

    import_torch_in_background()  # first: the imports below overlap it
    from llamalab.generation.chat import build_messages
    from llamalab.kernels import isa_in_use

    grammar = grammar_from_args(args)
    prompt = _read_prompt(args)
    model, tokenizer = load_runtime_from_args(args)
    if adapters:
        from llamalab.train.lora import load_peft_adapters

        load_peft_adapters(model, adapters)
    from llamalab.generation import Engine, Request

    if args.chat:
        prompt_ids = tokenizer.encode_chat(build_messages(prompt, args.system))
    else:
        prompt_ids = tokenizer.encode(prompt, special=True)
    draft, draft_tokenizer = draft_from_args(args, lookup)
    engine = Engine(
        model,
        tokenizer,
        max_seq_len=context_in_use(len(prompt_ids), args.max_tokens, args.ctx),
        progress=sys.stderr.isatty(),
        draft=draft,
        draft_tokenizer=draft_tokenizer,
    )
    request = Request(
        prompt_ids,
        max_tokens=args.max_tokens,
        sampling=sampling,
        stop=stops,
        logprobs=args.logprobs,
        grammar=grammar,
        lookup=lookup,
    )

    seq, first = engine.submit(request)
    events = [first]
    if not args.json:
        sys.stdout.write(first.text)
        sys.stdout.flush()
    try:
        while not seq.finished:
            for _, event in engine.step():
                events.append(event)
                if not args.json:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
    finally:
        engine.cancel(seq)
    failed = events[-1]
    if failed.finish_reason == "error":
        raise LlamalabError(
            f"generation failed: {getattr(failed, 'error', None) or 'unknown error'}"
        )
    if args.json:
        out = {
            "prompt_ids": prompt_ids,
            "ids": seq.ids,
            "text": seq.text,
            "finish_reason": seq.finish_reason,
            "timing": {**seq.timing.as_dict(), "isa": isa_in_use(model)},
        }
        if args.logprobs is not None:
            out["logprobs"] = [
                {
                    "id": e.token_id,
                    "token": tokenizer.token_text(e.token_id),
                    "logprob": e.logprob,
                    "top_logprobs": [
                        {"id": i, "token": tokenizer.token_text(i), "logprob": lp}
                        for i, lp in e.top_logprobs or []
                    ],
                }
                for e in events
                if e.token_id is not None
            ]
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        timing = seq.timing.as_dict()
        if sys.stderr.isatty():
            print(
                f"[{timing['prompt_tokens']} prompt tokens, "
                f"{timing['prefill_tokens_per_s']:.1f} tok/s prefill, "
                f"{timing['decode_tokens_per_s']:.1f} tok/s decode, finish: {seq.finish_reason}]",
                file=sys.stderr,
            )
    return 0


def _run_on_server(server, args: argparse.Namespace, sampling, stops: list[str]) -> int:
    """``run`` through a resident server: the same reply, output and errors."""
    from llamalab.cli.resident import Stream, grammar_error, read_grammar, request_body
    from llamalab.generation.chat import build_messages

    grammar = read_grammar(args)
    prompt = _read_prompt(args)
    body = request_body(args, sampling, grammar, stops)
    if args.chat:
        body["messages"] = build_messages(prompt, args.system)
    else:
        body["prompt"] = prompt
    if args.logprobs is not None:
        body["logprobs"] = args.logprobs
    try:
        stream = Stream(server, body)
    except LlamalabError as exc:
        raise grammar_error(exc, args) from None
    try:
        for text in stream:
            if not args.json:
                sys.stdout.write(text)
                sys.stdout.flush()
    finally:
        stream.close()
    final = stream.final
    if final is None:
        raise LlamalabError(f"the server at {server.url} ended the reply without its summary")
    timing = stream.timing()
    if args.json:
        out = {
            "prompt_ids": stream.prompt_ids,
            "ids": final["ids"],
            "text": final["text"],
            "finish_reason": final["finish_reason"],
            "timing": timing,
        }
        if args.logprobs is not None:
            out["logprobs"] = stream.logprobs()
        out["server"] = server.url
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        if sys.stderr.isatty():
            print(
                f"[{timing['prompt_tokens']} prompt tokens, "
                f"{timing['prefill_tokens_per_s']:.1f} tok/s prefill, "
                f"{timing['decode_tokens_per_s']:.1f} tok/s decode, "
                f"finish: {final['finish_reason']}, served by {server.url}]",
                file=sys.stderr,
            )
    return 0
