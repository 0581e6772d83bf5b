"""`load_tokenizer`: find and read the tokenizer a checkpoint carries.

Formats are told apart by their contents: GGUF by its magic bytes, tiktoken by its
``<base64> <rank>`` text lines, SentencePiece by parsing as its protobuf, a
``tokenizer.json`` by being a JSON object with a ``model``. Inside a folder the file
names are the formats' own conventions (Hugging Face: ``tokenizer.json`` and
``tokenizer_config.json``; Meta: ``tokenizer.model`` next to ``params.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamalab.errors import LlamalabError
from llamalab.files import refuse_special
from llamalab.gguf.header import has_gguf_magic, is_gguf, read_file_head, read_gguf_metadata
from llamalab.startup import paused_gc
from llamalab.tokenizer.base import Tokenizer, shown_token
from llamalab.tokenizer.chat import BUILTIN_TEMPLATES, ChatTemplate, builtin_template_name

TokenizerRef = str | os.PathLike[str] | None


def detect_file_format(path: Path) -> str:
    """``"gguf"``, ``"tiktoken"``, ``"sentencepiece"`` or ``"tokenizer.json"``, from the file's bytes."""
    from llamalab.tokenizer.spm import parse_model_proto
    from llamalab.tokenizer.tiktoken_llama3 import looks_like_tiktoken

    head = read_file_head(path, 4096)
    if has_gguf_magic(head):
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "tokenizer.json"
    if looks_like_tiktoken(head):
        return "tiktoken"
    try:
        parse_model_proto(path.read_bytes(), str(path))
    except LlamalabError:
        pass
    else:
        return "sentencepiece"
    raise LlamalabError(
        f"{path}: not a tokenizer file (expected GGUF, a SentencePiece or tiktoken tokenizer.model, or tokenizer.json)"
    )


def load_tokenizer(ref: TokenizerRef = None) -> Tokenizer:
    """Load the tokenizer of a checkpoint or a bare tokenizer file.

    Args:
        ref: a GGUF file (a full model or a vocabulary-only one), a Hugging Face folder
            (``tokenizer.json``/``tokenizer_config.json``), a Meta folder (``params.json``
            + ``tokenizer.model``), or a bare ``tokenizer.model`` (SentencePiece or
            tiktoken) or ``tokenizer.json``. ``None``: the default model.

    Raises:
        LlamalabError: the path does not exist or holds no tokenizer llamalab can read.
    """
    from llamalab.default_model import resolve_model_path

    path = resolve_model_path(ref)
    if not path.is_dir() and not path.is_file():
        refuse_special(path)  # a FIFO or a device: say which, never open it
        raise LlamalabError(f"{path}: no such file or folder")
    # A vocabulary's tables are tens of thousands of new containers, none in a cycle.
    with paused_gc():
        if path.is_dir():
            return _load_folder(path)
        return _load_file(path, config={}, generation_config={})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlamalabError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LlamalabError(f"{path}: expected a JSON object")
    return value


def _load_folder(folder: Path) -> Tokenizer:
    config = _read_json(folder / "tokenizer_config.json")
    generation_config = _read_json(folder / "generation_config.json")
    # A separate chat_template.jinja (newer Hugging Face folders) wins over the config.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        config = {**config, "chat_template": jinja_file.read_text(encoding="utf-8")}
    for name in ("tokenizer.json", "tokenizer.model"):
        candidate = folder / name
        if candidate.is_file():
            return _load_file(candidate, config=config, generation_config=generation_config)
    ggufs = sorted(p for p in folder.iterdir() if p.is_file() and is_gguf(p))
    if len(ggufs) == 1:
        return _load_file(ggufs[0], config=config, generation_config=generation_config)
    raise LlamalabError(
        f"{folder}: no tokenizer.json, tokenizer.model or single GGUF file in this folder"
    )


def _load_file(
    path: Path, *, config: dict[str, Any], generation_config: dict[str, Any]
) -> Tokenizer:
    kind = detect_file_format(path)
    template_source: str | None = None
    template_name = ""
    if kind == "gguf":
        tok, template_source = _load_gguf(path)
        template_name = "gguf"
    elif kind == "tokenizer.json":
        from llamalab.tokenizer.bpe import HFJsonTokenizer

        tok = HFJsonTokenizer(path, config=config, generation_config=generation_config)
    elif kind == "tiktoken":
        from llamalab.tokenizer.tiktoken_llama3 import TiktokenTokenizer

        tok = TiktokenTokenizer(path)
    else:
        from llamalab.tokenizer.spm import SentencePieceTokenizer

        add_bos = config.get("add_bos_token", True)
        add_eos = config.get("add_eos_token", False)
        tok = SentencePieceTokenizer(
            path.read_bytes(), source=str(path), add_bos=bool(add_bos), add_eos=bool(add_eos)
        )
    if kind != "gguf":
        template_source, template_name = _config_template(config, path), "tokenizer_config.json"
    attach_chat_template(tok, template_source, template_name)
    return tok


