"""A held-out fine-tuning task from real text: Debian changelog entries to JSON.

Every ``changelog.Debian.gz`` under a documentation folder (``/usr/share/doc`` on Debian
and Ubuntu) is a list of entries, each a header line, the changes and a trailer line::

    bash (5.2.15-2) unstable; urgency=medium

      * Remove one more pdf file without source.

     -- Matthias Klose <doko@debian.org>  Mon, 02 Jan 2023 13:06:21 +0100

One item gives the model one entry, as the file has it, in a user turn and asks for a
JSON object with the entry's package, version, distribution and urgency; the assistant
turn is that object, compact, keys in that order::

    {"package":"bash","version":"5.2.15-2","distribution":"unstable","urgency":"medium"}

The fields are read as ``dpkg-parsechangelog`` reads them (Debian policy 4.4): the
distributions space-separated as written, the urgency's first word in lower case.

``build`` splits the packages between train and test (seeded) and writes ``train.jsonl``
and ``test.jsonl`` in chat format (``llamalab finetune`` reads them as they are). Packages
that share a changelog file, or whose names occur in one file, fall on the same side, so
no test entry's package was seen in training. ``score`` generates greedily through
llamalab for the test items (with ``--lora`` adapters if given) and reports the exact
match of the parsed reply against the truth::

    python scripts/changelog_task.py build --out data/changelog
    python scripts/changelog_task.py score data/changelog/test.jsonl --lora runs/changelog/adapter
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("package", "version", "distribution", "urgency")
INSTRUCTION = (
    "Read this Debian changelog entry and reply with only a JSON object holding its "
    "package, version, distribution and urgency.\n\n"
)
# Debian policy 5.6.1's header and trailer lines (the forms dpkg's parser accepts).
_NAME = r"[-+0-9a-z.]"
HEADER = re.compile(rf"^(\w{_NAME}*) \(([^() \t]+)\)((?:\s+{_NAME}+)+);(.*?)\s*$", re.IGNORECASE)
TRAILER = re.compile(
    r"^ -- (.*) <(.*)>(  ?)((\w+,\s*)?\d{1,2}\s+\w+\s+\d{4}\s+\d{1,2}:\d\d:\d\d\s+[-+]\d{4})\s*$"
)
# Larger than any real changelog (gcc's is about 1 MB unpacked): a bigger file is refused
# rather than read, so a hostile gzip bomb cannot fill the memory.
MAX_CHANGELOG_BYTES = 32 << 20


class TaskError(Exception):
    """A problem with the input or the arguments, printed as one line."""


@dataclass(frozen=True)
class Entry:
    """One changelog entry: its text as the file has it and the four fields."""

    text: str
    package: str
    version: str
    distribution: str
    urgency: str

    def truth(self) -> dict[str, str]:
        """The answer, keys in :data:`FIELDS` order."""
        return {f: getattr(self, f) for f in FIELDS}


def answer_text(truth: dict[str, str]) -> str:
    """The assistant's reply: the object as compact JSON, keys in :data:`FIELDS` order."""
    return json.dumps({f: truth[f] for f in FIELDS}, ensure_ascii=False, separators=(",", ":"))


def parse_header(line: str) -> dict[str, str] | None:
    """The fields of an entry's header line, or ``None`` when it is not one (or has no urgency)."""
    m = HEADER.match(line)
    if m is None:
        return None
    urgency = None
    for option in re.split(r"\s*,\s*", m.group(4).strip()):
        key, sep, value = option.partition("=")
        if sep and key.strip().lower() == "urgency" and value.strip():
            # "urgency=low (HIGH for the hurd)": the level is the first word.
            urgency = value.split()[0].lower()
    if urgency is None:
        return None
    return {
        "package": m.group(1),
        "version": m.group(2),
        "distribution": " ".join(m.group(3).split()),
        "urgency": urgency,
    }


