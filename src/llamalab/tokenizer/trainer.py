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

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.files import file_sha256

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
TRAINING_RECORD = "training.json"


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Regular files named by ``inputs`` (files, or folders searched recursively), sorted.

    Hidden files and folders (names starting with ``.``) inside a folder are skipped.
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
            raise LlamalabError(f"{path}: no such file or folder")
    if not files:
        raise LlamalabError("no input files given")
    return files


def iter_sentences(files: Iterable[Path], max_chars: int) -> Iterator[str]:
    """Every line of ``files``, without its line break; overlong lines are skipped.

    Lines are read with a bound, so a file without line breaks never enters memory
    whole; the trainer skips lines over ``max_sentence_length`` bytes anyway. Bytes that
    are not UTF-8 become U+FFFD.
    """
    for path in files:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            while line := f.readline(max_chars + 1):
                if len(line) > max_chars and not line.endswith("\n"):
                    while (rest := f.readline(max_chars)) and not rest.endswith("\n"):
                        pass  # the rest of an overlong line
                    continue
                yield line.rstrip("\r\n")


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
    output = Path(output)
    _check_output(output)
    files = expand_inputs(inputs)
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
                sentence_iterator=iter_sentences(files, LLAMA_SETTINGS["max_sentence_length"]),
                model_prefix=str(prefix),
                num_threads=threads or os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
                **settings,
            )
        except (RuntimeError, OSError) as exc:
            raise LlamalabError(f"SentencePiece could not train: {exc}") from None
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
