"""Write a loaded tokenizer as the files a Hugging Face or Meta checkpoint folder carries.

A converted checkpoint must run as it is, so the converter writes the source's tokenizer
beside the weights in the destination format's own files:

- byte-level BPE (GGUF ``gpt2`` vocabularies, ``tokenizer.json``): ``tokenizer.json``,
  the `tokenizers` pipeline itself (BPE model, pre-tokenizer, byte-level decoder) with
  the special tokens as added tokens;
- SentencePiece: ``tokenizer.model``, the model the `sentencepiece` library runs;
- tiktoken (Llama 3): ``tokenizer.model`` in Meta's ``<base64> <rank>`` format.

Every folder also gets ``tokenizer_config.json``: BOS/EOS, whether BOS is added, the
context length and the chat template, which is what transformers' ``AutoTokenizer`` and
llamalab's own loader read.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.tokenizer.base import Tokenizer
from llamalab.tokenizer.chat import BUILTIN_TEMPLATES


def write_tokenizer_files(tok: Tokenizer, folder: Path, *, context_length: int) -> list[str]:
    """Write ``tok`` into ``folder`` as checkpoint tokenizer files; return their names."""
    from llamalab.tokenizer.bpe import ByteLevelBPETokenizer, HFJsonTokenizer
    from llamalab.tokenizer.spm import SentencePieceTokenizer
    from llamalab.tokenizer.tiktoken_llama3 import TiktokenTokenizer

    config: dict[str, Any] = {
        "model_max_length": context_length,
        "add_bos_token": tok.add_bos_default,
        "add_eos_token": tok.add_eos_default,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(tok, ByteLevelBPETokenizer | HFJsonTokenizer):
        (folder / "tokenizer.json").write_text(_tokenizer_json(tok), encoding="utf-8")
        written = ["tokenizer.json"]
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    elif isinstance(tok, SentencePieceTokenizer):
        (folder / "tokenizer.model").write_bytes(tok.library_proto())
        written = ["tokenizer.model"]
        config["tokenizer_class"] = "LlamaTokenizer"
        config["legacy"] = True  # LLaMA's own behaviour around special tokens
    elif isinstance(tok, TiktokenTokenizer):
        lines = (
            f"{base64.b64encode(token).decode('ascii')} {rank}\n"
            for token, rank in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])
        )
        (folder / "tokenizer.model").write_text("".join(lines), encoding="ascii")
        written = ["tokenizer.model"]
    else:
        raise LlamalabError(f"{tok.source}: cannot write a {type(tok).__name__} as files")
    for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if tid is not None:
            config[key] = tok.id_to_piece(tid)
    template = tok.chat_template
    if template is not None and template.name not in BUILTIN_TEMPLATES:
        config["chat_template"] = template.source
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return [*written, "tokenizer_config.json"]


def _tokenizer_json(tok: Any) -> str:
    """The `tokenizers` pipeline with every parsed special token as an added token."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_str(tok.backend.to_str())  # a copy: the loaded one stays as it is
    specials = [
        AddedToken(text, special=True, normalized=False)
        for text, _ in sorted(tok.added_tokens.special.items(), key=lambda kv: kv[1])
    ]
    always = [
        AddedToken(text, special=False, normalized=False)
        for text, _ in sorted(tok.added_tokens.always.items(), key=lambda kv: kv[1])
    ]
    # Texts already in the vocabulary keep their ids: added tokens only mark them.
    backend.add_special_tokens(specials)
    backend.add_tokens(always)
    return backend.to_str(pretty=True)
