"""Log-likelihoods of continuations, computed on the same model code as generation.

A multiple-choice item is one context and a few continuations. The context runs once, in
cache row 0 (in chunks, the way the engine prefills a prompt); its keys and values are then
copied into one cache row per choice, and every choice's remaining tokens run as one
batch continuing from there. A 5-shot MMLU prompt of ~600 tokens with four one-token
answers thus costs one forward pass over the context, not four.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llamalab.errors import LlamalabError
from llamalab.kv_cache import cache_view

CONTEXT_CHUNK = 512  # context tokens per forward pass (bounds the attention mask's size)


class LikelihoodScorer:
    """Scores token continuations with a :class:`~llamalab.model.Transformer`.

    Args:
        model: the model (float or packed); its KV cache is (re)allocated here, so an
            :class:`~llamalab.generation.Engine` on the same model must be created after
            the last scoring call, or recreated.
        max_seq_len: the longest context plus continuation, in tokens (default: the
            model's context length); longer contexts lose their oldest tokens, as
            lm-eval's models do.
        max_rows: the most continuations scored together (more run in several batches).
    """

    def __init__(
        self, model: torch.nn.Module, *, max_seq_len: int | None = None, max_rows: int = 8
    ) -> None:
        self.model = model
        limit = model.config.context_length
        self.max_seq_len = min(max_seq_len or limit, limit)
        if self.max_seq_len < 2:
            raise LlamalabError(f"the context must hold at least 2 tokens, got {self.max_seq_len}")
        if max_rows < 1:
            raise LlamalabError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        self.device = model.device
        self.dtype = model.dtype
        self._cache = None  # the layer-0 cache object this scorer allocated

    def _ensure_cache(self) -> None:
        # Someone else (an Engine) may have replaced the cache since: check identity.
        current = self.model.layers[0].attention.kv_cache
        if current is None or current is not self._cache:
            self.model.setup_cache(self.max_rows, self.max_seq_len)
            self._cache = self.model.layers[0].attention.kv_cache

    def score(
        self, context: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, bool]]:
        """For each continuation: (sum of its tokens' log-probabilities given ``context``,
        whether greedy decoding would produce exactly it)."""
        if not context:
            raise LlamalabError("a scored context needs at least one token")
        if not continuations or any(len(c) == 0 for c in continuations):
            raise LlamalabError("every continuation needs at least one token")
        out: list[tuple[float, bool]] = []
        for at in range(0, len(continuations), self.max_rows):
            out.extend(self._score_rows(context, continuations[at : at + self.max_rows]))
        return out

    def _score_rows(
        self, context: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> list[tuple[float, bool]]:
        longest = max(len(c) for c in continuations)
        room = self.max_seq_len - (longest - 1)  # the context's share of the window
        if room < 1:
            raise LlamalabError(
                f"a continuation of {longest} tokens does not fit the context of "
                f"{self.max_seq_len} tokens"
            )
        context = list(context)[-room:]
        n, length = len(continuations), len(context)
        self._ensure_cache()
        with torch.inference_mode():
            logits = None
            for start in range(0, length, CONTEXT_CHUNK):
                end = min(start + CONTEXT_CHUNK, length)
                tokens = torch.tensor([context[start:end]], dtype=torch.long, device=self.device)
                view = cache_view(
                    torch.arange(start, end).unsqueeze(0), row=0, kv_len=end, last_only=True,
                    dtype=self.dtype, device=self.device,
                )  # fmt: skip
                logits = self.model(tokens, cache=view)
            first = torch.log_softmax(logits[0, -1].float(), dim=-1).cpu()  # (vocab,)
            rest = None
            if longest > 1:
                self._share_context(n, length)
                width = longest - 1
                # Every row but the longest is padded at its end: causal attention keeps
                # the padding out of the positions that are read.
                rows = [list(c[:-1]) + [0] * (width - len(c) + 1) for c in continuations]
                tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
                view = cache_view(
                    torch.arange(length, length + width).unsqueeze(0), row=0,
                    kv_len=length + width, dtype=self.dtype, device=self.device,
                )  # fmt: skip
                rest = torch.log_softmax(self.model(tokens, cache=view).float(), dim=-1).cpu()
        results = []
        first_best = int(first.argmax())
        for i, cont in enumerate(continuations):
            logprob = float(first[cont[0]])
            greedy = first_best == cont[0]
            if len(cont) > 1:
                steps = rest[i, : len(cont) - 1]  # (len - 1, vocab)
                targets = torch.tensor(cont[1:], dtype=torch.long)
                logprob += float(steps.gather(1, targets.unsqueeze(1)).sum())
                greedy = greedy and bool((steps.argmax(dim=-1) == targets).all())
            results.append((logprob, greedy))
        return results

    def _share_context(self, rows: int, length: int) -> None:
        """Copy row 0's cached context (slots 0..length) into rows 1..rows-1."""
        if rows < 2:
            return
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            cache.k[1:rows, :, :length] = cache.k[0:1, :, :length]
            cache.v[1:rows, :, :length] = cache.v[0:1, :, :length]

    def token_logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        """Log-probabilities (float64, CPU) of ``tokens[1:]``, each given the ones before it,
        in one causal pass without the cache (perplexity windows)."""
        if not 2 <= len(tokens) <= self.max_seq_len:
            raise LlamalabError(
                f"a scored window needs 2 to {self.max_seq_len} tokens, got {len(tokens)}"
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model(ids[:, :-1])  # (1, T - 1, vocab)
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            picked = logprobs.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
        return picked.double().cpu()


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair, tokenized the way lm-eval does it.

    Spaces ending the context move to the continuation (a BPE vocabulary joins a space to
    the word after it); the two are encoded together and split where the context's own
    encoding ends, so the continuation's tokens are those of the joined text. An empty
    context becomes the document-start token (BOS, else EOS).
    """
    return split_pairs(tokenizer, context, [continuation])[0]


def split_pairs(
    tokenizer, context: str, continuations: Sequence[str]
) -> list[tuple[list[int], list[int]]]:
    """:func:`split_pair` for each continuation of one context, the context encoded once."""
    if not context:
        return [_split_empty(tokenizer, c) for c in continuations]
    trailing = len(context) - len(context.rstrip())
    tail = context[len(context) - trailing :]
    context = context[: len(context) - trailing]
    head = tokenizer.encode(context, special=False)
    out = []
    for continuation in continuations:
        whole = tokenizer.encode(context + tail + continuation, special=False)
        out.append((head, whole[len(head) :]))
    return out


def _split_empty(tokenizer, continuation: str) -> tuple[list[int], list[int]]:
    # No context: the continuation follows the document-start token.
    ids = tokenizer.encode(continuation, add_bos=False, special=False)
    start = document_start(tokenizer)
    if ids and ids[0] == start:
        return ids[:1], ids[1:]
    return [start], ids


def document_start(tokenizer) -> int:
    """The token that stands before a text with no context: BOS, else EOS."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise LlamalabError("the tokenizer has neither BOS nor EOS to start a document with")
    return start
