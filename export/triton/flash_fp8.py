"""FP8 flash attention in Triton for the fast path's already-quantized Q, K, V: the CUDA side of
``msfp_fast::flash_fp8``.

SD1.5's self-attentions at the 64x64 level (4096 tokens, head dim 40) take ~3.0 ms of a batch-8 W4A4 step in cuDNN's
bf16 flash kernel (20%; docs/triton.md session 16). The graph quantizes Q, K and V to per-tensor 4-bit grids before
the attention, and every 4-bit grid value is exact in E4M3, so Q K^T can run on the FP8 tensor cores with the scales
outside the MMA. cuDNN's FP8 attention lost in the step (session 12): it needs the head dim padded to a multiple of
16 by a copy, returns O in E4M3 (one more rounding and a dequantize kernel) and was no faster at head dim 48. This
kernel reads the head dim unpadded (40 or 80 bytes a row, zero-filled to ``BLOCK_D`` in registers), writes O in
bfloat16 straight into the [B, S, H, D] memory the output projection reads, and takes V as V^T memory ([B, H, D, T],
keys contiguous): FP8 wgmma wants both operands K-major, and P @ V contracts over the keys.

Numerics (the rounding the bf16 path does not have): P = exp2(s - running max) is rounded to E4M3 at scale
``P_SCALE`` before P @ V; the row sum is of the unrounded P (float32, or float16 with ``exp16``); Q K^T and P V
accumulate in float32. ``exp16``: the exponentials as ``ex2.approx.f16x2`` (two per MUFU instruction: at head dim 40
the softmax's exponentials, not the MMAs, bound a flash kernel on Hopper); P is rounded to E4M3 afterwards anyway.
GPU only (inline PTX): the interpreter runs the float32 form.

Measured (session 17, H200, batch 8): it loses where it matters. At the 64x64 level 1.028 ms at its best tile against
cuDNN bf16's 0.615 ms (1.12 ms with float32 exponentials); at 32x32 it wins (0.055 vs 0.0625 ms). Per step 5.4 ms
against 3.4 ms, so ``build_fast(attention="fp8-triton")`` stays opt-in. Not yet measured: the cause. The 40-byte rows
load as 8-byte ``cp.async`` (16-byte at head dim 64: the micro-bench's ``_pad64`` rows); Triton 3.6 runs the softmax
and the two MMAs of a tile one after another in one warpgroup, where cuDNN's kernel overlaps them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["P_SCALE", "FLASH_TILE", "flash_fp8_triton", "flash_fp8_reference"]

P_SCALE = 256.0  # P in [0, 1] -> E4M3 up to 256 (a power of two: the rescale is exact); P >= 2^-17 stays nonzero
# BLOCK_M, BLOCK_N, warps, stages, exp16: the fastest of session 17's sweep at SD1.5's 64x64 level (batch 8, H200:
# 1.028 ms against cuDNN bf16's 0.615; results/gpu_sd15_kernels_session17_flashfp8_b8.json): slower, so off by default
FLASH_TILE = (128, 128, 4, 3, True)
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _exp2_f16(x):
    return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def _to_e4m3(x, RNE_BITS: tl.constexpr):
    # RNE_BITS (the interpreter only): round the float32 mantissa to E4M3's 3 bits first, since Triton's interpreter
    # (3.9 here) drops the carry when a conversion rounds up into the next binade (124.6 -> 64 instead of 128); the
    # cast of the rounded value is then exact where E4M3 is normal (x >= 2^-6). Below that (P < 2^-14 at P_SCALE) the
    # interpreter's subnormals stay off by up to a step. The GPU's cvt rounds correctly.
    if RNE_BITS:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000
        x = b.to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _flash_fp8_kernel(q_ptr, k_ptr, vt_ptr, o_ptr, qk_scale, o_scale, o_shift, S, T, H,
                      sqb, sqh, sqs, skb, skh, skt, svb, svh, svd, sob, sos, soh,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      EVEN_N: tl.constexpr, EXP16: tl.constexpr, PS: tl.constexpr, RNE_BITS: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs of one (sample, head) run together and share K, V in L2
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sqb + h * sqh + m[:, None] * sqs + d[None, :], mask=(m[:, None] < S) & (d[None, :] < D),
                other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = vt_ptr + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_N):
        n = start + j
        if EVEN_N:
            k = tl.load(k_base + n[:, None] * skt + d[None, :], mask=d[None, :] < D, other=0.0)
            vt = tl.load(v_base + d[:, None] * svd + n[None, :], mask=d[:, None] < D, other=0.0)
        else:
            k = tl.load(k_base + n[:, None] * skt + d[None, :], mask=(n[:, None] < T) & (d[None, :] < D), other=0.0)
            vt = tl.load(v_base + d[:, None] * svd + n[None, :], mask=(d[:, None] < D) & (n[None, :] < T), other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units: qk_scale holds log2(e)
        if not EVEN_N:
            s = tl.where(n[None, :] < T, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        if EXP16:
            p16 = _exp2_f16(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p16.to(tl.float32), 1)
            p8 = (p16 * PS).to(tl.float8e4nv)
        else:
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p8 = _to_e4m3(p * PS, RNE_BITS)
        acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        m_i = m_new
    o = acc * (o_scale / l_i)[:, None] + o_shift
    tl.store(o_ptr + b * sob + h * soh + m[:, None] * sos + d[None, :], o.to(tl.bfloat16),
             mask=(m[:, None] < S) & (d[None, :] < D))


def flash_fp8_triton(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descale_q: float, descale_k: float,
                     descale_v: float, shift_v: float, attn_scale: float, tile: tuple | None = None) -> torch.Tensor:
    """softmax(attn_scale * (q dq)(k dk)^T) (v dv) + shift_v with q E4M3 [B, H, S, D], k E4M3 [B, H, T, D], vt E4M3
    [B, H, D, T] (V transposed; any strides with the last one 1) -> bfloat16 [B, H, S, D], a view of [B, S, H, D]
    memory. ``tile``: (BLOCK_M, BLOCK_N, warps, stages, exp16), ``FLASH_TILE`` by default."""
    bsz, heads, s, dim = q.shape
    t = k.shape[2]
    if k.shape != (bsz, heads, t, dim) or vt.shape != (bsz, heads, dim, t):
        raise ValueError(f"flash_fp8: q {tuple(q.shape)}, k {tuple(k.shape)}, vt {tuple(vt.shape)} do not match")
    if any(x.dtype != torch.float8_e4m3fn or x.stride(-1) != 1 for x in (q, k, vt)):
        raise ValueError("flash_fp8: q, k, vt must be E4M3 with a contiguous last dimension")
    block_m, block_n, warps, stages, exp16 = tile or FLASH_TILE
    out = torch.empty(bsz, s, heads, dim, device=q.device, dtype=torch.bfloat16)
    if t == 0:
        raise ValueError("flash_fp8: no keys (k has 0 rows): softmax over nothing")
    if min(bsz, heads, s) == 0:
        return out.transpose(1, 2)
    block_d = max(32, triton.next_power_of_2(dim))  # FP8 MMA: K a multiple of 32
    grid = (triton.cdiv(s, block_m), bsz * heads)
    _flash_fp8_kernel[grid](q, k, vt, out, descale_q * descale_k * attn_scale * _LOG2E, descale_v / P_SCALE, shift_v,
                            s, t,
                            heads, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            vt.stride(0), vt.stride(1), vt.stride(2), out.stride(0), out.stride(1), out.stride(2),
                            D=dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=t % block_n == 0,
                            EXP16=bool(exp16) and not _INTERPRET, PS=P_SCALE, RNE_BITS=_INTERPRET, num_warps=warps,
                            num_stages=stages)
    return out.transpose(1, 2)


def flash_fp8_reference(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descale_q: float, descale_k: float,
                        descale_v: float, shift_v: float, attn_scale: float,
                        block_n: int | None = None) -> torch.Tensor:
    """The kernel's rounding in torch ops: float32, then bfloat16 in the kernel's output layout. P is rounded to E4M3
    against the whole row's maximum, or with ``block_n`` as the kernel does, key tile by key tile against the running
    maximum (the online softmax: earlier tiles' sums rescaled when the maximum grows)."""
    qf, kf, vf = q.float() * descale_q, k.float() * descale_k, vt.float().transpose(-1, -2) * descale_v
    if kf.shape[-2] == 0:
        raise ValueError("flash_fp8: no keys")
    s = qf @ kf.transpose(-1, -2) * (attn_scale * _LOG2E)
    step = block_n or s.shape[-1]
    m = s.new_full(s.shape[:-1] + (1,), float("-inf"))
    acc, l_sum = s.new_zeros(s.shape[:-1] + (vf.shape[-1],)), s.new_zeros(s.shape[:-1] + (1,))
    for j in range(0, s.shape[-1], step):
        sj = s[..., j:j + step]
        m_new = torch.maximum(m, sj.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(sj - m_new)
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + (p * P_SCALE).to(torch.float8_e4m3fn).float() @ vf[..., j:j + step, :]
        m = m_new
    o = acc / (l_sum * P_SCALE) + shift_v
    return o.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
