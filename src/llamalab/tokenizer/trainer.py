"""Train a SentencePiece tokenizer with the LLaMA paper's settings (§2.1).

The settings are those of Meta's LLaMA ``tokenizer.model`` (read from its trainer and
normalizer specs): byte-pair encoding, numbers split into single digits, unknown UTF-8
falling back to byte pieces, no Unicode normalisation (``identity``), whitespace kept as
it is (``remove_extra_whitespaces`` off) with SentencePiece's dummy-prefix space on, and
ids ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no padding piece.

Input is streamed to the trainer line by line with bounded reads (see `iter_sentences`);
the trainer samples at most ``max_sentences`` of the lines.

The output folder holds ``tokenizer.model`` (what `load_tokenizer`, the GGUF writer
and llama.cpp read), ``tokenizer_config.json`` (BOS added by default, as LLaMA does) and
``training.json`` (the settings and the inputs' sizes and hashes, so a tokenizer can be
traced back to its text).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.files import file_sha256, open_regular, refuse_special

# Meta's LLaMA trainer spec, the fields that shape the vocabulary. Everything else is
# either a default or about speed (threads, sentence sampling).
LLAMA_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "split_digits": True,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "treat_whitespace_as_suffix": False,
    "character_coverage": 0.99995,
    "max_sentence_length": 4192,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
}
# Byte fallback needs the 256 byte pieces plus the three specials, and merges on top.
MIN_VOCAB_SIZE = 256 + 3 + 1
MAX_VOCAB_SIZE = 1 << 20
# The trainer loads the sentences it samples into memory: cap how many it takes.
DEFAULT_MAX_SENTENCES = 5_000_000
MAX_SENTENCES = 1_000_000_000  # a billion lines would already take far more memory than most have
MAX_SEED = 2**32 - 1  # SentencePiece's generator takes an unsigned 32-bit seed
MAX_THREADS = 1024  # SentencePiece refuses more
TRAINING_RECORD = "training.json"


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Regular files named by ``inputs`` (files, or folders searched recursively), sorted.

    Hidden files and folders (names starting with ``.``) inside a folder are skipped, and
    so is anything in a folder that is not a regular file (a FIFO, a socket). Named
    directly, such a path is refused with what it is: reading a FIFO would wait forever,
    and a device such as ``/dev/zero`` never ends.
    """
    files: list[Path] = []
    for ref in inputs:
        path = Path(ref)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LlamalabError(f"{path}: folder holds no files")
            files.extend(found)
        else:
            refuse_special(path)  # a FIFO or a device: say which
            raise LlamalabError(f"{path}: no such file or folder")
    if not files:
        raise LlamalabError("no input files given")
    return files


class _Sentences:
    """The training sentences of ``files`` (see :func:`iter_sentences`), counted as they go.

    The counts let a failed training say how much text there was, in llamalab's words
    rather than in SentencePiece's internal checks.
    """

    def __init__(self, files: Sequence[Path], max_chars: int) -> None:
        self.files = list(files)
        self.max_chars = max_chars
        self.lines = 0  # non-empty lines handed to the trainer
        self.skipped = 0  # lines over max_chars

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            with open_regular(path) as raw:
                # utf-8-sig: a byte-order mark opening a file is no part of its first line.
                f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
                while line := f.readline(self.max_chars + 1):
                    if len(line) > self.max_chars and not line.endswith("\n"):
                        self.skipped += 1
                        while (rest := f.readline(self.max_chars)) and not rest.endswith("\n"):
                            pass  # the rest of an overlong line
                        continue
                    line = line.rstrip("\r\n")
                    self.lines += bool(line)
                    yield line


def iter_sentences(files: Iterable[Path], max_chars: int) -> Iterator[str]:
    """Every line of ``files``, without its line break; overlong lines are skipped.

    Lines are read with a bound, so a file without line breaks never enters memory
    whole; the trainer skips lines over ``max_sentence_length`` bytes anyway. Bytes that
    are not UTF-8 become U+FFFD; a byte-order mark opening a file is dropped.
    """
    return iter(_Sentences(list(files), max_chars))


