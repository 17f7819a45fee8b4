"""Flash attention (forward) that applies the Q/K/V fake quantizers as it loads its operands.

In the fast path Q, K and V are parts of one merged GEMM's bf16 output, each fake-quantized (``fast.fake_quant``)
before ``scaled_dot_product_attention``. This kernel reads the GEMM output itself ([B, L, heads * d], any row
stride: a part of the merged output is a strided view) and quantizes each tile on load, bit for bit as
``fast.fake_quant`` does (the same float32 operations: IEEE division, round half to even on the code, the bf16
cast last; compiled without FMA contraction so ``s * r + z`` rounds twice as in the reference), so the separate
quantizer kernels and their bf16 round trip disappear. Attention itself is the online-softmax flash loop (bf16
MMAs, float32 accumulators, base-2 exponentials with the softmax scale folded into log2(e)); its rounding differs
from cuDNN's (another summation order, P rounded to bf16 before the second MMA as FlashAttention does).

Target: the 64x64 level of SD1.5 (4096 tokens, 8 heads, head dim 40, padded to 64 in the tiles), where cuDNN's
flash kernel takes ~0.58 ms per self-attention at batch 8 against ~0.28 ms of MMA time (docs/triton.md, session
9). Quantizing K and V on load repeats their quantizer once per query block (Lq / BLOCK_M times): ``quantize``
chooses per operand, so a benchmark can time K and V quantized beforehand too.

``fast_ops`` registers the launcher as ``msfp_fast::attention_fq``; the Triton interpreter runs it for the tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kernels import INTERPRET

__all__ = ["AttnConfig", "QuantParams", "attention_fq_triton", "quant_params", "fake_quant_triton"]


class QuantParams(NamedTuple):
    """A per-tensor fake quantizer in the form the kernel takes (``fast._spec`` of its format)."""

    scale: float
    zero: float
    vmax: float
    fsub: float  # 2^(M - emin): the subnormal range's code step (1 for int formats: torch.round(a))
    finv: float
    thr: float  # 2^emin: below it the code step is fixed (inf for int formats)
    signed: bool
    folded: bool
    drop: int  # 23 - M: the float32 mantissa bits the normal range drops


class AttnConfig(NamedTuple):
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT = AttnConfig()


def quant_params(scale: float, zero: float, fmt: str, folded: bool) -> QuantParams:
    """QuantParams of ``fast.fake_quant(x, scale, zero, fmt, folded)``; ValueError for table-kind formats."""
    from .fast import _spec

    f = _spec(fmt)
    if f.kind not in ("int", "fp"):
        raise ValueError(f"format {fmt}: no bit-rounding form for the attention kernel")
    m, emin = (0, 0) if f.kind == "int" else (f.man_bits, f.emin)
    return QuantParams(float(scale), float(zero), float(f.max), 1.0 if f.kind == "int" else 2.0 ** (m - emin),
                       1.0 if f.kind == "int" else 2.0 ** (emin - m), math.inf if f.kind == "int" else 2.0 ** emin,
                       bool(f.signed), bool(folded), 23 - m)


@triton.jit
def _fq(x, s, z, vmax, fsub, finv, thr, SIGNED: tl.constexpr, FOLDED: tl.constexpr, DROP: tl.constexpr):
    """fast.fake_quant of float32 x, float32 result (the caller rounds it to bf16 once, as the reference)."""
    v = tl.math.div_rn(x - z, s)
    if SIGNED:
        a = tl.abs(v)
    else:
        a = tl.maximum(v, 0.0)
    a = tl.minimum(a, vmax)
    y = a * fsub
    sub = ((y + 12582912.0) - 12582912.0) * finv  # 1.5 * 2^23: round half to even for 0 <= y < 2^22
    bits = a.to(tl.int32, bitcast=True)
    rne = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & ~((1 << DROP) - 1)
    r = tl.where(a < thr, sub, rne.to(tl.float32, bitcast=True))
    if SIGNED:  # copysign(r, v), r >= 0
        r = (r.to(tl.uint32, bitcast=True) | (v.to(tl.uint32, bitcast=True) & 0x80000000)).to(tl.float32,
                                                                                              bitcast=True)
    else:
        r = r + 0.0
    q = r * s
    if not FOLDED:
        q = q + z
    return q


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    """acc + a @ b: bf16 MMA, float32 accumulation. IEEE_F32 (the interpreter: its bf16 dot returned sums off by
    ~1e10 on a 16x16 test in Triton 3.9): the same bf16 values as float32 operands, exact products, float32 sums."""
    if IEEE_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _bf16_rne(x):
    """float32 -> bf16, nearest, ties to even, on the bits: the hardware conversion's result (the interpreter of
    Triton 3.9 rounds negative values toward zero here instead; NaN is not handled)."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fq_kernel(x_ptr, o_ptr, n, s, z, vmax, fsub, finv, thr, SIGNED: tl.constexpr, FOLDED: tl.constexpr,
               DROP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    q = _fq(x, s, z, vmax, fsub, finv, thr, SIGNED, FOLDED, DROP)
    if o_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(o_ptr + i, _bf16_rne(q), mask=i < n)
    else:
        tl.store(o_ptr + i, q, mask=i < n)


