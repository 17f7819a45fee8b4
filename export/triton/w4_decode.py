"""Packed 4-bit weight codes -> the E4M3 B operand of an FP8 GEMM: bandwidth-bound Triton kernels, one launch per
layer (``_decode_kernel``) or per group of consecutive layers (``_decode_group_kernel``: 15 launches per SD1.5 step
instead of 280 launch-bound ones).

Layout ("halves"): a row of K codes is stored as K/2 bytes, byte j holding code j in its low nibble and code
j + K/2 in its high nibble. The decode then writes two contiguous runs per row (no interleave of nibbles, no
transpose), every load and store coalesced: 0.5 byte read and 1 byte written per weight. Each code maps to its
E4M3 bit pattern through a 16-byte table (``fast_ops.e4m3_lut``: every 4-bit grid value here is exact in E4M3).

This replaces the decode Inductor generated from pointwise torch ops, which it fused horizontally with the
activation's quantization (both feed the same ``_scaled_mm``) into kernels ~20x slower than the traffic allows.
``fast_ops`` registers the launcher as the torch.library op ``msfp_fast::decode_w4`` (opaque to Inductor, captured
by CUDA graphs); the Triton interpreter runs it on the CPU for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_w4_triton", "decode_w4_group_triton"]


@triton.jit
def _decode_kernel(p_ptr, lut_ptr, set_ptr, out_ptr, half, total, HAS_SET: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    base = 0
    if HAS_SET:  # TALoRA: the set is chosen on the device (timestep table), so no host sync and no copy of the set
        base = tl.load(set_ptr).to(tl.int64) * total
    p = tl.load(p_ptr + base + i, mask=mask, other=0).to(tl.int32)
    lo = tl.load(lut_ptr + (p & 15))
    hi = tl.load(lut_ptr + (p >> 4))
    o = i + (i // half) * half  # row n, byte j: out[n * K + j] and out[n * K + j + K/2]
    tl.store(out_ptr + o, lo, mask=mask)
    tl.store(out_ptr + o + half, hi, mask=mask)


def decode_w4_triton(packed: torch.Tensor, lut: torch.Tensor, set_index: torch.Tensor | None = None,
                     block: int = 4096) -> torch.Tensor:
    """packed uint8 [S, N, K/2] (fast_ops.pack_halves layout), lut uint8 [16] (fast_ops.e4m3_lut), set_index int64 [1] or None (set
    0) -> E4M3 [N, K], row-major (its transpose is the column-major B that ``torch._scaled_mm`` wants)."""
    s, n, half = packed.shape
    out = torch.empty((n, 2 * half), dtype=torch.float8_e4m3fn, device=packed.device)
    total = n * half
    if total == 0:
        return out
    sel = set_index if set_index is not None else packed
    _decode_kernel[(triton.cdiv(total, block),)](packed, lut, sel, out.view(torch.uint8), half, total,
                                                 HAS_SET=set_index is not None, BLOCK=block, num_warps=8)
    return out


@triton.jit
def _decode_group_kernel(p_ptr, lut_ptr, row_lut_ptr, layer_ptr, meta_ptr, out_ptr, BLOCK: tl.constexpr):
    # One program = BLOCK int32 words (4 packed bytes = 8 codes each) of one layer; layers start on block boundaries.
    # Word granularity: 16-byte vector loads, 4-byte stores, one row computation per 4 bytes. The byte-wise kernel
    # this replaces (an int32 division, a table-row gather, two table gathers and two 1-byte stores per packed byte)
    # ran at ~1 TB/s in situ: 1.24 ms per SD1.5 step against 0.46 ms now, the speed of a device copy of the decoded
    # bytes (docs/triton.md; a 256-entry pair table and an in-register table were not faster).
    pid = tl.program_id(0)
    layer = tl.load(layer_ptr + pid)
    seg = tl.load(meta_ptr + 4 * layer)  # the layer's first word
    half = tl.load(meta_ptr + 4 * layer + 1)  # words per half row (K / 8)
    total = tl.load(meta_ptr + 4 * layer + 2)  # the layer's packed words
    row0 = tl.load(meta_ptr + 4 * layer + 3)
    w = tl.load(p_ptr + pid * BLOCK + tl.arange(0, BLOCK))  # whole blocks (zero padding past each layer)
    first = pid * BLOCK - seg
    mask = first + tl.arange(0, BLOCK) < total
    # row = the block's first row + floor(c / half) for c < BLOCK + half, in float32 (faster than an int32 division):
    # exact while BLOCK + half < 2^21, the quotient's rounding error staying below the 0.5 / half margin of (c + 0.5)
    r0 = first // half
    c = (first - r0 * half + tl.arange(0, BLOCK)).to(tl.float32)
    row = r0 + ((c + 0.5) * (1.0 / half.to(tl.float32))).to(tl.int32)
    fmt = tl.load(row_lut_ptr + row0 + row, mask=mask, other=0).to(tl.int32) * 16  # merged layers mix formats by row
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(4):
        b = (w >> (8 * k)) & 255
        lo = lo | (tl.load(lut_ptr + fmt + (b & 15)).to(tl.int32) << (8 * k))
        hi = hi | (tl.load(lut_ptr + fmt + (b >> 4)).to(tl.int32) << (8 * k))
    o = 2 * seg + first + tl.arange(0, BLOCK) + row * half  # row n, word j: out[n * K/4 + j], out[n * K/4 + j + K/8]
    tl.store(out_ptr + o, lo, mask=mask)
    tl.store(out_ptr + o + half, hi, mask=mask)


def decode_w4_group_triton(packed: torch.Tensor, luts: torch.Tensor, row_lut: torch.Tensor, block_layer: torch.Tensor,
                           meta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every layer of a decode group in one launch (``fast_ops.decode_w4_group`` describes the arguments); into
    ``out`` (E4M3 [2P]) when given (``graphed.DecodePrefetch``'s buffers)."""
    if out is None:
        out = torch.empty(2 * packed.numel(), dtype=torch.float8_e4m3fn, device=packed.device)
    elif out.dtype != torch.float8_e4m3fn or out.numel() != 2 * packed.numel() or not out.is_contiguous():
        raise ValueError(f"decode group output must be contiguous E4M3 of {2 * packed.numel()} elements")
    blocks = block_layer.numel()
    if blocks == 0:
        return out
    _decode_group_kernel[(blocks,)](packed.view(torch.int32), luts, row_lut, block_layer, meta, out.view(torch.int32),
                                    BLOCK=packed.numel() // 4 // blocks, num_warps=8)
    return out