def _config_template(config: dict[str, Any], path: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    # A list of named templates: the one called "default" is the chat template.
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return str(entry.get("template"))
    raise LlamalabError(
        f"{path.parent / 'tokenizer_config.json'}: chat_template has no 'default' entry"
    )


def _load_gguf(path: Path) -> tuple[Tokenizer, str | None]:
    types: dict[str, tuple[int, int | None]] = {}
    meta = read_gguf_metadata(path, types)
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise LlamalabError(
            f"{path}: this GGUF file carries no tokenizer (no tokenizer.ggml.model/tokens)"
        )
    check_gguf_vocabulary(meta, types, path)
    if model == "llama":
        from llamalab.tokenizer.spm import from_gguf_meta

        tok: Tokenizer = from_gguf_meta(meta, source=str(path))
    elif model == "gpt2":
        from llamalab.tokenizer.bpe import ByteLevelBPETokenizer

        tok = ByteLevelBPETokenizer(meta, source=str(path))
    else:
        raise LlamalabError(
            f"{path}: unsupported tokenizer model {model!r} (supported: 'llama', 'gpt2')"
        )
    template = meta.get("tokenizer.chat_template")
    return tok, template if isinstance(template, str) else None


# The value types each tokenizer key may have (GGUF value type numbers, per the spec).
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64, _I64, _F64 = range(13)
_INTEGERS = frozenset({_U8, _I8, _U16, _I16, _U32, _I32, _U64, _I64})
_FLAGS = _INTEGERS | {_BOOL}
_ARRAYS = {
    "tokenizer.ggml.tokens": ("strings", frozenset({_STRING})),
    "tokenizer.ggml.merges": ("strings", frozenset({_STRING})),
    "tokenizer.ggml.token_type": ("integers", _INTEGERS),
    "tokenizer.ggml.scores": ("numbers", _INTEGERS | {_F32, _F64}),
}
_SCALARS = {
    **dict.fromkeys(
        (f"tokenizer.ggml.{name}_token_id" for name in ("bos", "eos", "eot", "eom", "unknown")),
        ("an integer", _INTEGERS),
    ),
    **dict.fromkeys(
        (
            f"tokenizer.ggml.{name}"
            for name in (
                "add_bos_token",
                "add_eos_token",
                "add_space_prefix",
                "remove_extra_whitespaces",
            )
        ),
        ("a boolean", _FLAGS),
    ),
}


def check_gguf_vocabulary(
    meta: dict[str, Any], types: dict[str, tuple[int, int | None]], path: Path
) -> None:
    """Refuse a GGUF vocabulary that no tokenizer can be built from, before one is built.

    Checked: the value types of the keys the tokenizers read; a vocabulary that is not
    empty and has no duplicate tokens (llama.cpp names each empty token ``[EMPTY_<id>]``
    and then stops on any duplicate, an assertion that ends the process). A ``gpt2``
    vocabulary's merges are checked where bpe.py splits them, in the same pass. ``types``
    is what ``read_gguf_metadata`` fills in.
    """
    for key, (what, allowed) in _ARRAYS.items():
        if key in types and (types[key][0] != _ARRAY or types[key][1] not in allowed):
            raise LlamalabError(f"{path}: {key} must be an array of {what}")
    for key, (what, allowed) in _SCALARS.items():
        if key in types and types[key][0] not in allowed:
            raise LlamalabError(f"{path}: {key} must be {what}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    if not tokens:
        raise LlamalabError(f"{path}: the vocabulary (tokenizer.ggml.tokens) is empty")
    vocabulary = set(tokens)
    # Equal texts, or an empty token whose llama.cpp name may equal a token: look closer.
    if len(vocabulary) != len(tokens) or "" in vocabulary:
        _refuse_duplicates(tokens, path)


def _refuse_duplicates(tokens: list[str], path: Path) -> None:
    """llama.cpp's rule: each empty token becomes ``[EMPTY_<id>]``, then no two are equal."""
    texts = [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]
    first_id: dict[str, int] = {}
    for i, text in enumerate(texts):
        first = first_id.setdefault(text, i)
        if first != i:
            duplicates = len(texts) - len(set(texts))
            more = f"; {duplicates} duplicates in all" if duplicates > 1 else ""
            raise LlamalabError(
                f"{path}: duplicate tokens in the vocabulary (tokenizer.ggml.tokens): "
                f"{shown_token(text)} is token {first} and token {i}{more}"
            )


def attach_chat_template(tok: Tokenizer, source: str | None, name: str) -> None:
    """Give a tokenizer its chat template, or the built-in one that fits its vocabulary."""
    bos = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_piece(tok.eos_id) if tok.eos_id is not None else ""
    if not source:
        name = builtin_template_name(tok.special_tokens)
        source = BUILTIN_TEMPLATES[name]
    tok.chat_template = ChatTemplate(source, bos_token=bos, eos_token=eos, name=name)
