"""``llamalab sign``: sign a checkpoint with a private key, as model-signing does."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Sign a file or folder with an elliptic-curve private key (PEM), making the Sigstore "
    "bundle that the model-signing package (OpenSSF model-transparency) writes and verifies "
    "offline: `model_signing verify key PATH --signature SIG --public_key KEY` and "
    "`llamalab verify PATH --signature SIG --public-key KEY` both check it. Needs "
    "`pip install 'llamalab[sign]'`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the file or folder to sign")
    p.add_argument("--private-key", required=True, metavar="KEY", help="private key (PEM)")
    p.add_argument(
        "--signature",
        metavar="OUT",
        help="where to write the signature (default: FOLDER/model.sig, or FILE.sig); "
        "never overwritten",
    )


def run(args: argparse.Namespace) -> int:
    from llamalab.checkpoint.verify import sign

    out = sign(args.path, args.private_key, args.signature)
    print(f"wrote {out}", file=sys.stderr)
    return 0
