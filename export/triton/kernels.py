"""Triton kernels for the msfp ops: fake quantization, 4-bit unpack, and the fused W4A4 GEMM on FP8 tensor cores.

Bit-exactness with the CPU reference (``torch.ops.msfp.quantize``) rests on doing the same float32 operations in the
same order: ``v = (x - zp) / s`` with an IEEE division (``div_rn``; Triton's ``/`` is approximate), rounding onto the
grid, then ``y = zp + q * s`` with FMA contraction off (``enable_fp_fusion=False``: an FMA would round once where the
reference rounds twice).

Rounding onto the grid has two equivalent forms, both exact round-to-nearest, ties to the even code:

* arithmetic (``ARITH``), for every minifloat and integer grid used here: below the first normal binade the grid is
  uniform, so ``(a + C) - C`` with ``ulp(C)`` equal to the spacing rounds to it (float32 ties-to-even picks the even
  multiple = the even code); above it, rounding the float32 bits to ``M`` mantissa bits does RNE on the code's
  mantissa LSB (for ``M == 0`` the exponent LSB carries the code parity, which matches when the bias is odd). The
  magnitude is saturated at the format max first, which also maps NaN to max as ``searchsorted`` does.
* table: ``q = sum_i [a > t_i] * (l_{i+1} - l_i)`` over the format's decision thresholds; every partial sum is a
  level, so the sum is exact. Used for formats the arithmetic form does not cover.

W4A4 GEMM: H100 has no FP4 tensor cores, but every 4-bit value here (after its scale is taken out) is exact in FP8
E4M3 (``e3m0`` up to 16, ``ue4m0`` 2^-6..256, ``int4`` -7..7, ``uint4`` 0..15; E4M3 spans 2^-9..448). Activations are
quantized to their grid values stored as E4M3 by ``quantize`` with ``out_mode=GRID``; weights are decoded from their
4-bit codes inside the GEMM (or once, ahead of time, to E4M3). ``tl.dot`` then runs on the FP8 tensor cores with fp32
accumulation and the epilogue applies ``y = alpha[n] * acc + beta[n]`` with ``alpha = s_a * s_w[n]`` and
``beta = bias[n] + zp * rowsum(W_deq[n])``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import triton
import triton.language as tl

from msfp_compiler.formats import FPFormat, IntFormat
from msfp_compiler.ops import get_format

__all__ = [
    "QuantSpec", "quant_spec", "fp8_exact", "quantize", "unpack", "w4a4_gemm", "WeightPack", "pack_weight",
    "GemmConfig", "ConvGeom", "pick_config", "quantize_nhwc_fp8", "OUT_FAKE", "OUT_FOLDED", "OUT_GRID", "INTERPRET",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# quantize() output modes: zp + s*q (msfp::quantize), s*q (msfp::quantize_folded), q (grid value, for the GEMM)
OUT_FAKE, OUT_FOLDED, OUT_GRID = 0, 1, 2

_FP8 = torch.float8_e4m3fn
_HALF_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# ----------------------------------------------------------------------------------------------------------------
# Format description for the kernels
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """Compile-time constants of a format's rounding (see the module docstring for the two forms)."""

    name: str
    signed: bool
    arith: bool
    max: float
    sub_limit: float  # start of the first normal binade (inf for integer grids)
    magic: float  # 2**23 * grid spacing below sub_limit
    shift: int  # 23 - mantissa bits (0: integer grid, no bit rounding)
    thresholds: torch.Tensor  # float32 decision thresholds (table form)
    steps: torch.Tensor  # float32 level differences l_{i+1} - l_i (table form)


@lru_cache(maxsize=None)
def quant_spec(fmt: str) -> QuantSpec:
    f = get_format(fmt)
    lv = f.levels.double()
    steps = (lv[1:] - lv[:-1]).float()
    arith, sub_limit, magic, shift = False, math.inf, 0.0, 0
    if isinstance(f, IntFormat) and f.int_bits <= 16:
        arith, magic = True, 2.0**23
    elif isinstance(f, FPFormat) and f.man_bits <= 20 and f.exp_bits <= 7 and (f.man_bits > 0 or f.bias % 2 == 1):
        arith = True
        sub_limit, magic, shift = f.min_normal, f.subnormal_magic, f.mantissa_shift
    return QuantSpec(f.name, f.signed, arith, f.max, sub_limit, magic, shift, f.thresholds.clone(), steps)


_DEVICE_CACHE: dict[tuple, torch.Tensor] = {}


def _on(device: torch.device, key: str, make) -> torch.Tensor:
    """Small constant tables per device, made once: a host->device copy per call would also break CUDA graphs."""
    k = (key, device)
    if k not in _DEVICE_CACHE:
        _DEVICE_CACHE[k] = make().to(device)
    return _DEVICE_CACHE[k]