# SentencePiece's words when the text yields fewer pieces than asked for:
# "Vocabulary size too high (300). Please set it to a value <= 277."
_TOO_FEW_PIECES = re.compile(
    r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)"
)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _training_error(exc: Exception, sentences: _Sentences, vocab_size: int) -> LlamalabError:
    """SentencePiece's failure in one line, about the input wherever the input is the cause."""
    shown = ", ".join(str(f) for f in sentences.files[:3])
    if len(sentences.files) > 3:
        shown += f" and {len(sentences.files) - 3} more files"
    if sentences.lines == 0:
        skipped = (
            f" ({_count(sentences.skipped, 'line')} longer than {sentences.max_chars} "
            "characters skipped)"
            if sentences.skipped
            else ""
        )
        return LlamalabError(f"the training text in {shown} is empty{skipped}")
    most = _TOO_FEW_PIECES.search(str(exc))
    if most:
        give = "gives" if sentences.lines == 1 else "give"
        return LlamalabError(
            f"too little text: {_count(sentences.lines, 'line')} in {shown} {give} at most "
            f"{most.group(1)} pieces, "
            f"fewer than --vocab-size {vocab_size}; give more text or a smaller --vocab-size"
        )
    text = str(exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    return LlamalabError(f"SentencePiece could not train on {shown}: {detail}")


def _check_output(output: Path) -> None:
    """Refuse an output folder that holds anything but a previous tokenizer training."""
    if output.exists() and not output.is_dir():
        raise LlamalabError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / TRAINING_RECORD).is_file():
        raise LlamalabError(
            f"{output}: folder is not empty and is not a previous `llamalab tokenizer train` "
            "output; choose a new or empty folder (nothing was overwritten)"
        )


def train_tokenizer(
    inputs: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    output: str | os.PathLike[str],
    *,
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = False,
) -> Path:
    """Train a LLaMA-style SentencePiece BPE tokenizer; return the ``tokenizer.model`` path.

    Args:
        inputs: text files or folders of them; every line is one training sentence, and
            lines longer than 4192 bytes are skipped (as Meta's settings say).
        vocab_size: pieces in the vocabulary, the three specials and 256 bytes included.
        output: folder for ``tokenizer.model``; created, or a previous output replaced.
        max_sentences: at most this many lines are sampled (uniformly) for training.
        seed: sampling seed: equal inputs and seed give an identical model.
        threads: training threads (default: every CPU).
        verbose: show SentencePiece's own log.
    """
    import sentencepiece as spm

    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise LlamalabError(
            f"--vocab-size must be from {MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE}, got {vocab_size}"
        )
    if not isinstance(max_sentences, int) or not 1 <= max_sentences <= MAX_SENTENCES:
        raise LlamalabError(
            f"--max-sentences must be from 1 to {MAX_SENTENCES}, got {max_sentences}"
        )
    if not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise LlamalabError(f"--seed must be from 0 to {MAX_SEED} (2**32 - 1), got {seed}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise LlamalabError(f"--threads must be from 1 to {MAX_THREADS}, got {threads}")
    output = Path(output)
    _check_output(output)
    files = expand_inputs(inputs)
    sentences = _Sentences(files, LLAMA_SETTINGS["max_sentence_length"])
    output.mkdir(parents=True, exist_ok=True)
    settings = {
        **LLAMA_SETTINGS,
        "vocab_size": vocab_size,
        "input_sentence_size": max_sentences,
        "shuffle_input_sentence": True,
        "seed_sentencepiece_size": 1_000_000,
    }
    # Files are written beside the destination and renamed over it at the end, so an
    # interrupted run never leaves a half-written tokenizer.model.
    with tempfile.TemporaryDirectory(dir=output, prefix=".tmp-") as tmp:
        prefix = Path(tmp) / "tokenizer"
        # The seed lives in the library, not in the trainer spec.
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(prefix),
                num_threads=threads or min(os.cpu_count() or 1, MAX_THREADS),
                minloglevel=0 if verbose else 2,
                **settings,
            )
        except (RuntimeError, OSError, ValueError) as exc:
            raise _training_error(exc, sentences, vocab_size) from None
        record = {
            "settings": settings,
            "seed": seed,
            "inputs": [
                {"path": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files
            ],
            "tokenizer_sha256": file_sha256(prefix.with_suffix(".model")),
        }
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "clean_up_tokenization_spaces": False,
        }
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (Path(tmp) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(prefix.with_suffix(".model"), output / "tokenizer.model")
        os.replace(Path(tmp) / "tokenizer_config.json", output / "tokenizer_config.json")
        # The record goes last: its presence marks a whole output.
        os.replace(Path(tmp) / TRAINING_RECORD, output / TRAINING_RECORD)
        stale = output / "tokenizer.vocab"
        if stale.exists():
            stale.unlink()
        shutil.move(prefix.with_suffix(".vocab"), stale)
    return output / "tokenizer.model"
