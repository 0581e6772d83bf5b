"""Perplexity with sliding windows, and bits per byte.

Each document (a file) is scored on its own, starting from the document-start token (BOS,
else EOS), so every token of its text is predicted and bits per byte covers every byte.
The first window scores its whole length; each later window ends ``stride`` tokens
further and scores only those new tokens, with the ``window - stride`` tokens before
them as context (Hugging Face's sliding-window recipe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llamalab.errors import LlamalabError
from llamalab.eval.tasks.jsonl import read_file_bounded
from llamalab.files import not_regular_message

MAX_DOCUMENTS = 10_000


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over tokens 0..n_tokens.

    The window's input is ``tokens[begin:end]`` (at most ``window`` tokens); it scores the
    predictions of ``tokens[first_scored:end]``. The first window scores every token it
    can (token 0, the document start, is never predicted); each later one scores the
    next ``stride`` tokens, with the ``window - stride`` tokens before them as context,
    so the stride must be smaller than the window.
    """
    if window < 2:
        raise LlamalabError(f"the window must hold at least 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise LlamalabError(
            f"the stride must be 1 to {window - 1} (less than the window), got {stride}"
        )
    if n_tokens < 2:
        return []
    end = min(window, n_tokens)
    out = [(0, end, 1)]
    while end < n_tokens:
        first, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - window), end, first))
    return out


@dataclass
class PerplexityResult:
    """Totals over every document: negative log-likelihood (nats), tokens and bytes scored."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    windows: int = 0
    documents: int = 0

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood per token)."""
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """Negative log-likelihood in bits per UTF-8 byte of the text."""
        return self.nll / (math.log(2) * self.bytes) if self.bytes else math.nan


def document_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, folders expanded to the regular files under them (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise LlamalabError(f"{p}: the folder holds no files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            # Say what is there: a FIFO, a device or a socket exists but holds no document.
            try:
                mode = os.stat(p).st_mode
            except FileNotFoundError:
                raise LlamalabError(f"{p}: no such file or folder") from None
            except OSError as exc:
                raise LlamalabError(f"{p}: cannot read: {exc.strerror or exc}") from None
            raise LlamalabError(not_regular_message(p, mode, "folder"))
        if len(files) > MAX_DOCUMENTS:
            raise LlamalabError(f"more than {MAX_DOCUMENTS} documents")
    if not files:
        raise LlamalabError("perplexity needs --data FILE_OR_DIR")
    return files


def read_document(path: Path) -> str:
    """A document's text (UTF-8; anything else is an error naming the file)."""
    data = read_file_bounded(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LlamalabError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def document_tokens(tokenizer, text: str) -> list[int]:
    """The ids a document is scored on: the document-start token, then its text."""
    from llamalab.eval.likelihood import document_start

    return [document_start(tokenizer), *tokenizer.encode(text, add_bos=False, special=False)]


def score_document(scorer, tokens: list[int], window: int, stride: int, result: PerplexityResult):
    """Add one document's windows to ``result`` (``scorer``: a LikelihoodScorer)."""
    for begin, end, first in windows(len(tokens), window, stride):
        logprobs = scorer.token_logprobs(tokens[begin:end])  # predictions of begin+1..end
        result.nll -= float(logprobs[first - begin - 1 :].sum())
        result.tokens += end - first
        result.windows += 1
