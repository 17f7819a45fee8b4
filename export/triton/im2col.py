"""NHWC im2col of E4M3 activations in one Triton kernel: the A operand of a k x k conv as an FP8 GEMM.

Row m = (b, oh, ow) of the output holds the kh*kw input pixels the conv reads there, K ordered (kh, kw, c), with
E4M3 +0.0 (byte 0, grid value 0) where the window hangs over the padding. Inductor lowered the same thing, written
as a ``cat`` of kh*kw strided slices of a padded copy, into one copy kernel per slice plus the padded copy (10
launches per conv); this kernel reads the unpadded NHWC input once per tap through L2 and writes every output byte
once. ``fast_ops`` registers it as ``msfp_fast::im2col_e4m3``; the Triton interpreter runs it on the CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_ops import conv_out_size

__all__ = ["im2col_triton"]


@triton.jit
def _im2col_kernel(x_ptr, out_ptr, M, C, H, W, HO, WO, SH, SW, TOP, LEFT,
                   KW: tl.constexpr, KHW: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    tap = tl.program_id(2)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ow = m % WO
    oh = (m // WO) % HO
    b = m // (WO * HO)
    ih = oh * SH - TOP + tap // KW
    iw = ow * SW - LEFT + tap % KW
    rows = m < M
    inside = rows & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    cm = c < C
    src = ((b * H + ih) * W + iw).to(tl.int64) * C
    v = tl.load(x_ptr + src[:, None] + c[None, :], mask=inside[:, None] & cm[None, :], other=0)
    dst = m.to(tl.int64) * (KHW * C) + tap * C
    tl.store(out_ptr + dst[:, None] + c[None, :], v, mask=rows[:, None] & cm[None, :])


def im2col_triton(x: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int],
                  bm: int = 32, bc: int = 128, num_warps: int = 4) -> torch.Tensor:
    """x [B, H, W, C] E4M3 (any 1-byte dtype), contiguous -> [B*Ho*Wo, kh*kw*C] of the same dtype."""
    x = x.contiguous()
    b, h, w, c = x.shape
    ho, wo = conv_out_size(h, w, kernel, stride, pads)
    khw = kernel[0] * kernel[1]
    m = b * ho * wo
    out = torch.empty((m, khw * c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bc = min(bc, triton.next_power_of_2(c))
    grid = (triton.cdiv(m, bm), triton.cdiv(c, bc), khw)
    _im2col_kernel[grid](x.view(torch.uint8), out.view(torch.uint8), m, c, h, w, ho, wo, stride[0], stride[1],
                         pads[2], pads[0], KW=kernel[1], KHW=khw, BM=bm, BC=bc, num_warps=num_warps)
    return out