def fp8_exact(fmt: str) -> bool:
    """True when every value of the format's grid is exact in FP8 E4M3 (the W4A4 GEMM operand type)."""
    lv = get_format(fmt).code_table
    return bool(torch.equal(lv.to(_FP8).float(), lv))


# ----------------------------------------------------------------------------------------------------------------
# Fake quantization
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_grid(v, sgn, thr_ptr, step_ptr, SIGNED: tl.constexpr, ARITH: tl.constexpr, MAXV: tl.constexpr,
                   SUB_LIMIT: tl.constexpr, MAGIC: tl.constexpr, SHIFT: tl.constexpr, NT: tl.constexpr):
    """Grid value of unscaled v (fp32): nearest level, ties to even code, saturating; signed grids take sgn's sign."""
    if SIGNED:
        a = tl.abs(v)
    else:
        a = tl.where(v <= 0.0, 0.0, v)  # clamp_min(0); NaN stays NaN
    if ARITH:
        a = tl.where(a < MAXV, a, MAXV)  # saturate; NaN -> max, as searchsorted sorts NaN last
        q = (a + MAGIC) - MAGIC  # uniform part of the grid: float32 RNE at ulp == spacing
        if SHIFT > 0:
            bits = a.to(tl.int32, bitcast=True)
            rb = (bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) & (-(1 << SHIFT))
            q = tl.where(a < SUB_LIMIT, q, rb.to(tl.float32, bitcast=True))
    else:
        a = tl.where(a == a, a, float("inf"))
        q = tl.zeros_like(a)
        for i in tl.static_range(NT):
            q += tl.where(a > tl.load(thr_ptr + i), tl.load(step_ptr + i), 0.0)
    if SIGNED:  # copysign(q, sgn) on the bits, so -0.0 and the sign of NaN behave as torch.copysign
        q = (q.to(tl.int32, bitcast=True) | (sgn.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return q


@triton.jit
def _nan_sign(v, x):
    """The value whose sign copysign sees on the CPU. x86 propagates an input NaN with its sign and makes a negative
    NaN for invalid operations; the GPU returns a positive canonical NaN, so the sign is taken back from x."""
    return tl.where(v == v, v, tl.where(x == x, -1.0, x))


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bfloat16 value (ties to even), kept in fp32. Explicit because Triton's interpreter truncates."""
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)


@triton.jit
def _store(ptr, y, mask):
    """Store fp32 y into ptr's element type with round-to-nearest-even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        y = _round_bf16(y)
    tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, y_ptr, s_ptr, z_ptr, thr_ptr, step_ptr, n, s_c, s_inner, z_c, z_inner,
                     S_PER: tl.constexpr, Z_PER: tl.constexpr, OUT_MODE: tl.constexpr,
                     HALF: tl.constexpr, ROUND_SUB: tl.constexpr, ROUND_DIV: tl.constexpr,
                     SIGNED: tl.constexpr, ARITH: tl.constexpr, MAXV: tl.constexpr, SUB_LIMIT: tl.constexpr,
                     MAGIC: tl.constexpr, SHIFT: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr,
                     ROWS: tl.constexpr = False):
    if ROWS:
        # per-channel parameters over rows of `n` contiguous elements (n = inner): one program per (row, block),
        # the channel's scale/zero point loaded once as scalars. The flat form below divides every element's int64
        # index, which made per-channel quantization instruction-bound (70% of copy bandwidth on the H200).
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < n
        offs = row * n + col
        if S_PER:
            s = tl.load(s_ptr + row % s_c)
        else:
            s = tl.load(s_ptr)
        if Z_PER:
            z = tl.load(z_ptr + row % z_c)
        else:
            z = tl.load(z_ptr)
    else:
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if S_PER:
            s = tl.load(s_ptr + (offs // s_inner) % s_c, mask=mask, other=1.0)
        else:
            s = tl.load(s_ptr)
        if Z_PER:
            z = tl.load(z_ptr + (offs // z_inner) % z_c, mask=mask, other=0.0)
        else:
            z = tl.load(z_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Reduced-precision x with a 0-d parameter: torch (CPU) rounds each result to x's dtype; for x - zp it rounds
    # zp to x's dtype first, for / s it divides by the float32 s (TensorIterator's "original scalar" in div).
    # With a per-channel parameter the result is float32 and nothing is rounded.
    if ROUND_SUB:
        if HALF == 1:
            d = _round_bf16(x - _round_bf16(z))
        else:
            d = (x - z.to(tl.float16).to(tl.float32)).to(tl.float16).to(tl.float32)
    else:
        d = x - z
    v = tl.math.div_rn(d, s)
    if ROUND_DIV:
        v = _round_bf16(v) if HALF == 1 else v.to(tl.float16).to(tl.float32)
    q = _round_to_grid(v, _nan_sign(v, x), thr_ptr, step_ptr, SIGNED, ARITH, MAXV, SUB_LIMIT, MAGIC, SHIFT, NT)
    if OUT_MODE == 0:
        y = z + q * s
    elif OUT_MODE == 1:
        y = q * s
    else:
        y = q
    _store(y_ptr + offs, y, mask)


def _channel_layout(p: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int, int] | None:
    """(flat param, C, inner) with param index = (flat_x_index // inner) % C, or None when not a dim block."""
    if p.numel() == 1:
        return p.reshape(1), 1, 1
    if p.dim() > len(shape):
        return None
    ps = [1] * (len(shape) - p.dim()) + list(p.shape)
    nz = [i for i, d in enumerate(ps) if d != 1]
    lo, hi = nz[0], nz[-1]
    if any(ps[i] != shape[i] for i in range(lo, hi + 1)):
        return None
    inner = math.prod(shape[hi + 1:])
    return p.reshape(-1).contiguous(), math.prod(shape[lo:hi + 1]), inner


def _dense_perm(x: torch.Tensor) -> list[int] | None:
    """Dimension order in which x is contiguous (x non-overlapping and dense, e.g. channels-last), else None."""
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))
    return perm if x.permute(perm).is_contiguous() else None


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, out_mode: int = OUT_FAKE,
             out_dtype: torch.dtype | None = None, block: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """Fake quantization of x (same values as ``torch.ops.msfp.quantize``), or its grid values with OUT_GRID.

    x: float32/bfloat16/float16, any layout; scale/zero_point: float tensors broadcastable to x (per tensor or per
    channel). The result has x's shape and strides; its dtype is x's (or out_dtype, e.g. FP8 for OUT_GRID).
    """
    if x.dtype not in _HALF_CODE:
        raise TypeError(f"msfp triton quantize: unsupported dtype {x.dtype}")
    spec = quant_spec(fmt)
    if scale.dtype != torch.float32 or scale.device != x.device:
        scale = scale.to(x.device, torch.float32)
    if zero_point.dtype != torch.float32 or zero_point.device != x.device:
        zero_point = zero_point.to(x.device, torch.float32)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype)
    n = x.numel()
    if n == 0:
        return out
    copy_back = None
    if scale.numel() == 1 and zero_point.numel() == 1:
        sl, zl = (scale, 1, 1), (zero_point, 1, 1)
        if x.is_contiguous():  # the common case, kept free of layout work (this runs once per layer per step)
            xs, ys = x, out
        else:
            perm = _dense_perm(x)  # per tensor the element order is irrelevant: run over the storage as it lies
            if perm is not None:
                xs, ys = x.permute(perm), out.permute(perm)
            else:
                xs, ys, copy_back = x.contiguous(), torch.empty(x.shape, dtype=out.dtype, device=x.device), out
    else:
        sl = _channel_layout(scale, x.shape) or (scale.expand(x.shape).contiguous().view(-1), n, 1)
        zl = _channel_layout(zero_point, x.shape) or (zero_point.expand(x.shape).contiguous().view(-1), n, 1)
        xs = x.contiguous()
        if out.is_contiguous():
            ys = out
        else:
            ys, copy_back = torch.empty(x.shape, dtype=out.dtype, device=x.device), out
    half = _HALF_CODE[x.dtype]
    round_sub = half > 0 and zero_point.dim() == 0
    round_div = round_sub and scale.dim() == 0
    inner = max(sl[2] if sl[1] > 1 else 0, zl[2] if zl[1] > 1 else 0)
    # Row form when every per-channel parameter indexes whole rows of the same length (and rows are long enough
    # to fill a block): scalar parameter loads instead of an int64 division per element.
    rows = inner >= 1024 and all(c == 1 or i == inner for c, i in ((sl[1], sl[2]), (zl[1], zl[2])))
    grid = (n // inner, triton.cdiv(inner, block)) if rows else (triton.cdiv(n, block),)
    _quantize_kernel[grid](
        xs, ys, sl[0], zl[0], _on(x.device, f"thr:{fmt}:{spec.arith}", lambda: spec.thresholds),
        _on(x.device, f"steps:{fmt}:{spec.arith}", lambda: spec.steps), inner if rows else n, sl[1], sl[2], zl[1],
        zl[2], S_PER=sl[1] > 1, Z_PER=zl[1] > 1, OUT_MODE=out_mode, HALF=half, ROUND_SUB=round_sub,
        ROUND_DIV=round_div, SIGNED=spec.signed, ARITH=spec.arith, MAXV=spec.max, SUB_LIMIT=spec.sub_limit,
        MAGIC=spec.magic, SHIFT=spec.shift, NT=spec.thresholds.numel(), BLOCK=block, ROWS=rows,
        num_warps=num_warps, enable_fp_fusion=False)
    if copy_back is not None:
        copy_back.copy_(ys)
    return out


@triton.jit
def _quantize_nhwc_kernel(x_ptr, y_ptr, s_ptr, z_ptr, thr_ptr, step_ptr, C, HW,
                          SIGNED: tl.constexpr, ARITH: tl.constexpr, MAXV: tl.constexpr, SUB_LIMIT: tl.constexpr,
                          MAGIC: tl.constexpr, SHIFT: tl.constexpr, NT: tl.constexpr,
                          BC: tl.constexpr, BHW: tl.constexpr):
    """Grid values of an NCHW fp32 tile, stored transposed as NHWC E4M3 (the implicit-GEMM conv operand)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    hw = tl.program_id(2) * BHW + tl.arange(0, BHW)
    mask = (c[:, None] < C) & (hw[None, :] < HW)
    x = tl.load(x_ptr + b * C * HW + c[:, None].to(tl.int64) * HW + hw[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    v = tl.math.div_rn(x - tl.load(z_ptr), tl.load(s_ptr))
    q = _round_to_grid(v, _nan_sign(v, x), thr_ptr, step_ptr, SIGNED, ARITH, MAXV, SUB_LIMIT, MAGIC, SHIFT, NT)
    qt = tl.trans(q).to(y_ptr.dtype.element_ty)  # [BHW, BC]: stores run along C
    tl.store(y_ptr + b * C * HW + hw[:, None].to(tl.int64) * C + c[None, :], qt,
             mask=(hw[:, None] < HW) & (c[None, :] < C))


def quantize_nhwc_fp8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    """Grid values of a [B, C, H, W] float32 activation as E4M3 in NHWC memory (a channels-last NCHW view)."""
    out = torch.empty(x.shape, dtype=_FP8, device=x.device, memory_format=torch.channels_last)
    if x.dtype != torch.float32 or x.dim() != 4 or scale.numel() != 1 or zero_point.numel() != 1 \
            or not x.is_contiguous():
        return out.copy_(quantize(x, scale, zero_point, fmt, OUT_GRID, out_dtype=_FP8)) if x.numel() else out
    spec = quant_spec(fmt)
    b, c, h, w = x.shape
    bc, bhw = 32, 64
    _quantize_nhwc_kernel[(b, triton.cdiv(c, bc), triton.cdiv(h * w, bhw))](
        x, out, scale, zero_point, _on(x.device, f"thr:{fmt}:{spec.arith}", lambda: spec.thresholds),
        _on(x.device, f"steps:{fmt}:{spec.arith}", lambda: spec.steps), c, h * w,
        SIGNED=spec.signed, ARITH=spec.arith, MAXV=spec.max, SUB_LIMIT=spec.sub_limit, MAGIC=spec.magic,
        SHIFT=spec.shift, NT=spec.thresholds.numel(), BC=bc, BHW=bhw, num_warps=4, enable_fp_fusion=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Unpack of packed 4-bit codes
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _unpack_kernel(p_ptr, table_ptr, s_ptr, out_ptr, nbytes, numel, s_c, s_inner,
                   SCALED: tl.constexpr, S_PER: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ob = pid * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(p_ptr + ob, mask=ob < nbytes, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(p & 15, p >> 4), (2 * BLOCK,))  # element 2i is the low nibble
    idx = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    mask = idx < numel
    val = tl.load(table_ptr + codes)
    if SCALED:
        if S_PER:
            val = val * tl.load(s_ptr + (idx // s_inner) % s_c, mask=mask, other=1.0)
        else:
            val = val * tl.load(s_ptr)
    _store(out_ptr + idx, val, mask)


def unpack(packed: torch.Tensor, fmt: str, shape: list[int] | torch.Size, scale: torch.Tensor | None = None,
           dtype: torch.dtype = torch.float32, block: int = 2048) -> torch.Tensor:
    """Decode packed codes (two per byte, element 2i low) to ``scale * code_table[code]`` of ``shape``.

    With ``scale=None`` the unscaled code values are returned (``dtype=torch.float8_e4m3fn`` gives GEMM operands).
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    table = _on(packed.device, f"table:{fmt}", lambda: get_format(fmt).code_table)
    if scale is None:
        s, c, inner = table, 1, 1  # unused
    else:
        s, c, inner = _channel_layout(scale.to(packed.device, torch.float32), shape) or (
            scale.to(packed.device, torch.float32).expand(shape).contiguous().view(-1), numel, 1)
    nbytes = (numel + 1) // 2
    _unpack_kernel[(triton.cdiv(nbytes, block),)](
        packed.contiguous(), table, s, out.view(-1), nbytes, numel, c, inner,
        SCALED=scale is not None, S_PER=c > 1, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fused W4A4 GEMM on FP8 tensor cores
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_fp8(c, W_SHIFT: tl.constexpr, lut0, lut1, lut2, lut3, DECODE: tl.constexpr):
    """4-bit codes (int32) -> E4M3 bytes. DECODE 1: sign-magnitude bit placement (value * 2**k); 2: byte table."""
    if DECODE == 1:
        b = ((c & 8) << 4) | ((c & 7) << W_SHIFT)
    else:
        w = tl.where(c < 4, lut0, tl.where(c < 8, lut1, tl.where(c < 12, lut2, lut3)))
        b = (w >> ((c & 3) * 8)) & 255
    return b.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid in grouped order: GROUP_M row tiles share the weight tiles they read
    while those are in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % gsize, (pid % group) // gsize


# Over 60 lines: one Triton program (load, decode, dot, epilogue); its helpers are already @triton.jit functions.
@triton.jit
def _w4a4_kernel(a_ptr, w_ptr, alpha_ptr, beta_ptr, zmap_ptr, out_ptr, set_ptr, tiles_ptr, rows_ptr,
                 M, N, K, stride_am, stride_ws, stride_wn, stride_ps, stride_zs, L, s_ob, s_ol, s_on,
                 lut0, lut1, lut2, lut3, H, W, C, KW, SH, SW, PT, PL, WO,
                 DECODE: tl.constexpr, W_SHIFT: tl.constexpr, GATED: tl.constexpr, ZMAP: tl.constexpr,
                 CONV: tl.constexpr, PRECISE: tl.constexpr, EVEN_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    if GATED:
        # MoE-style: rows sorted by weight set; tile t covers sorted rows [lo, hi) of one set (table built on device)
        pid_m = pid // num_n
        pid_n = pid % num_n
        wset = tl.load(tiles_ptr + 3 * pid_m)
        lo = tl.load(tiles_ptr + 3 * pid_m + 1)
        hi = tl.load(tiles_ptr + 3 * pid_m + 2)
        if lo >= hi:
            return
        r = lo + tl.arange(0, BM)
        rmask = r < hi
        rows = tl.load(rows_ptr + r, mask=rmask, other=0).to(tl.int64)
    else:
        pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BM), num_n, GROUP_M)
        wset = tl.load(set_ptr)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < M
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    wcols = tl.where(cmask, cols, 0).to(tl.int64)
    b = rows // L
    l = rows % L
    if CONV:
        # implicit GEMM over NHWC E4M3 activations: row (b, ho, wo), K ordered (kh, kw, c), C % BK == 0
        hi0 = (l // WO) * SH - PT
        wi0 = (l % WO) * SW - PL
        a_row = a_ptr + ((b * H + hi0) * W + wi0) * C
    else:
        a_row = a_ptr + rows * stride_am
    w_base = w_ptr + wset.to(tl.int64) * stride_ws + wcols[:, None] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BK)):
        k0 = kt * BK
        if CONV:
            tap = k0 // C
            di = tap // KW
            dj = tap % KW
            ok = rmask & (hi0 + di >= 0) & (hi0 + di < H) & (wi0 + dj >= 0) & (wi0 + dj < W)
            a = tl.load((a_row + (di * W + dj) * C + (k0 - tap * C))[:, None] + tl.arange(0, BK)[None, :],
                        mask=ok[:, None], other=0.0)
        elif EVEN_K:
            a = tl.load(a_row[:, None] + k0 + tl.arange(0, BK)[None, :], mask=rmask[:, None], other=0.0)
        else:
            a = tl.load(a_row[:, None] + k0 + tl.arange(0, BK)[None, :],
                        mask=rmask[:, None] & (k0 + tl.arange(0, BK)[None, :] < K), other=0.0)
        if DECODE == 0:
            kk = k0 + tl.arange(0, BK)
            if EVEN_K:
                w = tl.load(w_base + kk[None, :])
            else:
                w = tl.load(w_base + kk[None, :], mask=kk[None, :] < K, other=0.0)
        else:
            kb = k0 // 2 + tl.arange(0, BK // 2)
            if EVEN_K:
                p = tl.load(w_base + kb[None, :]).to(tl.int32)
            else:
                p = tl.load(w_base + kb[None, :], mask=2 * kb[None, :] < K, other=0).to(tl.int32)
            codes = tl.reshape(tl.join(p & 15, p >> 4), (BN, BK))
            w = _decode_fp8(codes, W_SHIFT, lut0, lut1, lut2, lut3, DECODE)
        if PRECISE:  # promote every K block to an fp32 accumulator (Hopper FP8 MMA accumulates with fewer bits)
            acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=BK)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    _epilogue(acc, rows, rmask, cols, cmask, wcols, wset, b, l, alpha_ptr, beta_ptr, zmap_ptr, out_ptr,
              stride_ps, stride_zs, L, s_ob, s_ol, s_on, ZMAP)