def parse_entries(text: str) -> list[Entry]:
    """Every complete entry of a changelog, newest first, as the file has them.

    An entry runs from its header line through its trailer line; lines outside one
    (an old changelog's free-form tail, "Local variables:") are skipped, and so is a
    header whose trailer is missing or malformed.
    """
    entries: list[Entry] = []
    lines: list[str] | None = None
    fields: dict[str, str] | None = None
    for line in text.splitlines():
        header = parse_header(line)
        if header is not None:
            lines, fields = [line], header
            continue
        if lines is None:
            continue
        lines.append(line)
        if line.startswith(" --"):
            if TRAILER.match(line) and fields is not None:
                entries.append(Entry(text="\n".join(lines), **fields))
            lines = fields = None
    return entries


def read_changelog(path: Path) -> str:
    """A gzip changelog's text (UTF-8); :class:`TaskError` for a bad or oversized file."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_CHANGELOG_BYTES + 1)
    except (OSError, EOFError) as exc:
        raise TaskError(f"{path}: not a readable gzip file ({exc})") from None
    if len(data) > MAX_CHANGELOG_BYTES:
        raise TaskError(f"{path}: more than {MAX_CHANGELOG_BYTES >> 20} MiB unpacked")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def item(entry: Entry) -> dict[str, Any]:
    """One chat item: the entry in a user turn, its JSON in the assistant turn."""
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + entry.text},
            {"role": "assistant", "content": answer_text(entry.truth())},
        ],
        "package": entry.package,
    }


def _groups(files: dict[str, list[Entry]]) -> list[list[str]]:
    """Packages that must fall on the same side: those sharing a changelog file."""
    parent: dict[str, str] = {}

    def find(p: str) -> str:
        while parent.setdefault(p, p) != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for entries in files.values():
        names = [e.package for e in entries]
        for other in names[1:]:
            parent[find(other)] = find(names[0])
        find(names[0])
    groups: dict[str, list[str]] = {}
    for p in parent:
        groups.setdefault(find(p), []).append(p)
    return sorted(sorted(g) for g in groups.values())


def build(
    paths: Iterable[Path],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_chars: int = 600,
    train_per_package: int = 40,
    test_per_package: int = 2,
    test_items: int = 100,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``(train, test, stats)``: items from the changelogs at ``paths``, split by package.

    Entries longer than ``max_chars`` characters are left out, and so are repeats (the
    same entry in several files). Each package gives at most ``train_per_package``
    training items or ``test_per_package`` test items (a seeded choice), so that a long
    changelog does not dominate; at most ``test_items`` test items are kept.
    """
    if not 0 < test_fraction < 1:
        raise TaskError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    for name, value in (
        ("--max-chars", max_chars),
        ("--train-per-package", train_per_package),
        ("--test-per-package", test_per_package),
        ("--test-items", test_items),
    ):
        if value < 1:
            raise TaskError(f"{name} must be at least 1, got {value}")
    files: dict[str, list[Entry]] = {}
    read = skipped = 0
    for path in sorted(set(paths)):
        try:
            text = read_changelog(path)
        except TaskError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            skipped += 1
            continue
        read += 1
        entries = parse_entries(text)
        # Several packages of one source ship the same file: it is read once.
        digest = hashlib.sha256(text.encode()).hexdigest()
        if entries:
            files.setdefault(digest, entries)
    if not files:
        raise TaskError("no changelog entry found: give changelog.Debian.gz files that hold some")
    groups = _groups(files)
    rng = random.Random(seed)
    order = list(range(len(groups)))
    rng.shuffle(order)
    n_test = max(1, round(len(groups) * test_fraction))
    if n_test >= len(groups):
        raise TaskError(f"{len(groups)} package group(s): too few to split into train and test")
    test_packages = {p for i in order[:n_test] for p in groups[i]}

    seen: set[str] = set()
    by_package: dict[str, list[Entry]] = {}
    too_long = 0
    for entries in files.values():
        for e in entries:
            if e.text in seen:
                continue
            seen.add(e.text)
            if len(e.text) > max_chars:
                too_long += 1
                continue
            by_package.setdefault(e.package, []).append(e)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for package in sorted(by_package):
        entries = by_package[package]
        held_out = package in test_packages
        cap = test_per_package if held_out else train_per_package
        chosen = rng.sample(entries, min(cap, len(entries)))
        (test if held_out else train).extend(item(e) for e in chosen)
    rng.shuffle(train)
    rng.shuffle(test)
    test = test[:test_items]
    stats = {
        "files_read": read,
        "files_skipped": skipped,
        "distinct_files": len(files),
        "package_groups": len(groups),
        "test_groups": n_test,
        "entries_too_long": too_long,
        "train_items": len(train),
        "train_packages": len({i["package"] for i in train}),
        "test_items": len(test),
        "test_packages": len({i["package"] for i in test}),
        "seed": seed,
        "max_chars": max_chars,
    }
    return train, test, stats


