"""torch.library custom ops of the ``msfp`` namespace.

``torch.ops.msfp.quantize(x, scale, zero_point, fmt)`` is fake quantization onto ``zero_point + scale * grid(fmt)``
(scale and zero_point are tensors broadcastable to x: a scalar per tensor or a per-channel column). Being one
opaque op, it survives torch.export as a single node, which the ONNX lowering maps to ``msfp.QuantizeFP``.

``torch.ops.msfp.dequantize_packed(packed, scale, fmt, shape)`` decodes 4-bit codes stored two per byte.

Gradients (for fine-tuning): straight-through for x inside the clip range, LSQ-style for the scale
(d q / d s = round(v) - v inside, the clip level outside) and the zero point (1 outside the range, 0 inside).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .formats import Format, parse_format

__all__ = ["quantize", "quantize_folded", "dequantize_packed", "get_format", "pack_codes", "unpack_codes", "QUANTIZE",
           "QUANTIZE_FOLDED", "DEQUANTIZE_PACKED"]


@lru_cache(maxsize=None)
def get_format(fmt: str) -> Format:
    return parse_format(fmt)


@torch.library.custom_op("msfp::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    """Fake-quantize x onto zero_point + scale * grid(fmt), round to nearest, ties to even code, saturating."""
    f = get_format(fmt)
    q = zero_point + f.round_to_grid((x - zero_point) / scale) * scale
    # Keep x's strides (as the fake impl promises): downstream views were traced against that layout.
    return torch.empty_like(x).copy_(q)


@quantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("msfp::quantize_folded", mutates_args=())
def quantize_folded(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    """quantize(x) - zero_point, computed exactly as scale * grid value: the consumer's bias carries the zero point."""
    q = get_format(fmt).round_to_grid((x - zero_point) / scale) * scale
    return torch.empty_like(x).copy_(q)


@quantize_folded.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.empty_like(x)


def _sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of a (per-tensor or per-channel) parameter."""
    return g.sum_to_size(like.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, scale, zero_point, fmt = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.fmt = fmt


def _backward(ctx, grad: torch.Tensor):
    x, scale, zero_point = ctx.saved_tensors
    f = get_format(ctx.fmt)
    v = (x - zero_point) / scale
    inside = (v >= f.min) & (v <= f.max)
    gx = grad * inside if ctx.needs_input_grad[0] else None
    gs = gz = None
    if ctx.needs_input_grad[1]:
        q = f.round_to_grid(v)
        gs = _sum_to(grad * torch.where(inside, q - v, q), scale)
    if ctx.needs_input_grad[2]:
        gz = _sum_to(grad * (~inside), zero_point)
    return gx, gs, gz, None


quantize.register_autograd(_backward, setup_context=_setup_context)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15), any shape -> flat uint8 with two codes per byte (element 2i in the low nibble)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: flat uint8 codes of length numel."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(-1)[:numel]


@torch.library.custom_op("msfp::dequantize_packed", mutates_args=())
def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, fmt: str, shape: list[int]) -> torch.Tensor:
    """Decode packed 4-bit weight codes to float32 ``scale * code_table[code]`` of the given shape."""
    numel = 1
    for s in shape:
        numel *= s
    codes = unpack_codes(packed, numel).reshape(shape)
    return get_format(fmt).decode(codes) * scale


@dequantize_packed.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, fmt: str, shape: list[int]) -> torch.Tensor:
    return packed.new_empty(shape, dtype=torch.float32)


# The op overloads as fx node targets: passes, the lowering and the Triton runner match nodes against these names.
QUANTIZE = torch.ops.msfp.quantize.default
QUANTIZE_FOLDED = torch.ops.msfp.quantize_folded.default
DEQUANTIZE_PACKED = torch.ops.msfp.dequantize_packed.default