@triton.jit
def _epilogue(acc, rows, rmask, cols, cmask, wcols, wset, b, l, alpha_ptr, beta_ptr, zmap_ptr, out_ptr,
              stride_ps, stride_zs, L, s_ob, s_ol, s_on, ZMAP: tl.constexpr):
    """y = alpha[n] * acc + beta[n] (+ zmap[n, l]) stored at (m // L) * s_ob + (m % L) * s_ol + n * s_on."""
    poffs = wset.to(tl.int64) * stride_ps + wcols
    alpha = tl.load(alpha_ptr + poffs, mask=cmask, other=0.0)
    beta = tl.load(beta_ptr + poffs, mask=cmask, other=0.0)
    y = acc * alpha[None, :] + beta[None, :]
    if ZMAP:  # per-position zero-point term of a padded conv: [S, N, L]
        z_ptrs = zmap_ptr + wset.to(tl.int64) * stride_zs + wcols[None, :] * L + l[:, None]
        y += tl.load(z_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    o_ptrs = out_ptr + (b * s_ob + l * s_ol)[:, None] + cols[None, :].to(tl.int64) * s_on
    _store(o_ptrs, y, rmask[:, None] & cmask[None, :])


@triton.jit
def _w4a4_tma_kernel(a_desc, w_desc, alpha_ptr, beta_ptr, out_ptr, set_ptr, M, N, K, stride_ps, s_om,
                     PRECISE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Linear layer with E4M3 weights through the bulk tensor copy engine (TMA) for both operands."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    wset = tl.load(set_ptr)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    w_row = (wset * N + pid_n * BN).to(tl.int32)  # weights as [S * N, K]; rows past N are never stored
    for k in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([pid_m * BM, k * BK])
        w = w_desc.load([w_row, k * BK])
        if PRECISE:
            acc = tl.dot(a, w.T, acc, max_num_imprecise_acc=BK)
        else:
            acc = tl.dot(a, w.T, acc)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    _epilogue(acc, rows, rows < M, cols, cmask, tl.where(cmask, cols, 0).to(tl.int64), wset, rows * 0, rows,
              alpha_ptr, beta_ptr, alpha_ptr, out_ptr, stride_ps, 0, M, 0, s_om, 1, False)


@dataclass(frozen=True)
class GemmConfig:
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False  # TMA operand loads (E4M3 weights, plain row-major linear only)


@dataclass(frozen=True)
class ConvGeom:
    """Implicit-GEMM conv geometry: NHWC input [B, H, W, C], kernel (kh, kw), stride, top/left padding, output size."""

    h: int
    w: int
    c: int
    kh: int
    kw: int
    sh: int
    sw: int
    pt: int
    pl: int
    ho: int
    wo: int


def pick_config(m: int, n: int, k: int, conv_c: int = 0, tma: bool = False) -> GemmConfig:
    """Tile shape by problem size. Measured on H100 (results/triton_bench.json): 256x128x128 tiles, 8 warps, 4 stages
    are the fastest FP8 tiles at 4096^3 (1.27 PFLOP/s with TMA, 1.13 without); BN follows N so narrow UNet layers do
    not waste half a tile."""
    if INTERPRET:
        return GemmConfig(16, 16, 32 if conv_c == 0 else math.gcd(conv_c, 32), 1, 1, 2, tma=tma)
    bk = 128 if conv_c == 0 else max(b for b in (128, 64, 32) if conv_c % b == 0)
    if m >= 2048 and n >= 128:
        return GemmConfig(256 if n >= 256 or m >= 8192 else 128, 128, bk, 8, 4, tma=tma)
    if m >= 128 and n >= 128:
        return GemmConfig(128, 128, bk, 8, 4, tma=tma)
    return GemmConfig(64, 64 if n <= 64 else 128, bk, 4, 4, tma=tma)


@dataclass
class WeightPack:
    """Weights of a W4A4 layer, ready for the GEMM: S stacked sets of [N, K] (S > 1 for gated TALoRA layers).

    ``w`` holds either packed codes (uint8 [S, N, ceil(K/2)], DECODE 1/2) or decoded E4M3 values ([S, N, K], DECODE 0).
    ``alpha``/``beta`` ([S, N], fp32) are the epilogue: y = alpha * (Qa @ Qw^T) + beta, with the activation scale,
    the weight scale, the decode factor, the bias and the activation zero-point term already folded in.
    """

    w: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    n: int
    k: int
    decode: int
    w_shift: int = 0
    lut: tuple[int, int, int, int] = (0, 0, 0, 0)
    descs: dict = field(default_factory=dict, repr=False)  # TMA descriptors of w per block shape (host objects)

    @property
    def sets(self) -> int:
        return self.w.shape[0]


def _bit_decode(fmt: str) -> tuple[int, float] | None:
    """(shift, value factor) of the sign-magnitude bit placement code -> E4M3, or None if it does not apply.

    A signed ExMy magnitude field c = (e << M) | m placed at E4M3 bits (c << (3 - M)) reads as value * 2**(bias - 7)
    in both the subnormal and the normal range; a signed int (M = 3, no exponent) reads as value * 2**-9.
    """
    f = get_format(fmt)
    if not f.signed or f.bits != 4:
        return None
    if isinstance(f, IntFormat):
        return 0, 2.0**-9
    if f.man_bits > 3 or f.exp_bits > 4:
        return None
    return 3 - f.man_bits, 2.0 ** (f.bias - 7)


def _fp8_lut(fmt: str) -> tuple[int, int, int, int]:
    """The 16 codes' E4M3 bytes as four little-endian int32 words (code c -> byte c & 3 of word c >> 2)."""
    b = get_format(fmt).code_table.to(_FP8).view(torch.uint8).to(torch.int64).tolist()
    words = [sum(b[4 * w + i] << (8 * i) for i in range(4)) for w in range(4)]
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in words)  # type: ignore[return-value]


def pack_weight(codes: torch.Tensor, w_scale: torch.Tensor, fmt: str, a_scale: float | torch.Tensor = 1.0,
                a_zero_point: float | torch.Tensor = 0.0, bias: torch.Tensor | None = None,
                zp_in_bias: bool = False, mode: str = "packed") -> WeightPack:
    """Build the GEMM operands from 4-bit weight codes.

    codes: uint8 [N, K] or [S, N, K] (one set per TALoRA choice); w_scale: per output channel ([.., N] or
    broadcastable, e.g. [N, 1]); bias: [N] or [S, N]. The activation zero-point term zp * rowsum(W_deq) goes into
    beta unless ``zp_in_bias`` (the graph already folded it, msfp::quantize_folded). mode: "packed" keeps 4-bit codes
    and decodes them in the GEMM; "fp8" decodes once to E4M3 (twice the bytes, a plain FP8 GEMM).
    """
    if not fp8_exact(fmt):
        raise ValueError(f"weight format {fmt} is not exact in FP8 E4M3")
    codes = codes if codes.dim() == 3 else codes.unsqueeze(0)
    s, n, k = codes.shape
    dev = codes.device
    table = get_format(fmt).code_table.to(dev).double()
    ws = w_scale.to(dev).double().reshape(-1, n) if w_scale.numel() > 1 else w_scale.to(dev).double().reshape(1, 1)
    ws = ws.expand(s, n)
    w_deq = table[codes.long()] * ws[..., None]
    a_s = torch.as_tensor(a_scale, dtype=torch.float64, device=dev).reshape(())
    a_z = torch.as_tensor(a_zero_point, dtype=torch.float64, device=dev).reshape(())
    beta = torch.zeros(s, n, dtype=torch.float64, device=dev)
    if bias is not None:
        beta += bias.to(dev).double().reshape(-1, n)
    if not zp_in_bias:
        beta += a_z * w_deq.sum(-1)
    bit = _bit_decode(fmt)
    if mode == "fp8":
        w = table[codes.long()].to(_FP8)
        return WeightPack(w.contiguous(), (a_s * ws).float().contiguous(), beta.float().contiguous(), n, k, 0)
    if mode != "packed":
        raise ValueError(f"unknown weight mode {mode!r} (packed or fp8)")
    flat = torch.nn.functional.pad(codes, (0, k % 2)).to(torch.uint8)
    packed = (flat[..., 0::2] | (flat[..., 1::2] << 4)).contiguous()
    if bit is not None:
        shift, factor = bit
        return WeightPack(packed, (a_s * ws / factor).float().contiguous(), beta.float().contiguous(), n, k, 1, shift)
    return WeightPack(packed, (a_s * ws).float().contiguous(), beta.float().contiguous(), n, k, 2, 0, _fp8_lut(fmt))


def _tile_table(sel: torch.Tensor, sets: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sorted row order and a (set, lo, hi) table of row tiles, one set per tile, all on device (no host sync)."""
    m = sel.numel()
    sel = sel.to(torch.int64)
    order = torch.argsort(sel, stable=True).to(torch.int32)
    counts = torch.bincount(sel, minlength=sets)[:sets]
    starts = torch.cumsum(counts, 0) - counts
    tiles_per = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles_per, 0)
    max_tiles = triton.cdiv(m, bm) + sets  # each set adds at most one partial tile
    t = torch.arange(max_tiles, device=sel.device)
    g = torch.searchsorted(tile_end, t, right=True)
    valid = g < sets
    gc = g.clamp_max(sets - 1)
    first = tile_end[gc] - tiles_per[gc]
    lo = starts[gc] + (t - first) * bm
    hi = torch.minimum(lo + bm, starts[gc] + counts[gc])
    table = torch.stack([gc, torch.where(valid, lo, 0), torch.where(valid, hi, 0)], 1).to(torch.int32)
    return order, table.contiguous(), max_tiles


def _w4a4_gemm_tma(a_q: torch.Tensor, wp: WeightPack, out: torch.Tensor, set_t: torch.Tensor, cfg: GemmConfig,
                   precise: bool) -> torch.Tensor:
    """w4a4_gemm's TMA path: E4M3 weights of a plain row-major linear, operands read through tensor descriptors."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), n = a_q.shape, wp.n
    a_desc = TensorDescriptor.from_tensor(a_q, [cfg.bm, cfg.bk])
    w_desc = wp.descs.get((cfg.bn, cfg.bk))
    if w_desc is None:
        w_desc = wp.descs[(cfg.bn, cfg.bk)] = TensorDescriptor.from_tensor(wp.w.view(-1, k), [cfg.bn, cfg.bk])
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn),)
    _w4a4_tma_kernel[grid](a_desc, w_desc, wp.alpha, wp.beta, out, set_t, m, n, k, wp.alpha.stride(0),
                           out.stride(0), PRECISE=precise, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk,
                           GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def w4a4_gemm(a_q: torch.Tensor, wp: WeightPack, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              set_index: torch.Tensor | None = None, row_sets: torch.Tensor | None = None,
              out_layout: tuple[int, int, int, int] | None = None, zmap: torch.Tensor | None = None,
              conv: ConvGeom | None = None, config: GemmConfig | None = None, precise: bool = False) -> torch.Tensor:
    """y = alpha * (A @ W^T) + beta with A the E4M3 grid values [M, K] and W from ``wp``.

    set_index: integer device tensor whose first element chooses the weight set for the whole call (timestep -> set
    table, no host sync); row_sets: int [M] set per row (gated TALoRA, rows grouped on device). out_layout:
    (L, s_ob, s_ol, s_on) writes row m, column n at ``(m // L) * s_ob + (m % L) * s_ol + n * s_on`` of ``out`` (NCHW
    conv output); zmap [S, N, L] adds a per-position term (zero point at a padded conv border). conv: A is the NHWC
    E4M3 activation [B, H, W, C] of a conv read as im2col rows on the fly (implicit GEMM; K ordered kh, kw, c).
    """
    assert a_q.dtype == _FP8
    if conv is not None:
        m, k = a_q.shape[0] * conv.ho * conv.wo, conv.kh * conv.kw * conv.c
    else:
        assert a_q.dim() == 2 and a_q.stride(1) == 1
        m, k = a_q.shape
    assert k == wp.k, f"K mismatch: activation {k}, weight {wp.k}"
    n = wp.n
    gated = row_sets is not None
    # TMA needs E4M3 weights, a plain row-major linear and 16-byte aligned rows
    tma_ok = (not gated and conv is None and out_layout is None and zmap is None and wp.decode == 0 and k % 16 == 0
              and a_q.stride(0) % 16 == 0 and a_q.data_ptr() % 16 == 0 and wp.w.data_ptr() % 16 == 0)
    # Descriptors are built on the host per call: worth it only where the kernel outlasts that (measured: below
    # ~2^34 MACs the pointer kernel is as fast and its launch cheaper).
    cfg = config or pick_config(m, n, k, conv.c if conv is not None else 0, tma=tma_ok and m * n * k >= 2**34)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    dev = a_q.device
    if cfg.tma and tma_ok:
        set_t = set_index if set_index is not None else _on(dev, "zero_i32", lambda: torch.zeros(1, dtype=torch.int32))
        return _w4a4_gemm_tma(a_q, wp, out, set_t, cfg, precise)
    L, s_ob, s_ol, s_on = out_layout or (max(m, 1), 0, out.stride(0), out.stride(1))
    if gated:
        rows, tiles, n_tiles = _tile_table(row_sets, wp.sets, cfg.bm)
        set_t = tiles
    else:
        rows = tiles = _on(dev, "zero_i32", lambda: torch.zeros(1, dtype=torch.int32))
        n_tiles = triton.cdiv(m, cfg.bm)
        set_t = set_index if set_index is not None else rows
    g = conv or ConvGeom(1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1)
    if conv is not None:
        assert a_q.dim() == 4 and a_q.permute(0, 2, 3, 1).is_contiguous() and conv.c % cfg.bk == 0, \
            "implicit GEMM needs NHWC activations and C % BK == 0"
    grid = (n_tiles * triton.cdiv(n, cfg.bn),)
    l0, l1, l2, l3 = wp.lut
    _w4a4_kernel[grid](
        a_q, wp.w, wp.alpha, wp.beta, zmap if zmap is not None else wp.alpha, out, set_t, tiles, rows,
        m, n, k, a_q.stride(0) if conv is None else 0, wp.w.stride(0), wp.w.stride(1), wp.alpha.stride(0),
        zmap.stride(0) if zmap is not None else 0, L, s_ob, s_ol, s_on,
        l0, l1, l2, l3, g.h, g.w, g.c, g.kw, g.sh, g.sw, g.pt, g.pl, g.wo,
        DECODE=wp.decode, W_SHIFT=wp.w_shift, GATED=gated, ZMAP=zmap is not None, CONV=conv is not None,
        PRECISE=precise, EVEN_K=k % cfg.bk == 0, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