def write_jsonl(path: Path, items: Sequence[dict[str, Any]]) -> None:
    """Write ``items`` one JSON object a line (UTF-8), through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    tmp.replace(path)


# ------------------------------------------------------------------------------ scoring
def read_test(path: Path) -> list[tuple[list[dict[str, str]], dict[str, str]]]:
    """``(prompt messages, truth)`` of each item of a test file ``build`` wrote."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
            messages = it["messages"]
            truth = json.loads(messages[-1]["content"])
            if messages[-1]["role"] != "assistant" or not isinstance(truth, dict):
                raise ValueError("the last turn is not the assistant's JSON object")
            if set(truth) != set(FIELDS):
                raise ValueError(f"the answer's keys are not {', '.join(FIELDS)}")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise TaskError(f"{path}:{n}: not an item of this task ({exc})") from None
        out.append((messages[:-1], truth))
    if not out:
        raise TaskError(f"{path}: no items")
    return out


def parse_reply(reply: str) -> dict[str, Any] | None:
    """The first JSON object a reply holds, or ``None``.

    Text around the object (a code fence, a sentence before it) is ignored, so a base
    model that answers correctly in its own style still scores.
    """
    decoder = json.JSONDecoder()
    at = reply.find("{")
    while at != -1:
        try:
            value, _ = decoder.raw_decode(reply, at)
        except ValueError:
            at = reply.find("{", at + 1)
            continue
        if isinstance(value, dict):
            return value
        at = reply.find("{", at + 1)
    return None


def score(replies: Sequence[str], truths: Sequence[dict[str, str]]) -> dict[str, Any]:
    """Exact match of each parsed reply against its truth, and each field's accuracy.

    A reply matches when it parses as a JSON object with exactly the four keys and each
    value equal to the truth's (key order and spacing do not count).
    """
    if len(replies) != len(truths):
        raise TaskError(f"{len(replies)} replies for {len(truths)} items")
    n = len(truths)
    parsed = [parse_reply(r) for r in replies]
    exact = sum(p == t for p, t in zip(parsed, truths, strict=True))
    fields = {
        f: sum(p is not None and p.get(f) == t[f] for p, t in zip(parsed, truths, strict=True))
        for f in FIELDS
    }
    return {
        "items": n,
        "exact_match": exact / n if n else 0.0,
        "exact": exact,
        "parsed": sum(p is not None for p in parsed),
        "field_accuracy": {f: c / n if n else 0.0 for f, c in fields.items()},
    }


