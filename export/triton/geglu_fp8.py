"""GEGLU with its quantizer in the FP8 GEMM's epilogue (opt-in lever for SD1.5 at batch 8, not measured on a GPU yet):
``build_fast(geglu="fused")`` runs it as the CUDA implementation of the op ``msfp_fast::gemm_geglu_e4m3``
(``fast_ops``; its CPU implementation is ``geglu_quant_reference``), one per transformer block
(``fast._fuse_geglu``); ``tools/bench_gpu_sd15.py --variant geglu:8`` times the step with it.

In the fast path a transformer block's feed-forward is ``FastGemm`` (ff.net.0.proj: [M, K] x [2F, K]^T, bf16 out)
-> split -> ``a * gelu(gate)`` -> the next ``FastGemm``'s quantizer (grid values as E4M3). Inductor fuses the split,
GELU, product and quantizer into one pointwise kernel, but the GEMM writes its 2F-wide bf16 output and that kernel
reads it back: at SD1.5's 64x64 level, batch 8, 2 x 32768 x 2560 x 2 bytes = 335 MB a call (~80 us at the H200's copy
bandwidth; the geglu category ran at 46% of it in session 14's roofline, 0.51 ms above). Here one Triton program
computes the same rows of both halves (the value columns n and the gate columns F + n: two accumulators), applies
FastGemm's epilogue (the fp32 sum rounded to bf16 as cuBLAS writes it, times the column scale, plus beta), GELU
(erf form) and the product in float32, as Inductor's one kernel computes the unfused chain (it drops eager's
intermediate bf16 roundings; ``eager_rounding``: each step rounded to bf16 as the eager ops store it), and the next
layer's quantizer (IEEE division, as torch's), and stores only the E4M3 grid values [M, F] the next GEMM reads (1
byte an element).

Exact against ``geglu_quant_reference`` (the same ops) where the fp32 sums are exact (grid operands) and GELU's
erf rounds alike (Triton's erf and torch's may differ in the last fp32 bit, which flips a code rarely; FMA
contraction of the epilogue likewise): tests/export/test_fast_kernels.py. Formats: grid_round's "int" and "fp"
kinds, signed or unsigned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast import _spec
from .fast_ops import geglu_quant_reference  # the eager ops this kernel fuses (re-exported)
from .kernels import INTERPRET, _grouped_tile, _round_bf16

__all__ = ["gemm_geglu_e4m3", "geglu_quant_reference", "GEGLU_TILE"]

_FP8 = torch.float8_e4m3fn


@triton.jit
def _rne_small(t):
    """Round non-negative fp32 t < 2^22 to an integer, half to even (the 1.5 * 2^23 addend fixes the ulp at 1)."""
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _gemm_geglu_kernel(a_ptr, w_ptr, sb_ptr, beta_ptr, out_ptr, M, F, K, q_s, q_z,
                       QMAX: tl.constexpr, IS_INT: tl.constexpr, SIGNED: tl.constexpr, SUB_UP: tl.constexpr,
                       SUB_DOWN: tl.constexpr, MIN_NORMAL: tl.constexpr, DROP: tl.constexpr, HALF: tl.constexpr,
                       KEEP: tl.constexpr, EAGER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(F, BN), GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < F
    kk = tl.arange(0, BK)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * K
    h_rows = w_ptr + cols.to(tl.int64)[:, None] * K  # value columns n
    g_rows = w_ptr + (cols + F).to(tl.int64)[:, None] * K  # gate columns F + n
    acc_h = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + kk < K)[None, :]
        a = tl.load(a_rows + k0 + kk[None, :], mask=rmask[:, None] & kmask, other=0.0)
        wh = tl.load(h_rows + k0 + kk[None, :], mask=cmask[:, None] & kmask, other=0.0)
        wg = tl.load(g_rows + k0 + kk[None, :], mask=cmask[:, None] & kmask, other=0.0)
        acc_h = tl.dot(a, wh.T, acc_h)
        acc_g = tl.dot(a, wg.T, acc_g)
    # FastGemm's epilogue on each half: bf16(sum) * scale_b + beta (the GEMM's output is bf16 in memory either way);
    # EAGER: each step rounded to bf16 as eager ops store it, else float32 throughout as Inductor's fused kernel
    # computes the unfused chain (it drops intermediate downcasts: emulate_precision_casts is off)
    sb_h = tl.load(sb_ptr + cols, mask=cmask, other=0.0)[None, :]
    sb_g = tl.load(sb_ptr + F + cols, mask=cmask, other=0.0)[None, :]
    be_h = tl.load(beta_ptr + cols, mask=cmask, other=0.0)[None, :]
    be_g = tl.load(beta_ptr + F + cols, mask=cmask, other=0.0)[None, :]
    h = _round_bf16(acc_h) * sb_h + be_h
    g = _round_bf16(acc_g) * sb_g + be_g
    if EAGER:
        h = _round_bf16(h)
        g = _round_bf16(g)
    gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    if EAGER:
        gelu = _round_bf16(gelu)
    y = h * gelu
    if EAGER:
        y = _round_bf16(y)
    # the next layer's quantizer: grid_round((y - z) / s) (fast.grid_round, "int" and "fp" kinds)
    v = tl.math.div_rn(y - q_z, q_s)  # IEEE division, as torch's and Inductor's (Triton's `/` is approximate)
    if SIGNED:
        mag = tl.abs(v)
    else:
        mag = tl.maximum(v, 0.0)
    mag = tl.minimum(mag, QMAX)
    if IS_INT:
        r = _rne_small(mag)
    else:
        sub = _rne_small(mag * SUB_UP) * SUB_DOWN  # the subnormal range: exact power-of-two scalings
        bits = mag.to(tl.int32, bitcast=True)
        bits = (bits + HALF + ((bits >> DROP) & 1)) & KEEP  # RNE to the format's mantissa bits (fast._bit_rne)
        r = tl.where(mag < MIN_NORMAL, sub, bits.to(tl.float32, bitcast=True))
    if SIGNED:  # copysign, -0.0 included (v's sign bit onto r)
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        r = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        r = r + 0.0  # -0.0 -> +0.0, as grid_round
    out = out_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(out, r.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


GEGLU_TILE = (128, 64, 128, 8, 3)  # BM, BN, BK, warps, stages on the GPU (two accumulators: BN 64 keeps it at 128x128)
_INTERP_TILE = (16, 16, 32, 1, 1)


def gemm_geglu_e4m3(a: torch.Tensor, w: torch.Tensor, scale_b: torch.Tensor, beta: torch.Tensor, q_scale: float,
                    q_zero: float, qfmt: str, tile: tuple[int, int, int, int, int] | None = None,
                    eager_rounding: bool = False) -> torch.Tensor:
    """a E4M3 [M, K] (the block's quantized input), w E4M3 [2F, K] (ff.net.0.proj: value rows, then gate rows),
    scale_b / beta float32 [2F] (FastGemm's column scale and bias) -> E4M3 [M, F]: the grid values of
    ``quantize(a_half * gelu(gate_half), q_scale, q_zero, qfmt)``, what the next FastGemm multiplies.
    ``eager_rounding``: the epilogue, GELU and product each rounded to bf16 (eager's numerics) instead of float32
    (Inductor's, as the default build computes them); ``geglu_quant_reference`` with the same flag."""
    f = _spec(qfmt)
    if f.kind not in ("int", "fp"):
        raise ValueError(f"gemm_geglu_e4m3: format {qfmt!r} is not of grid_round's int or fp kind")
    m, k = a.shape
    n2, k2 = w.shape
    if k2 != k or n2 % 2 or scale_b.numel() != n2 or beta.numel() != n2:
        raise ValueError(f"gemm_geglu_e4m3: a {tuple(a.shape)}, w {tuple(w.shape)}, scale_b {scale_b.numel()}, "
                         f"beta {beta.numel()} (w [2F, K], vectors of 2F)")
    fo = n2 // 2
    bm, bn, bk, warps, stages = tile or (_INTERP_TILE if INTERPRET or a.device.type != "cuda" else GEGLU_TILE)
    out = torch.empty(m, fo, dtype=_FP8, device=a.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(fo, bn),)
    drop = 23 - f.man_bits  # the format's constants in Python: no constexpr arithmetic in the kernel
    _gemm_geglu_kernel[grid](a.contiguous(), w.contiguous(), scale_b.float().contiguous(), beta.float().contiguous(),
                             out, m, fo, k, float(q_scale), float(q_zero), QMAX=float(f.max),
                             IS_INT=f.kind == "int", SIGNED=f.signed, SUB_UP=2.0 ** (f.man_bits - f.emin),
                             SUB_DOWN=2.0 ** (f.emin - f.man_bits), MIN_NORMAL=2.0 ** f.emin, DROP=drop,
                             HALF=(1 << (drop - 1)) - 1, KEEP=-(1 << drop), EAGER=bool(eager_rounding), BM=bm,
                             BN=bn, BK=bk, GROUP_M=8,
                             num_warps=warps, num_stages=stages)
    return out
