"""llamalab as an lm-evaluation-harness model: ``lm_eval --model llamalab``.

lm-eval 0.4.13 finds models only in its own registry (``lm_eval.api.registry``): it
imports its built-in model modules and looks names up there, with no entry-point or
plugin discovery. So :func:`register` adds this class under the name "llamalab", and
``python -m llamalab.eval.lm_eval_cli ...`` (the same arguments as ``lm_eval``) registers
it and then runs lm-eval's own command line. In Python, call :func:`register` before
``lm_eval.simple_evaluate(model="llamalab", ...)``.

Model arguments (``--model_args``): ``model`` (a checkpoint, default: the embedded
model), ``dtype`` (auto or float32), ``device``, ``threads``, ``ctx`` (context tokens,
default 2048), ``max_gen_toks`` (default 256). ``--batch_size`` is the number of
continuations scored, or sequences generated, together.

This module imports lm-eval when it is imported: import it only when lm-eval is wanted.
"""

from __future__ import annotations

import functools

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llamalab.eval.likelihood import LikelihoodScorer, document_start

MODEL_NAME = "llamalab"


def _on_scoring_kernels(method):
    """Run an lm-eval request method under evaluation's kernel setting
    (``runner.scoring_kernels``), as ``llamalab eval`` runs its tasks."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        from llamalab.eval.runner import scoring_kernels

        with scoring_kernels(self._model):
            return method(self, *args, **kwargs)

    return run


def _int_or_none(value) -> int | None:
    if value is None or value == "" or str(value).lower() in ("none", "auto"):
        return None
    return int(value)


def _device(device: str | None) -> str:
    """lm-eval's ``--device`` (default "cuda", or "cuda:0") as llamalab's; like lm-eval's
    hf model, a CUDA device that is not there means the CPU."""
    import torch

    if device in (None, "auto", "cpu"):
        return device or "auto"
    if str(device).startswith("cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


class LlamalabLM(TemplateLM):
    """An lm-eval model that scores and generates with llamalab's model code and Engine."""

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str | None = "auto",
        threads: int | str | None = None,
        ctx: int | str = 2048,
        batch_size: int | str | None = 1,
        max_gen_toks: int | str = 256,
        **kwargs,  # what lm-eval passes to every model (max_batch_size, ...), unused here
    ) -> None:
        super().__init__()
        from llamalab.runtime import load_runtime

        device = _device(device)
        self._model, self.tokenizer = load_runtime(
            model, dtype, device=device, threads=_int_or_none(threads), progress=False
        )
        self.ctx = int(ctx)
        self.batch_size = _int_or_none(batch_size) or 1
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = LikelihoodScorer(
            self._model, max_seq_len=self.ctx, max_rows=max(self.batch_size, 1)
        )

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """The end-of-text id (EOS)."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What stands before a text with no context: BOS, else EOS (as lm-eval's hf model)."""
        return document_start(self.tokenizer)

    @property
    def max_length(self) -> int:
        """The most tokens one scored window holds."""
        return self.scorer.max_seq_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Ids of ``string``; BOS as the model's default unless ``add_special_tokens`` says."""
        add_bos = None if add_special_tokens is None else bool(add_special_tokens)
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        """Text of ``tokens``."""
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    @_on_scoring_kernels
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log P(continuation | context), greedy?) per request; requests that share a
        context are scored together, the context run once, and contexts that open alike
        (a few-shot prompt's exemplars) share those tokens' pass too."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batch = [(list(context), [requests[i][2] for i in members])
                 for context, members in groups.items()]  # fmt: skip
        with tqdm(total=len(batch), disable=disable_tqdm, desc="llamalab loglikelihood") as bar:
            scored_groups = self.scorer.score_many(batch, on_done=bar.update)
        for members, scored in zip(groups.values(), scored_groups, strict=True):
            for i, result in zip(members, scored, strict=True):
                results[i] = result
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    @_on_scoring_kernels
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of at most ``max_length`` tokens."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="llamalab rolling"):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens(
                [(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True
            )
            total = sum(lp for lp, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    @_on_scoring_kernels
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Replies from llamalab's Engine (greedy unless ``do_sample``), cut at ``until``."""
        from llamalab.generation import Engine, Request
        from llamalab.generation.params import GREEDY, SamplingParams

        # A fresh engine: the scorer may have replaced the model's cache since the last one.
        engine = Engine(
            self._model, self.tokenizer, max_batch=self.batch_size, max_seq_len=self.ctx
        )
        prepared = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = GREEDY
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            if kwargs.get("do_sample") and temperature > 0:
                sampling = SamplingParams(
                    temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                    top_p=float(kwargs.get("top_p", 1.0) or 1.0), min_p=0.0,
                )  # fmt: skip
            ids = self.tok_encode(context)
            room = self.ctx - max_tokens
            ids = ids[-max(room, 1) :]  # keep the end of an over-long context, as hf does
            max_tokens = min(max_tokens, self.ctx - len(ids))
            prepared.append(Request(ids, max_tokens=max_tokens, sampling=sampling, stop=until))
        replies: list[str] = []
        bar = tqdm(total=len(prepared), disable=disable_tqdm, desc="llamalab generate")
        for at in range(0, len(prepared), self.batch_size):
            batch = prepared[at : at + self.batch_size]
            for seq in engine.generate_batch(batch):
                replies.append(seq.text)
            bar.update(len(batch))
        bar.close()
        for request, reply in zip(requests, replies, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, reply)
        return replies


def register() -> None:
    """Make ``--model llamalab`` known to lm-eval in this process (idempotent)."""
    if MODEL_NAME not in model_registry:
        register_model(MODEL_NAME)(LlamalabLM)