def generate_replies(
    model_ref: str | None,
    prompts: Sequence[list[dict[str, str]]],
    *,
    adapters: Sequence[tuple[str, float]] = (),
    max_tokens: int = 96,
    batch_size: int = 8,
    threads: int | None = None,
    dtype: str = "auto",
) -> list[str]:
    """Greedy replies of the model (with ``adapters``, unmerged) to chat ``prompts``."""
    from llamalab.generation import Engine, Request
    from llamalab.generation.params import GREEDY
    from llamalab.runtime import load_runtime

    model, tokenizer = load_runtime(model_ref, dtype, threads=threads, progress=False)
    if adapters:
        from llamalab.train.lora import load_peft_adapters

        load_peft_adapters(model, list(adapters))
    encoded = [tokenizer.encode_chat(p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    engine = Engine(model, tokenizer, max_batch=batch_size, max_seq_len=longest + max_tokens)
    replies: list[str] = []
    for at in range(0, len(encoded), batch_size):
        requests = [
            Request(ids, max_tokens=max_tokens, sampling=GREEDY)
            for ids in encoded[at : at + batch_size]
        ]
        for seq in engine.generate_batch(requests):
            if seq.finish_reason == "error":
                raise TaskError(f"generation failed: {seq.text or 'internal error'}")
            replies.append(seq.text)
        print(f"\r{len(replies)}/{len(encoded)} items", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return replies


# ---------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="write train.jsonl and test.jsonl from changelogs")
    b.add_argument("--out", required=True, help="folder for train.jsonl, test.jsonl, stats.json")
    b.add_argument(
        "--docs", default="/usr/share/doc", help="folder of PACKAGE/changelog.Debian.gz files"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--test-fraction", type=float, default=0.2, help="of the package groups")
    b.add_argument("--max-chars", type=int, default=600, help="longest entry kept")
    b.add_argument("--train-per-package", type=int, default=40)
    b.add_argument("--test-per-package", type=int, default=2)
    b.add_argument("--test-items", type=int, default=100)
    s = sub.add_parser("score", help="exact match of greedy replies on a test file")
    s.add_argument("test", type=Path, help="test.jsonl as build wrote it")
    s.add_argument("-m", "--model", default=None, help="checkpoint (default: llamalab's)")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    s.add_argument("--limit", type=int, default=None, help="score the first N items")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-tokens", type=int, default=96)
    s.add_argument("-t", "--threads", type=int, default=None)
    s.add_argument("--dtype", default="auto", choices=("auto", "float32"))
    s.add_argument("--output", type=Path, help="write each item's reply and verdict (JSONL)")
    args = p.parse_args(argv)
    try:
        if args.action == "build":
            out = Path(args.out)
            docs = Path(args.docs)
            if not docs.is_dir():
                raise TaskError(f"--docs {docs}: not a folder")
            paths = [f.resolve() for f in docs.glob("*/changelog.Debian.gz") if f.is_file()]
            train, test, stats = build(
                paths,
                seed=args.seed,
                test_fraction=args.test_fraction,
                max_chars=args.max_chars,
                train_per_package=args.train_per_package,
                test_per_package=args.test_per_package,
                test_items=args.test_items,
            )
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "train.jsonl", train)
            write_jsonl(out / "test.jsonl", test)
            (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
            print(json.dumps(stats))
            return 0
        for name in ("limit", "batch_size", "max_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise TaskError(f"{flag} must be at least 1, got {value}")
        from llamalab.cli.options import lora_from_args

        # The same PATH[:SCALE] reading and checks as `llamalab generate --lora`.
        adapters = lora_from_args(args)
        items = read_test(args.test)[: args.limit]
        started = time.perf_counter()
        replies = generate_replies(
            args.model,
            [m for m, _ in items],
            adapters=adapters,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            threads=args.threads,
            dtype=args.dtype,
        )
        result = score(replies, [t for _, t in items])
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["lora"] = args.lora
        if args.output:
            write_jsonl(
                args.output,
                [
                    {"truth": t, "reply": r, "exact": parse_reply(r) == t}
                    for (_, t), r in zip(items, replies, strict=True)
                ],
            )
        print(json.dumps(result))
        return 0
    except TaskError as exc:
        print(f"changelog_task: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # llamalab's own errors (a bad model or adapter path)
        from llamalab.errors import LlamalabError

        if isinstance(exc, LlamalabError):
            print(f"changelog_task: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
