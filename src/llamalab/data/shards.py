"""Read a ``data prepare`` output: the manifest and each source's memory-mapped tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamalab.data.prepare import FORMAT, MANIFEST, VERSION
from llamalab.errors import LlamalabError

MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class Source:
    """One source's tokens, memory-mapped (nothing is read until it is sliced)."""

    name: str
    tokens: np.ndarray  # 1-D uint16 or uint32 memmap

    def __len__(self) -> int:
        return len(self.tokens)


class TokenShards:
    """A prepared data folder: ``manifest.json`` plus one ``NAME.bin`` per source."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise LlamalabError(
                f"{self.folder}: no {MANIFEST}; make one with `llamalab data prepare`"
            )
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise LlamalabError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LlamalabError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise LlamalabError(f"{path}: not a llamalab token-shard manifest")
        if manifest.get("version") != VERSION:
            raise LlamalabError(f"{path}: version {manifest.get('version')!r} is not {VERSION}")
        self.manifest: dict[str, Any] = manifest
        try:
            dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
                raise TypeError(dtype)
            tokenizer = manifest["tokenizer"]
            self.vocab_size = int(tokenizer["vocab_size"])
            self.eos_id = int(tokenizer["eos_id"])
            self.bos_id = int(tokenizer["bos_id"])
            self.tokenizer_sha256 = str(tokenizer["sha256"])
            self.sources: dict[str, Source] = {}
            for name, info in manifest["sources"].items():
                file = self.folder / Path(info["file"]).name  # never outside the folder
                count = int(info["tokens"])
                if not file.is_file() or file.stat().st_size != count * dtype.itemsize:
                    raise LlamalabError(
                        f"{file}: missing or not {count} tokens long, as {MANIFEST} says"
                    )
                tokens = (
                    np.memmap(file, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)
                )
                self.sources[name] = Source(name, tokens)
        except (KeyError, TypeError, ValueError) as exc:
            raise LlamalabError(f"{path}: malformed manifest ({exc!r})") from None
        if not self.sources:
            raise LlamalabError(f"{path}: no sources")

    @property
    def tokenizer_folder(self) -> Path:
        """The tokenizer files the shards were made with."""
        return self.folder / "tokenizer"

    def sizes(self) -> dict[str, int]:
        """Tokens per source."""
        return {name: len(s) for name, s in self.sources.items()}