def fake_quant_triton(x: torch.Tensor, p: QuantParams, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernel's quantizer on a whole tensor (what the attention kernel applies to each tile it loads)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    _fq_kernel[(triton.cdiv(n, 1024),)](x, out, n, p.scale, p.zero, p.vmax, p.fsub, p.finv, p.thr, p.signed,
                                        p.folded, p.drop, BLOCK=1024, enable_fp_fusion=False)
    return out


@triton.jit
def _load_fq(ptr, row_ok, col_ok, QUANT: tl.constexpr, s, z, vmax, fsub, finv, thr,
             SIGNED: tl.constexpr, FOLDED: tl.constexpr, DROP: tl.constexpr):
    """A tile, fake-quantized, bf16; zero outside the tensor (where the quantizer of a 0 need not be 0)."""
    ok = row_ok & col_ok
    x = tl.load(ptr, mask=ok, other=0.0)
    if QUANT:
        x = _bf16_rne(_fq(x.to(tl.float32), s, z, vmax, fsub, finv, thr, SIGNED, FOLDED, DROP))
        x = tl.where(ok, x, 0.0)
    return x.to(tl.bfloat16)


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, sq_b, sq_l, sk_b, sk_l, sv_b, sv_l, so_b, so_l, Lq, Lk, qk_scale,
                 qs, qz, qvmax, qfsub, qfinv, qthr, ks, kz, kvmax, kfsub, kfinv, kthr,
                 vs, vz, vvmax, vfsub, vfinv, vthr,
                 Q_QUANT: tl.constexpr, Q_SIGNED: tl.constexpr, Q_FOLDED: tl.constexpr, Q_DROP: tl.constexpr,
                 K_QUANT: tl.constexpr, K_SIGNED: tl.constexpr, K_FOLDED: tl.constexpr, K_DROP: tl.constexpr,
                 V_QUANT: tl.constexpr, V_SIGNED: tl.constexpr, V_FOLDED: tl.constexpr, V_DROP: tl.constexpr,
                 H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, IEEE_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_fq(q_ptr + b * sq_b + offs_m[:, None] * sq_l + h * D + offs_d[None, :], offs_m[:, None] < Lq,
                 d_ok[None, :], Q_QUANT, qs, qz, qvmax, qfsub, qfinv, qthr, Q_SIGNED,
                 Q_FOLDED, Q_DROP)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * sk_b + h * D
    v_base = v_ptr + b * sv_b + h * D
    for start in range(0, Lk, BLOCK_N):
        n = start + offs_n
        n_ok = n < Lk
        # K^T tile [BLOCK_D, BLOCK_N]
        kt = _load_fq(k_base + n[None, :] * sk_l + offs_d[:, None], d_ok[:, None],
                      n_ok[None, :], K_QUANT, ks, kz, kvmax, kfsub, kfinv, kthr, K_SIGNED, K_FOLDED, K_DROP)
        s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE_F32) * qk_scale
        if not EVEN_K:  # the last key block runs past Lk
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_fq(v_base + n[:, None] * sv_l + offs_d[None, :], n_ok[:, None],
                     d_ok[None, :], V_QUANT, vs, vz, vvmax, vfsub, vfinv, vthr, V_SIGNED, V_FOLDED, V_DROP)
        acc = _dot(p.to(tl.bfloat16), v, acc * alpha[:, None], IEEE_F32)
        m_i = m_new
    out = acc / l_i[:, None]
    o = o_ptr + b * so_b + offs_m[:, None] * so_l + h * D + offs_d[None, :]
    tl.store(o, _bf16_rne(out), mask=(offs_m[:, None] < Lq) & d_ok[None, :])


_NONE = QuantParams(1.0, 0.0, 0.0, 1.0, 1.0, 0.0, False, True, 23)


def attention_fq_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        quants: tuple[QuantParams | None, QuantParams | None, QuantParams | None],
                        scale: float | None = None, config: AttnConfig = DEFAULT) -> torch.Tensor:
    """softmax(fq(Q) fq(K)^T * scale) fq(V) per head. q [B, Lq, heads*d], k and v [B, Lk, heads*d] (bf16, last dim
    contiguous, any batch and row strides); quants: each operand's fake quantizer, None for an operand given
    already quantized; scale: default 1/sqrt(d). Returns bf16 [B, Lq, heads*d] (heads side by side, as the
    attention output is reshaped for the out projection)."""
    bsz, lq, c = q.shape
    lk = k.shape[1]
    d = c // heads
    if c != heads * d or k.shape != (bsz, lk, c) or v.shape != (bsz, lk, c):
        raise ValueError(f"attention_fq: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} for "
                         f"{heads} heads")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("attention_fq: the channel dimension must be contiguous")
    out = torch.empty((bsz, lq, c), dtype=torch.bfloat16, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * 1.4426950408889634  # log2(e)
    pq, pk, pv = (p or _NONE for p in quants)
    grid = (triton.cdiv(lq, config.block_m), bsz * heads)
    _attn_kernel[grid](q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       out.stride(0), out.stride(1), lq, lk, qk_scale,
                       *pq[:6], *pk[:6], *pv[:6],
                       quants[0] is not None, pq.signed, pq.folded, pq.drop,
                       quants[1] is not None, pk.signed, pk.folded, pk.drop,
                       quants[2] is not None, pv.signed, pv.folded, pv.drop,
                       H=heads, D=d, BLOCK_D=block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                       EVEN_K=lk % config.block_n == 0, IEEE_F32=INTERPRET, num_warps=config.num_warps,
                       num_stages=config.num_stages, enable_fp_fusion=False)
    return out
