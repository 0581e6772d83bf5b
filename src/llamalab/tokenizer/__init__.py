"""Tokenizers and chat templates for every LLaMA-family vocabulary.

One `Tokenizer` interface over three backends, each loaded from what the checkpoint
carries: SentencePiece (LLaMA 1/2: ``tokenizer.model`` or a GGUF ``llama`` vocabulary),
byte-level BPE (GGUF ``gpt2`` vocabularies and Hugging Face ``tokenizer.json``, on
`tokenizers`) and tiktoken (Llama 3's ``tokenizer.model``).

    >>> tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")      # doctest: +SKIP
    >>> tok.encode("Hello")                                          # doctest: +SKIP
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from __future__ import annotations

from llamalab.tokenizer.base import StreamDecoder, Tokenizer
from llamalab.tokenizer.chat import ChatTemplate
from llamalab.tokenizer.load import detect_file_format, load_tokenizer

__all__ = [
    "ChatTemplate",
    "StreamDecoder",
    "Tokenizer",
    "detect_file_format",
    "load_tokenizer",
]
