"""``llamalab verify``: check a checkpoint's files against its checksum lists and its structure."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = (
    "Check a checkpoint (or any file or folder). The structure is always checked: every "
    "tensor lies inside its file, the shapes agree with the config, an HF index names only "
    "shards that exist. Files are checked against the checksum lists found: a Meta folder's "
    "checklist.chk (md5), a SHA256SUMS inside a folder or beside a file, FILE.sha256 beside a "
    "file, all in the format coreutils' sha256sum/md5sum write; --sums names a list to use "
    "instead. --tensors prints the sha256 of every tensor's stored bytes (as llama.cpp's "
    "gguf-hash does) on stdout, to compare two checkpoints tensor by tensor. The verdict goes "
    "to stderr; the exit status is non-zero on any failure."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint file or folder (or any file or folder)")
    p.add_argument(
        "--sums", metavar="FILE", help="a sha256sum/md5sum list to check against instead"
    )
    p.add_argument(
        "--tensors",
        action="store_true",
        help="print '<sha256>  <tensor>' for every tensor's stored bytes",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument(
        "--signature",
        metavar="FILE",
        help="a model-signing signature to check (needs --public-key)",
    )
    p.add_argument("--public-key", metavar="KEY", help="the signer's public key (PEM)")


def _tensor_label(report, digest) -> str:
    # Tensor names are unique in a GGUF or HF checkpoint; a Meta folder's shards repeat them.
    if report.kind == "meta" and len({t.file for t in report.tensors}) > 1:
        return f"{digest.file.name}:{digest.name}"
    return digest.name


def run(args: argparse.Namespace) -> int:
    from llamalab.checkpoint.verify import verify, verify_signature
    from llamalab.errors import LlamalabError

    if (args.signature is None) != (args.public_key is None):
        raise LlamalabError("--signature and --public-key go together")
    progress = sys.stderr.isatty() and not args.json

    def show(check) -> None:
        if not args.json:
            verdict = "OK" if check.ok else f"FAILED ({check.problem})"
            print(f"{check.name}: {verdict}", file=sys.stderr)

    def show_structure(structure) -> None:
        if not args.json:
            print(f"structure: OK ({structure.kind}: {structure.summary})", file=sys.stderr)

    try:
        report = verify(
            args.path,
            sums=args.sums,
            tensors=args.tensors,
            progress=progress,
            on_file=show,
            on_structure=show_structure,
        )
    except LlamalabError as exc:
        if not args.json:
            raise
        print(json.dumps({"path": args.path, "ok": False, "problems": [str(exc)]}, indent=2))
        return 1
    if args.signature is not None:
        try:
            report.signature = verify_signature(args.path, args.signature, args.public_key)
        except LlamalabError as exc:
            report.problems.append(str(exc))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else 1
    for digest in report.tensors:
        print(f"{digest.sha256}  {_tensor_label(report, digest)}")
    err = sys.stderr
    if report.signature:
        print(f"signature: OK ({report.signature})", file=err)
    if report.unlisted and report.files:
        shown = ", ".join(report.unlisted[:5]) + (" ..." if len(report.unlisted) > 5 else "")
        print(f"not in any checksum list: {shown}", file=err)
    if not report.ok:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise LlamalabError(f"{args.path}: verification failed: {first}{more}")
    if not report.files:
        print(
            "no checksum list found (SHA256SUMS, checklist.chk, FILE.sha256): "
            "only the structure was checked",
            file=err,
        )
    else:
        print(f"{args.path}: OK ({len(report.files)} checksum(s) match)", file=err)
    return 0
