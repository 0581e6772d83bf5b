"""The training loss: next-token cross-entropy fused with the output projection.

The plain way, ``F.cross_entropy(output(h).float(), targets)``, materialises the logits
(tokens × vocabulary) in float32, then a log-softmax of them, a zero-filled gradient of
the same size and that gradient's log-softmax backward: five passes over a tensor that
for a 16 × 256 micro-batch and an 8,000-token vocabulary is 131 MB, more than the whole
rest of a small model's step moves. :func:`linear_cross_entropy` instead walks the
tokens in chunks whose logits stay in cache, and computes each chunk's loss *and* its
gradients (with respect to the hidden states and the output matrix) in the forward
pass, while the logits are at hand; backward only scales them by the incoming gradient.
The arithmetic is the same as the plain way (the matmuls run in the autocast dtype when
autocast is on, the softmax in float32); only the order of the sums differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

# Logits per chunk (rows × vocabulary): 4M float32 values, 16 MB, which stays in a
# server CPU's cache; no chunk is smaller than 64 rows so its matmuls stay efficient.
_CHUNK_VALUES = 1 << 22
_MIN_ROWS = 64
# Below this a probability's logarithm is taken from the logits instead (float32's
# smallest normal number is 1.2e-38).
_TINY = 1e-30


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding all logits.

    Args:
        hidden: (..., dim) final hidden states (after the final norm).
        weight: (vocab, dim) output matrix.
        targets: (...) next-token ids; positions equal to -100 are left out of the mean.

    Equals ``F.cross_entropy((hidden @ weight.T).float().flatten(0, -2), targets.flatten(),
    ignore_index=-100)`` up to rounding, with gradients for ``hidden`` and ``weight``.
    """
    return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten())


def output_cross_entropy(
    hidden: torch.Tensor, output: nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``output(hidden)`` against ``targets``, at trained positions only.

    Args:
        hidden: (..., dim) final hidden states (after the final norm).
        output: the output projection: an ``nn.Linear``, a packed layer
            (``quant.linear.QuantizedLinear``) or any module mapping dim to vocab
            (a LoRA-wrapped head).
        targets: (...) next-token ids; positions equal to -100 are left out of the mean.

    Positions whose target is -100 (a prompt, padding) cost nothing: their hidden states
    are dropped before the vocabulary-sized product, which is most of the head's work
    when the loss covers an answer alone. A float head runs :func:`linear_cross_entropy`;
    a packed one the same, on its weight dequantized for this call (one transient copy,
    in bfloat16 where the CPU has bfloat16 arithmetic and the layer's own kernel is no
    finer, so its logits stay as precise as its packed forward); any other module gets
    its logits for the trained positions only.
    """
    from llamalab.quant.linear import QuantizedLinear

    flat = targets.flatten()
    picked = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.flatten(0, -2).index_select(0, picked)
    t = flat.index_select(0, picked)
    if isinstance(output, nn.Linear):
        return _LinearCrossEntropy.apply(h, output.weight, t)
    if isinstance(output, QuantizedLinear):
        weight = output.dequantized_weight_for_grad()
        return _LinearCrossEntropy.apply(h, weight, t)
    return F.cross_entropy(output(h).float(), t)  # NaN when nothing is trained, as above


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        dtype = _compute_dtype(weight)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            w = weight.to(dtype)
            n_rows, vocab = h.shape[0], w.shape[0]
            valid = targets != IGNORE_INDEX
            count = int(valid.sum())
            safe = torch.where(valid, targets, 0)
            # Gradient of the mean: each counted token contributes 1/count.
            scale = 1.0 / count if count else 0.0
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if want_w
                else None
            )
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = max(_MIN_ROWS, _CHUNK_VALUES // max(vocab, 1))
            for start in range(0, n_rows, rows):
                stop = min(n_rows, start + rows)
                hc, tc, vc = h[start:stop], safe[start:stop], valid[start:stop]
                logits = (hc @ w.T).float()  # (rows, vocab)
                probs = torch.softmax(logits, dim=-1)  # one exp per logit, not two
                picked = probs.gather(1, tc.unsqueeze(1))
                logp = picked.log()
                # A target whose probability underflowed (a logit ~87 below the row's
                # largest): its log-probability exactly, from the logits.
                tiny = picked < _TINY
                if bool(tiny.any()):
                    rows_ = tiny.squeeze(1).nonzero().squeeze(1)
                    exact = logits[rows_].gather(1, tc[rows_].unsqueeze(1)) - torch.logsumexp(
                        logits[rows_], dim=-1, keepdim=True
                    )
                    logp[rows_] = exact
                total -= (logp.squeeze(1) * vc).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d loss / d logits = (softmax - one_hot) / count, zero on ignored rows.
                probs.scatter_add_(1, tc.unsqueeze(1), torch.full_like(picked, -1.0))
                probs.mul_((vc * scale).unsqueeze(1))
                g = probs.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = g @ w
                if grad_w is not None and g.dtype == torch.float32:
                    grad_w.addmm_(g.T, hc)
                elif grad_w is not None:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total / count if count else total.new_tensor(float("nan"))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None,
        )
