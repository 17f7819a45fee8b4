"""W4A8 GEMM for small M: E4M3 activations times packed 4-bit weights decoded to E4M3 in registers.

At batch 1 the SD1.5 step decodes 430 MB of packed codes to 860 MB of E4M3 (``w4_decode``) that the cuBLAS FP8 GEMM
then reads again: 2.5 bytes moved per weight where the GEMM is weight-bandwidth-bound (M of at most ~1024 tokens, the
low-resolution levels that hold most of the weights). This kernel reads the packed "halves" bytes (0.5 byte per
weight), maps each 4-bit code to its E4M3 bit pattern through the layer's 16-entry table (``fast_ops.e4m3_lut``;
merged layers pick a table per output row, as the group decode does) and feeds ``tl.dot`` on FP8 operands (wgmma on
Hopper) with fp32 accumulation. At large M the GEMM is compute-bound and cuBLAS wins (a Triton W4A4 GEMM decoding in
registers was 3.1x slower than cuBLAS at 4096^3): the point here is small M only.

Halves layout: byte j of a row holds code j (low nibble) and code j + K/2 (high nibble), so one tile of packed bytes
gives two K-slices of the weight row, each multiplied with its own K-slice of A: two ``tl.dot`` per tile.

Split-K: for small M the output tiles alone do not fill 132 SMs, so the K loop is cut into ``split`` ranges, each
writing an fp32 partial product [split, M, N]; the caller sums them (``FastGemm`` does, in the pointwise epilogue
Inductor fuses: no extra launch). The column scale and bias stay in that epilogue, as for ``torch._scaled_mm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["w4a8_gemm_triton"]


@triton.jit
def _w4a8_kernel(a_ptr, p_ptr, luts_ptr, row_lut_ptr, out_ptr, M, N, HALF, iters_per_split, s_am, s_pn, s_os, s_om,
                 BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BKH)
    mmask, nmask = rm < M, rn < N
    table = tl.load(row_lut_ptr + rn, mask=nmask, other=0).to(tl.int32)[:, None] * 16  # each row's code table
    a_rows = a_ptr + rm[:, None].to(tl.int64) * s_am
    p_rows = p_ptr + rn[:, None].to(tl.int64) * s_pn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for it in range(iters_per_split):
        j = (pid_s * iters_per_split + it) * BKH + kk  # byte j of the half row: codes j and j + K/2
        jmask = (j < HALF)[None, :]
        # masked bytes decode to code 0's value, multiplied by A's masked +0.0: no contribution
        p = tl.load(p_rows + j[None, :], mask=nmask[:, None] & jmask, other=0).to(tl.int32)
        w_lo = tl.load(luts_ptr + table + (p & 15)).to(tl.float8e4nv, bitcast=True)
        w_hi = tl.load(luts_ptr + table + (p >> 4)).to(tl.float8e4nv, bitcast=True)
        amask = mmask[:, None] & jmask
        a_lo = tl.load(a_rows + j[None, :], mask=amask, other=0).to(tl.float8e4nv, bitcast=True)
        a_hi = tl.load(a_rows + HALF + j[None, :], mask=amask, other=0).to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(a_lo, tl.trans(w_lo), acc)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc)
    out = out_ptr + pid_s * s_os + rm[:, None].to(tl.int64) * s_om + rn[None, :]
    tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])


def w4a8_gemm_triton(a: torch.Tensor, packed: torch.Tensor, luts: torch.Tensor, row_lut: torch.Tensor,
                     split: int, bm: int, bn: int, bkh: int, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """a E4M3 [M, K] (rows contiguous), packed uint8 [N, K/2] (``fast_ops.pack_halves``), luts uint8 [U, 16],
    row_lut uint8 [N] (the table of each weight row) -> fp32 partial products [split, M, N] (their sum is
    a @ W^T). ``fast_ops.w4a8_config`` picks split and the tiles."""
    m, k = a.shape
    n, half = packed.shape
    if k != 2 * half or a.stride(1) != 1 or packed.stride(1) != 1:
        raise ValueError(f"w4a8_gemm: A [{m}, {k}] and packed [{n}, {half}] (K/2) must match, rows contiguous")
    out = torch.empty((split, m, n), dtype=torch.float32, device=a.device)
    iters = triton.cdiv(half, bkh)
    per_split = triton.cdiv(iters, split)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _w4a8_kernel[grid](a.view(torch.uint8), packed, luts, row_lut, out, m, n, half, per_split, a.stride(0),
                       packed.stride(0), out.stride(0), out.stride(1), BM=bm, BN=bn, BKH=bkh,
                       num_warps=num_warps, num_stages=num_stages)
    return out
