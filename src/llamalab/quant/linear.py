"""Linear layers that keep their weights packed, for fast CPU inference.

Decoding one token reads every weight once, so on a CPU a decode step costs the weight
bytes over the memory bandwidth (plus a fixed cost per operation). float32 weights cost
4 bytes each; GGUF's Q4_0 / Q4_1 / Q4_K about 0.56-0.63 and Q8_0 1.06. Which kernel can
read a small form decides the speed. Four kernels, chosen per weight at load time:

* ``vnni``: llamalab's own (``kernels/csrc/kernels.cpp``, built by ``kernels/native.py``)
  on CPUs with AVX-512 VNNI. Every type that is exactly ``q * scale + zero`` per group
  (``llamalab.gguf.dequant.affine_groups``: Q4_0, Q4_1, Q4_K in 4 bits, groups of 32;
  Q5_0, Q5_1, Q5_K in 6 bits, groups of 32; Q6_K in 6 bits, groups of 16; Q8_0 in 8
  bits, groups of 32) keeps its quants, with a float16 scale per group and a float16
  zero where the type is not symmetric (``plan.VNNI_LAYOUTS``): 0.5625 bytes a weight
  for Q4_0, 0.625 for Q4_1 and Q4_K, 0.81-0.875 for the 5- and 6-bit types and 1.0625
  for Q8_0, each within 7% of the GGUF size. Activations are quantized to int8 per block
  of 16 (llama.cpp uses 32; 16 halved the KL), and ``vpdpbusd`` multiplies four
  weights of 16 rows at a time. One row reads 30-32 GB/s here, the machine's bandwidth,
  against 20-22 for torch's int4 kernel and 2 bytes a weight for fp16. Many rows (a
  prefill chunk) run on it too: its int8 products beat a bfloat16 GEMM even on weights
  unpacked in advance.
* ``int4`` (where ``vnni`` is not available): 4-bit GGUF types (Q4_0, Q4_1, Q4_K),
  whose blocks are exactly groups of 32 with a scale and a zero (``llamalab.gguf.dequant.int4_groups``), on torch's
  ``aten._weight_int4pack_mm_for_cpu``. Only that kernel's bfloat16 path is vectorised
  (float32 activations run 10-50x slower than a float32 matmul), and it is fast only
  on CPUs with AVX-512 BF16 or AMX, so :func:`int4_kernel_available` checks the CPU's
  flags. Activations, scales, zeros and outputs are rounded to bfloat16 (unit roundoff
  2**-8): over SmolLM2 that moves the next-token distribution by a KL of about 6e-4
  from the float32 model, a seventh of what llama.cpp's own 8-bit activations do
  (``bench/bench_quality.py``). A call with 64 rows or more (a prefill chunk) unpacks
  the weight to bfloat16 once and runs one bfloat16 GEMM, 1.4-2x faster than the int4
  kernel at that size.
* ``fp16``: every other type, and CPUs without fast bfloat16. fbgemm's float16-weight
  GEMM (``quantized::linear_dynamic_fp16``) reads half the bytes of float32, converts
  them with F16C in registers and computes in float32; its only error is rounding each
  dequantized weight to float16 (at most 2**-11 relative).
* ``float32``: a torch build without fbgemm (e.g. on ARM), or a weight beyond float16's
  range: ``F.linear`` on the dequantized weight, slower and never wrong.

Also measured (``bench/bench_kernels.py``) and not used: fbgemm's dynamic int8 linear
(activations quantized per tensor, ~2 % output error); ``aten._weight_int8pack_mm``
(per-channel scales cannot hold GGUF's per-block ones); a ``torch.compile``d
dequantize-and-reduce over packed nibbles (compute bound, no faster than float32).

:class:`PackedEmbedding` keeps the token embedding in its stored type and dequantizes
only the rows a lookup needs. The layers hold no parameters; an input that requires a
gradient (training adapters over a frozen packed base) gets one, from the layer's weight
dequantized in backward for that layer alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from torch import nn

from llamalab.errors import LlamalabError
from llamalab.gguf.dequant import (
    BLOCK_LAYOUTS,
    SUPPORTED_TYPES,
    _as_bytes,
    affine_groups,
    dequantize,
    int4_groups,
)
from llamalab.kernels.cpu import has_native_bf16
from llamalab.kernels.native import vnni_available
from llamalab.quant.plan import (
    INT4_GROUP,
    UNPACK_ROWS,
    VNNI_LAYOUTS,
    VnniLayout,
    cpu_runs_int4_fast,
    int4_takes,
    vnni_takes,
)

__all__ = [
    "GGUFWeight",
    "Kernel",
    "PackedEmbedding",
    "QuantizedLinear",
    "fp16_kernel_available",
    "int4_kernel_available",
    "quantizable_linears",
    "quantize_model",
]

Kernel = Literal["vnni", "int4", "fp16", "float32"]

_FP16_MAX = 65504.0
# Rows dequantized at a time when building from GGUF bytes: bounds the transient
# float32 copy (4096 x 576 floats = 9 MB) however large the matrix is.
_ROW_CHUNK = 4096
# Output rows per fbgemm float16 matrix: packing takes transient copies of the whole
# matrix, so a 49152-row output layer is packed as bands (the extra calls cost ~10 us).
_PACK_ROWS = 16384


class GGUFWeight(NamedTuple):
    """One GGUF tensor as stored: raw bytes, type, and PyTorch-order shape.

    ``data`` is what ``gguf.GGUFReader`` exposes as ``tensor.data`` (a read-only
    memory map is fine: nothing writes into it), or a uint8 torch tensor.
    """

    data: np.ndarray | torch.Tensor
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]


@functools.cache
def int4_kernel_available() -> bool:
    """Whether 4-bit weights run packed here: torch's int4 kernel, with bfloat16 activations.

    That kernel is vectorised for bfloat16 only, which is fast where the CPU has
    AVX-512 BF16 (or AMX) and slower than float32 elsewhere (AVX2-only machines), so
    the CPU's flags decide; one small product checked against float32 maths guards
    against a build where the op exists but misbehaves.
    """
    if not cpu_runs_int4_fast():
        return False
    try:
        q = torch.arange(64 * 64, dtype=torch.int32).remainder_(16).view(64, 64)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scales = torch.stack([torch.full((2, 64), 0.5), torch.full((2, 64), 1.0)], -1).bfloat16()
        x = torch.ones(1, 64, dtype=torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales).float()
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    expected = ((q.float() - 8) * 0.5 + 1.0).sum(1)
    return bool(torch.allclose(out[0], expected, rtol=1e-2))


@functools.cache
def fp16_kernel_available() -> bool:
    """Whether this torch build runs fbgemm's float16-weight linear on this CPU.

    Checked by running it once on a tiny matrix, since the op exists in builds
    where it then fails (no fbgemm, or a CPU without AVX2/F16C).
    """
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 8), None)
        out = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.all(out == 8.0))


class QuantizedLinear(nn.Module):
    """``y = x @ W.T`` (no bias) with ``W`` packed for the int4 or fp16 kernel, or float32.

    Build it with :meth:`from_gguf` (straight from a GGUF tensor's bytes, never
    holding more than a few MB of float32) or :meth:`from_float`.  ``forward``
    accepts any leading batch shape and returns the input's dtype (the fp16 and float32
    kernels compute in float32, the int4 kernel in bfloat16).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: tuple[torch.ScriptObject, ...] | None,
        weight: torch.Tensor | None,
        source_type: str,
        int4: tuple[torch.Tensor, torch.Tensor] | None = None,
        vnni: tuple[torch.Tensor, VnniLayout] | None = None,
    ) -> None:
        super().__init__()
        if sum(part is not None for part in (packed, weight, int4, vnni)) != 1:
            raise ValueError("give exactly one of packed (fp16), weight (float32), int4 and vnni")
        self.in_features = in_features
        self.out_features = out_features
        self.source_type = source_type  # e.g. "Q4_1": what the weight was built from
        self._packed = packed  # fbgemm float16 matrices, one per band of output rows
        # Plain attributes, not parameters or buffers: the tied-embedding case must
        # never make the model's state_dict alias or re-tie them.
        self._weight = weight
        self._int4 = int4  # (packed nibbles, (groups, out, 2) bfloat16 scales and zeros)
        self._vnni = vnni  # (the tiled buffer of kernels/csrc/kernels.cpp, its layout)

    @property
    def kernel(self) -> Kernel:
        if self._vnni is not None:
            return "vnni"
        if self._int4 is not None:
            return "int4"
        return "fp16" if self._packed is not None else "float32"

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, *, kernel: Kernel | None = None, source_type: str = "F32"
    ) -> QuantizedLinear:
        """Pack a float ``(out_features, in_features)`` weight.

        ``kernel`` defaults to ``"fp16"`` where available and the weight fits in
        float16's range, else ``"float32"``.
        """
        if weight.dim() != 2:
            raise LlamalabError(f"a linear weight must be 2-D, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        weight = weight.detach().to(device="cpu", dtype=torch.float32)
        kernel = kernel or _pick_kernel(float(weight.abs().max()) if weight.numel() else 0.0)
        if kernel == "fp16":
            bands = tuple(
                _prepack_fp16(weight[start : start + _PACK_ROWS].to(torch.float16))
                for start in range(0, out_features, _PACK_ROWS)
            )
            return cls(in_features, out_features, bands, None, source_type)
        return cls(in_features, out_features, None, weight.contiguous(), source_type)

    @classmethod
    def from_gguf(
        cls,
        data: np.ndarray | torch.Tensor,
        qtype: GGMLQuantizationType | int,
        shape: tuple[int, ...] | list[int],
        *,
        kernel: Kernel | None = None,
    ) -> QuantizedLinear:
        """Build from a GGUF tensor's stored bytes (``shape`` in PyTorch order).

        ``kernel`` defaults to ``"int4"`` for Q4_0 / Q4_1 / Q4_K where that kernel runs
        fast and the shape fits (``$LLAMALAB_INT4=0`` turns it off), else ``"fp16"``
        where fbgemm runs and the values fit, else ``"float32"``. Either way the bytes
        are unpacked a band of rows at a time (bit-exactly, by ``llamalab.gguf.dequant``),
        so a 49152-row output matrix never exists in float32.
        """
        qtype = GGMLQuantizationType(qtype)
        if qtype not in SUPPORTED_TYPES:
            raise LlamalabError(f"cannot build a quantized linear from GGUF type {qtype.name}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise LlamalabError(f"a linear weight must be 2-D, got shape {shape}")
        out_features, in_features = shape
        raw, row_bytes = _stored_rows(data, qtype, shape, "weight")
        if kernel == "vnni" or (
            kernel is None and vnni_takes(qtype.name, shape) and vnni_available()
        ):
            layer = cls._from_vnni_bytes(raw, qtype, shape, row_bytes)
            if layer is not None:
                return layer
            if kernel == "vnni":
                raise LlamalabError(
                    f"a {qtype.name} weight of shape {shape} has scales beyond float16's range"
                )
        if kernel is None and int4_takes(qtype.name, shape) and int4_kernel_available():
            kernel = "int4"
        if kernel == "int4":
            return cls._from_int4_bytes(raw, qtype, shape, row_bytes)
        if kernel is None and not fp16_kernel_available():
            kernel = "float32"
        if kernel == "float32":
            weight = dequantize(raw, qtype, shape)
            return cls(in_features, out_features, None, weight, qtype.name)

        bands = []
        for start in range(0, out_features, _PACK_ROWS):
            stop = min(out_features, start + _PACK_ROWS)
            half = torch.empty((stop - start, in_features), dtype=torch.float16)
            for at, rows in _row_bands(
                stop - start, raw[start * row_bytes : stop * row_bytes], row_bytes
            ):
                band = dequantize(rows, qtype, (rows.numel() // row_bytes, in_features))
                if kernel is None and _pick_kernel(float(band.abs().max())) == "float32":
                    weight = dequantize(raw, qtype, shape)
                    return cls(in_features, out_features, None, weight, qtype.name)
                half[at : at + band.shape[0]] = band  # rounds to nearest even
            bands.append(_prepack_fp16(half))
            del half
        return cls(in_features, out_features, tuple(bands), None, qtype.name)

    @classmethod
    def _from_vnni_bytes(
        cls, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], row_bytes: int
    ) -> QuantizedLinear | None:
        """The vnni layer, or None where a scale or zero does not fit in float16."""
        out_features, in_features = shape
        if not vnni_takes(qtype.name, shape):
            raise LlamalabError(
                f"the vnni kernel takes {', '.join(VNNI_LAYOUTS)} weights whose output rows are "
                f"a multiple of 16, not a {qtype.name} weight of shape {shape}"
            )
        if not vnni_available():
            raise LlamalabError("the vnni kernel does not run here (see llamalab.kernels.native)")
        layout = VNNI_LAYOUTS[qtype.name]
        parts = []
        for _, rows in _row_bands(out_features, raw, row_bytes):
            groups = affine_groups(rows, qtype, (rows.numel() // row_bytes, in_features))
            part = pack_vnni(groups.q, groups.scale, groups.zero, layout)
            if part is None:
                return None
            parts.append(part)
        buffer = torch.cat(parts) if len(parts) > 1 else parts[0]
        return cls(in_features, out_features, None, None, qtype.name, vnni=(buffer, layout))

    @classmethod
    def _from_int4_bytes(
        cls, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], row_bytes: int
    ) -> QuantizedLinear:
        out_features, in_features = shape
        if not int4_takes(qtype.name, shape):
            raise LlamalabError(
                f"the int4 kernel takes Q4_0, Q4_1 and Q4_K weights whose output rows are a "
                f"multiple of 16, not a {qtype.name} weight of shape {shape}"
            )
        packed, scales = [], []
        for _, rows in _row_bands(out_features, raw, row_bytes):
            groups = int4_groups(rows, qtype, (rows.numel() // row_bytes, in_features))
            packed.append(
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32), 2)
            )
            scales.append(torch.stack([groups.scale.T, groups.zero.T], dim=-1).to(torch.bfloat16))
        int4 = (torch.cat(packed), torch.cat(scales, dim=1).contiguous())
        return cls(in_features, out_features, None, None, qtype.name, int4=int4)

    # -- use --------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # Training through a frozen packed layer (LoRA): only the input needs a gradient.
            return _PackedInputGrad.apply(x, self)
        dtype = x.dtype
        if self._vnni is not None:
            # Every row count: at 512 rows the kernel took 43 ms on a 11264 x 2048 weight,
            # where unpacking it for a bfloat16 GEMM took 117 (55 for the GEMM alone).
            buffer, layout = self._vnni
            x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
            y = torch.ops.llamalab.vnni_linear(x2, buffer, self.out_features, *layout)
            return y.view(*x.shape[:-1], self.out_features).to(dtype)
        if self._int4 is not None:
            packed, scales = self._int4
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if x2.shape[0] >= UNPACK_ROWS and self.out_features % 64 == 0:
                # Many rows (a prefill chunk): torch's int4 kernel is slowest per row here,
                # and unpacking to bfloat16 once for a bfloat16 GEMM is 1.4-2x faster.
                y = torch.matmul(x2, unpack_int4_transposed(packed, scales))
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, INT4_GROUP, scales)
            return y.view(*x.shape[:-1], self.out_features).to(dtype)
        if dtype != torch.float32:
            x = x.float()
        if self._packed is not None:
            # fbgemm flattens leading dimensions itself and copies strided input.
            parts = [torch.ops.quantized.linear_dynamic_fp16(x, band) for band in self._packed]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        else:
            y = F.linear(x, self._weight)
        return y if dtype == torch.float32 else y.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a new float32 tensor (for checks)."""
        if self._vnni is not None:
            buffer, layout = self._vnni
            return unpack_vnni(buffer, self.out_features, self.in_features, layout)
        if self._int4 is not None:  # the weight as the kernel applies it, rounded to bfloat16
            packed, scales = self._int4
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, packed, INT4_GROUP, scales
            ).T.float()
        if self._packed is not None:
            bands = [torch.ops.quantized.linear_unpack_fp16(band)[0] for band in self._packed]
            return torch.cat(bands).float()
        return self._weight.clone()

    def dequantized_weight_for_grad(self) -> torch.Tensor:
        """The (out, in) weight that training's backward multiplies by, as a new tensor.

        float32 and fp16 layers give their exact float32 weight. The int4 and vnni kernels
        already round activations (to bfloat16, to 8 bits) in their forward, so where the
        CPU has bfloat16 arithmetic they give it in bfloat16: products on it (float32
        sums) are as fine as their forward and, with AVX-512 BF16, 4x faster than
        float32's. Those products are most of a LoRA step on a packed base.
        """
        if self._int4 is not None and self.out_features % 64 == 0:
            return unpack_int4_transposed(*self._int4).T  # as the kernel applies it
        if self._vnni is not None and has_native_bf16():
            return self.dequantized_weight().to(torch.bfloat16)
        return self.dequantized_weight()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kernel={self.kernel}, source={self.source_type}"
        )


class _PackedInputGrad(torch.autograd.Function):
    """A packed layer's forward on its own kernels; backward gives the input's gradient only.

    The weight is frozen, so backward needs ``grad_out @ W`` alone: ``W`` is dequantized
    for this one layer, used and freed, so a backward pass over the model never holds
    more than one layer's float32 weight.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer(x)  # grad mode is off inside: the packed kernels run

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.layer.dequantized_weight_for_grad()  # (out, in)
        grad_x = torch.matmul(grad_out.to(weight.dtype), weight)
        return grad_x.to(grad_out.dtype), None


class PackedEmbedding(nn.Module):
    """A token embedding kept in its stored GGUF form; a lookup dequantizes only its rows.

    A float32 copy of a 49,152 × 2,048 table is 400 MB that a decode step reads a few
    rows of; the stored Q4/Q8 bytes are a quarter to an eighth of that.
    """

    def __init__(
        self, weight: GGUFWeight, dtype: torch.dtype = torch.float32, *, copy: bool = True
    ) -> None:
        """``copy=False`` keeps ``weight.data`` itself (a memory map that stays valid, such as
        a packed-weight cache file's): only the rows looked up then become resident."""
        super().__init__()
        qtype = GGMLQuantizationType(weight.qtype)
        if qtype not in SUPPORTED_TYPES or len(weight.shape) != 2:
            raise LlamalabError(
                f"cannot keep a {qtype.name} embedding of shape {weight.shape} packed"
            )
        self.num_embeddings, self.embedding_dim = (int(s) for s in weight.shape)
        shape = (self.num_embeddings, self.embedding_dim)
        raw, row_bytes = _stored_rows(weight.data, qtype, shape, "embedding")
        self.qtype = qtype
        self.dtype = dtype
        rows = raw.view(self.num_embeddings, row_bytes)
        # A copy by default: GGUF bytes come in a buffer read for the load, or a map of a
        # model file that may change under us.
        self._rows = rows.clone() if copy else rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = dequantize(self._rows[flat], self.qtype, (flat.numel(), self.embedding_dim))
        return rows.view(*tokens.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, source={self.qtype.name}"


def pack_vnni(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, layout: VnniLayout
) -> torch.Tensor | None:
    """The buffer ``kernels/csrc/kernels.cpp`` reads, from (out, in) quants and (out, in /
    group) scales and zeros; None where a scale or zero is beyond float16's range.

    Output rows are tiled by 16; per tile and group, the quants (their order is in the
    C++ file's header), then 16 float16 scales and, unless the layout is symmetric (its
    zeros are ``-offset * scale``), 16 float16 zeros.
    """
    n, k = q.shape
    bits, group, offset = layout
    tiles, groups = n // 16, k // group
    if bits == 8:
        quants = q.view(tiles, 16, k // 4, 4).permute(0, 2, 1, 3)  # [tile, chunk, row, byte]
        quants = quants.reshape(tiles, groups, group * 16)
    else:
        low = q & 0x0F if bits == 6 else q
        nibbles = low.view(tiles, 16, k // 8, 2, 4)  # [tile, row, chunk, half, byte]
        quants = (nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
        quants = quants.reshape(tiles, groups, group * 8)
        if bits == 6:
            top = (q >> 4).view(tiles, 16, k // 16, 4, 4)  # [tile, row, chunk, field, byte]
            fields = sum(top[:, :, :, f] << (2 * f) for f in range(4)).permute(0, 2, 1, 3)
            quants = torch.cat([quants, fields.reshape(tiles, groups, group * 4)], dim=2)

    def halves(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float16).view(tiles, 16, groups).permute(0, 2, 1).contiguous()

    parts = [halves(scale)] if offset else [halves(scale), halves(zero)]
    if not all(torch.isfinite(p).all() for p in parts):
        return None
    return torch.cat([quants, *(p.view(torch.uint8) for p in parts)], dim=2).reshape(-1)


def unpack_vnni(
    buffer: torch.Tensor, out_features: int, in_features: int, layout: VnniLayout
) -> torch.Tensor:
    """The (out, in) float32 weight of a :func:`pack_vnni` buffer: ``q * scale + zero``
    (the float16 scales and zeros widen exactly), 1,024 rows at a time so that the
    unpacked quants never take more than those rows' worth of memory."""
    bits, group, offset = layout
    tiles, groups = out_features // 16, in_features // group
    quant_bytes = group * bits * 2
    parts = buffer.view(tiles, groups, quant_bytes + (32 if offset else 64))
    out = torch.empty(out_features, in_features, dtype=torch.float32)
    step = 1024 // 16
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        chunk = parts[t0:t1]
        if bits == 8:
            q = chunk[:, :, :quant_bytes].reshape(t1 - t0, groups, group // 4, 16, 4)
            q = q.permute(0, 3, 1, 2, 4)  # [t, row, g, chunk, byte]
        else:
            packed = chunk[:, :, : group * 8].reshape(t1 - t0, groups, group // 8, 16, 4)
            q = torch.stack([packed & 0x0F, packed >> 4], dim=3)  # [t, g, chunk, half, row, b]
            q = q.permute(0, 4, 1, 2, 3, 5)  # [t, row, g, chunk, half, b]
            if bits == 6:
                fields = chunk[:, :, group * 8 : quant_bytes]
                fields = fields.reshape(t1 - t0, groups, group // 16, 16, 4)  # [t, g, c, row, b]
                top = torch.stack([(fields >> (2 * f)) & 3 for f in range(4)], dim=3)
                top = top.permute(0, 4, 1, 2, 3, 5)  # [t, row, g, chunk, field, b]
                q = q.reshape(top.shape) | (top << 4)
        q = q.reshape(t1 - t0, 16, groups, group).float()
        sz = chunk[:, :, quant_bytes:].contiguous().view(torch.float16).float()
        scale = sz[:, :, :16].permute(0, 2, 1).unsqueeze(-1)  # [t, row, g, 1]
        zero = -offset * scale if offset else sz[:, :, 16:].permute(0, 2, 1).unsqueeze(-1)
        values = torch.addcmul(zero, q, scale)
        out[t0 * 16 : t1 * 16] = values.reshape((t1 - t0) * 16, in_features)
    return out


def unpack_int4_transposed(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The (in_features, out_features) bfloat16 weight, transposed, of an int4-packed layer.

    The CPU packing (``_convert_weight_to_int4pack_for_cpu`` with two inner k-tiles)
    stores each band of 64 output rows as 32 bytes per input column: byte ``j`` of column
    ``k`` holds row ``j`` in its low nibble and row ``j + 32`` in its high nibble. Each
    value is then ``q * s + (z - 8 s)`` (one fused multiply-add, rounded to bfloat16).
    Output rows must be a multiple of 64.
    """
    n, half_k = packed.shape
    k = 2 * half_k
    bands = packed.view(n // 64, k, 32).transpose(0, 1)  # (k, n/64, 32)
    q = torch.empty(k, n // 64, 2, 32, dtype=torch.uint8)
    torch.bitwise_and(bands, 0x0F, out=q[:, :, 0])
    torch.bitwise_right_shift(bands, 4, out=q[:, :, 1])
    scale, zero = scales[..., 0], scales[..., 1]  # (k/32, n) bfloat16
    offset = (zero.float() - 8 * scale.float()).to(torch.bfloat16).unsqueeze(1)  # (k/32, 1, n)
    values = q.view(k // INT4_GROUP, INT4_GROUP, n).to(torch.bfloat16)
    return torch.addcmul(offset, values, scale.unsqueeze(1)).view(k, n)


def _stored_rows(
    data: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int], what: str
) -> tuple[torch.Tensor, int]:
    """A 2-D GGUF tensor's bytes as a flat uint8 tensor, and the bytes of one row, after
    checking that rows are whole blocks and that the byte count matches ``shape``."""
    rows, cols = shape
    block_size, type_size = BLOCK_LAYOUTS[qtype]
    if cols % block_size:
        raise LlamalabError(
            f"{qtype.name} {what} of shape {shape}: {cols} is not a multiple of {block_size}"
        )
    row_bytes = cols // block_size * type_size
    raw = _flat_bytes(data)
    if raw.numel() != rows * row_bytes:
        raise LlamalabError(
            f"{qtype.name} {what} of shape {shape} needs {rows * row_bytes} bytes, got {raw.numel()}"
        )
    return raw, row_bytes


def _pick_kernel(absmax: float) -> Kernel:
    # fbgemm saturates out-of-range weights to +-65504 (with only a log warning):
    # such a matrix keeps float32 instead.
    if fp16_kernel_available() and absmax <= _FP16_MAX:
        return "fp16"
    return "float32"


def _prepack_fp16(half: torch.Tensor) -> torch.ScriptObject:
    # The op also accepts float32 and rounds it itself; giving it float16 means
    # no float32 copy of the whole matrix is ever needed (round-to-nearest-even
    # either way, so the packed values are the same).
    return torch.ops.quantized.linear_prepack_fp16(half, None)


def _flat_bytes(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    # llamalab.gguf.dequant's own conversion: no copy of a memory map, aligned for its views.
    return _as_bytes(data.cpu() if isinstance(data, torch.Tensor) else data)


def _row_bands(
    n_rows: int, raw: torch.Tensor, row_bytes: int
) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, n_rows, _ROW_CHUNK):
        stop = min(n_rows, start + _ROW_CHUNK)
        yield start, raw[start * row_bytes : stop * row_bytes]


# ---------------------------------------------------------------------------
# Swapping a Transformer's linears.
# ---------------------------------------------------------------------------


def quantizable_linears(model: nn.Module) -> list[str]:
    """Module names of the linears :func:`quantize_model` replaces: every ``nn.Linear``
    under ``layers.`` plus ``output``.

    A loader uses this list to know which ``<name>.weight`` tensors it must *not*
    load as float (they are built from GGUF bytes instead).
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("layers.") or name == "output"):
            if module.bias is not None:
                continue  # LLaMA has no biases; leave anything else alone
            names.append(name)
    return names


Source = GGUFWeight | torch.Tensor | QuantizedLinear
WeightSource = Mapping[str, Source] | Callable[[str], Source | None]


def quantize_model(
    model: nn.Module,
    weights: WeightSource | None = None,
    *,
    kernel: Kernel | None = None,
    progress: bool = False,
) -> list[str]:
    """Replace the model's ``layers.*`` and ``output`` linears by :class:`QuantizedLinear`.

    Args:
        model: a Transformer (its linears may live on the ``meta`` device when
            ``weights`` provides every one of them).
        weights: where each weight comes from, looked up by canonical parameter
            name (``"layers.0.attention.wq.weight"``): a mapping or a function
            returning a :class:`GGUFWeight` (raw bytes, built without a float32
            copy), a float tensor, or a :class:`QuantizedLinear` built already (taken as
            it is); ``None`` or a missing entry means the module's
            current float weight.  For a model with tied embeddings and no
            ``output.weight`` entry, ``output`` is built from
            ``tok_embeddings.weight``'s entry; the embedding itself is untouched
            (it stays a float lookup table; only the projection gets a packed copy).
        kernel: force ``"fp16"`` or ``"float32"``; default: fp16 where it can run.
        progress: show a bar on stderr as layers are packed (most of a load's time).

    Returns:
        The names of the replaced modules.
    """
    lookup = _as_lookup(weights)
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    replaced = []
    names = list(quantizable_linears(model))
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="packing", unit="layer", leave=False)
    for name in names:
        source = lookup(f"{name}.weight")
        if source is None and name == "output" and tied:
            source = lookup("tok_embeddings.weight")
        if source is None:
            weight = model.get_submodule(name).weight
            if weight.is_meta:
                raise LlamalabError(
                    f"no weight for {name}: the module is on the meta device and none was given"
                )
            source = weight
        if isinstance(source, QuantizedLinear):  # built already (a packed-weight cache's)
            layer = source
        elif isinstance(source, GGUFWeight):
            layer = QuantizedLinear.from_gguf(
                source.data, source.qtype, source.shape, kernel=kernel
            )
        else:
            layer = QuantizedLinear.from_float(source, kernel=kernel)
        old = model.get_submodule(name)
        if (layer.out_features, layer.in_features) != (old.out_features, old.in_features):
            raise LlamalabError(
                f"{name}: weight of shape {(layer.out_features, layer.in_features)}, "
                f"the model needs {(old.out_features, old.in_features)}"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
    return replaced


def _as_lookup(weights: WeightSource | None) -> Callable[[str], Source | None]:
    if weights is None:
        return lambda name: None
    if isinstance(weights, Mapping):
        return weights.get
    return weights


def fuse_projections(model: nn.Module) -> int:
    """Merge each layer's packed q/k/v projections into one ``wqkv``, and w1/w3 into ``w13``.

    Every packed call has a fixed cost that dominates for small decode matmuls; one
    576→960 call is cheaper than 576→576 + 2 × 576→192. The merged weights are the same
    values, so outputs do not change. Parts on different kernels (a Q4_K_M file keeps
    ``attn_v`` in Q6_K) stay apart. Returns the number of layers fused.
    """
    fused = 0
    for layer in getattr(model, "layers", []):
        attention, ffn = layer.attention, layer.feed_forward
        done = False
        for owner, names, target in (
            (attention, ("wq", "wk", "wv"), "wqkv"),
            (ffn, ("w1", "w3"), "w13"),
        ):
            merged = _concat([getattr(owner, name) for name in names])
            if merged is None:
                continue
            setattr(owner, target, merged)
            for name in names:
                delattr(owner, name)
            done = True
        fused += done
    return fused


def _concat(layers: list[nn.Module]) -> QuantizedLinear | None:
    """One layer computing every part's outputs side by side, or None where they cannot join."""
    if not all(isinstance(p, QuantizedLinear) for p in layers):
        return None
    kernels = {p.kernel for p in layers}
    in_features = layers[0].in_features
    out_features = sum(p.out_features for p in layers)
    source = layers[0].source_type
    # A vnni buffer is whole tiles of 16 rows one after another: parts of one layout join.
    if kernels == {"vnni"} and len({p._vnni[1] for p in layers}) == 1:
        buffers = [p._vnni[0] for p in layers]
        joined = _adjacent_view(buffers)
        vnni = (torch.cat(buffers) if joined is None else joined, layers[0]._vnni[1])
        return QuantizedLinear(in_features, out_features, None, None, source, vnni=vnni)
    if kernels == {"fp16"}:
        weight = torch.cat([p.dequantized_weight() for p in layers])  # exact: float16 → float32
        return QuantizedLinear.from_float(weight, kernel="fp16", source_type=source)
    # The int4 layout tiles output rows in 64s: parts that are whole tiles concatenate as stored.
    if kernels == {"int4"} and all(p.out_features % 64 == 0 for p in layers):
        packed = torch.cat([p._int4[0] for p in layers])
        scales = torch.cat([p._int4[1] for p in layers], dim=1).contiguous()
        return QuantizedLinear(in_features, out_features, None, None, source, int4=(packed, scales))
    return None


def _adjacent_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over 1-D uint8 tensors that lie one after another in one storage (a
    packed-weight cache file writes fused parts so), or None where they do not."""
    storage = parts[0].untyped_storage()
    at = parts[0].storage_offset()
    for part in parts:
        if (
            part.dim() != 1
            or part.dtype != torch.uint8
            or not part.is_contiguous()
            or part.untyped_storage().data_ptr() != storage.data_ptr()
            or part.storage_offset() != at
        ):
            return None
        at += part.numel()
    start = parts[0].storage_offset()
    return torch.empty(0, dtype=torch.uint8).set_(storage, start, (at - start,))
