"""`llamalab generate` and `llamalab chat`: thin drivers of the generation engine."""

from __future__ import annotations

import argparse
import json
import sys

from llamalab.errors import LlamalabError


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    from llamalab.generation.sampling import SamplingParams

    d = SamplingParams()
    p.add_argument("--model", default=None, help="GGUF file, Hugging Face or Meta folder (default: $LLAMALAB_MODEL or SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 = off (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=d.min_p, help="0 = off (default: %(default)s)")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help="1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens, prompt and reply together (default: %(default)s)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32"],
        help="auto: the fastest form the kernels allow; float32: dequantize everything (reference maths)",
    )


def _sampling(args: argparse.Namespace):
    from llamalab.generation.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise LlamalabError("no prompt: pass it as an argument or on stdin")
    return sys.stdin.read()


def run_generate(args: argparse.Namespace) -> int:
    from llamalab.generation import Engine, Request
    from llamalab.generation.chat import build_messages
    from llamalab.runtime import load_runtime

    sampling = _sampling(args)  # validate before the slow load
    prompt = _read_prompt(args)
    model, tokenizer = load_runtime(args.model, args.dtype)
    if args.chat:
        prompt_ids = tokenizer.encode_chat(build_messages(prompt, args.system))
    else:
        prompt_ids = tokenizer.encode(prompt, special=True)
    engine = Engine(model, tokenizer, max_seq_len=args.ctx, progress=sys.stderr.isatty())
    request = Request(prompt_ids, max_tokens=args.max_tokens, sampling=sampling, stop=args.stop, logprobs=args.logprobs)

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
    if args.json:
        out = {
            "prompt_ids": prompt_ids,
            "ids": seq.ids,
            "text": seq.text,
            "finish_reason": seq.finish_reason,
            "timing": seq.timing.as_dict(),
        }
        if args.logprobs is not None:
            out["logprobs"] = [
                {
                    "id": e.token_id,
                    "token": tokenizer.token_bytes(e.token_id).decode("utf-8", "replace"),
                    "logprob": e.logprob,
                    "top_logprobs": [{"id": i, "logprob": lp} for i, lp in e.top_logprobs or []],
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
                f"[{timing['prompt_tokens']} prompt tokens, {timing['prefill_tokens_per_s']:.1f} tok/s prefill, "
                f"{timing['decode_tokens_per_s']:.1f} tok/s decode, finish: {seq.finish_reason}]",
                file=sys.stderr,
            )
    return 0


CHAT_HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply."


def run_chat(args: argparse.Namespace) -> int:
    from llamalab.generation import Engine, Request
    from llamalab.runtime import load_runtime

    sampling = _sampling(args)
    model, tokenizer = load_runtime(args.model, args.dtype)
    if tokenizer.chat_template is None:
        raise LlamalabError("this model has no chat template; use `llamalab generate` instead")
    # One cache row, kept between turns: each turn prefills only the new messages.
    engine = Engine(model, tokenizer, max_seq_len=args.ctx, progress=sys.stderr.isatty())
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=sys.stderr)
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids = tokenizer.encode_chat(system + history)
            request = Request(prompt_ids, max_tokens=args.max_tokens, sampling=sampling)
            reply = _stream_reply(engine, request)
        except LlamalabError as exc:
            history.pop()
            print(f"llamalab: error: {exc}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _stream_reply(engine, request) -> str:
    seq = None
    try:
        seq, event = engine.submit(request)
        sys.stdout.write(event.text)
        sys.stdout.flush()
        while not seq.finished:
            for _, event in engine.step():
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    finally:
        if seq is not None:
            engine.cancel(seq)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return seq.text if seq is not None else ""
