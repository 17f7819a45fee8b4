"""The fast GPU path: a quantized GraphModule rewritten into plain torch ops that torch.compile (Inductor) fuses.

``TritonRunner`` runs the compiled graph as it is: float32, one kernel per op, a separate quantization pass before
each GEMM. This module instead rewrites the graph for Inductor, so that the code around the GEMMs is generated and
fused by the compiler:

* the non-GEMM graph runs in bfloat16 (GroupNorm, SiLU, residual adds, attention through PyTorch's flash SDPA);
* each activation quantizer in front of a 4-bit layer becomes pointwise torch ops producing the E4M3 grid values
  (``grid_round``: integer bit arithmetic, no FMA-sensitive float tricks; on CUDA ``grid_fast``: one FP8 conversion
  for formats of 2 or 3 mantissa bits, the same rounding), which Inductor fuses into the kernel
  that produces the activation (GroupNorm -> SiLU -> quantize -> E4M3 store);
* each 4-bit linear / 1x1 conv is ``torch._scaled_mm`` on E4M3 operands (FP8 tensor cores, unit scales; the
  column scale ``s_a * s_w[n]`` and the bias are a pointwise epilogue that Inductor fuses into the consumer); each
  k x k conv is an NHWC im2col of the E4M3 activation (``msfp_fast::im2col_e4m3``, one Triton kernel) and the same
  GEMM; its output is NHWC, so activations stay channels-last end to end (no layout transforms);
* the zero point of an activation quantizer goes into the bias (linears, unpadded convs) or into a per-position
  map ``conv(P, W_deq)`` precomputed for the graph's spatial size (padded convs), as the Triton runner does;
* weights stay resident as packed 4-bit codes (``weights="packed"``, 0.5 bytes per parameter plus scales) and are
  decoded to E4M3 by bandwidth-bound Triton kernels, one launch per group of consecutive layers
  (``msfp_fast::decode_w4_group``, up to ``DECODE_GROUP_BYTES`` of transient E4M3 per group), or resident as E4M3
  (``weights="fp8"``, 1 byte per parameter), or ``"mixed"``: E4M3 for layers of at most ``SMALL_LAYER`` weights,
  packed for the rest;

Quantizers the GEMMs cannot take (8-bit formats, attention Q/K/V, per-channel activation scales) stay fake
quantization, written as pointwise torch ops (``fake_quant``) on bfloat16 tensors. The numerics differ from the
float32 reference graph in: bfloat16 activations between ops (the quantizers see bfloat16-rounded inputs), FP8 GEMM
accumulation (Hopper), bfloat16 GEMM outputs, bfloat16 attention, GELU's tanh form (``gelu_fast``), the GroupNorms'
SiLUs as x * sigmoid(x) (``silu_gn``) and the quantizers' multiplication by p / s in place of the division
(``grid_fast``), the last three the defaults on CUDA at bf16 (``CUDA_BF16_DEFAULTS``); see docs/triton.md for the
measured difference.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

import msfp_compiler.ops  # noqa: F401  (defines torch.ops.msfp.*)
from msfp_compiler.formats import FPFormat, IntFormat
from msfp_compiler.ops import get_format, unpack_codes
from msfp_compiler.talora import chosen_set

from .fast_ops import conv_out_size, e4m3_lut, group_scale_shift, pack_halves  # also defines torch.ops.msfp_fast.*

__all__ = ["grid_round", "fake_quant", "grid_e4m3", "PartQuant", "FastGemm", "DecodeGroup", "FastUNet", "build_fast",
           "FastReport", "weight_bytes", "sdpa_fp8_fq", "flash_fp8_fq", "fp8_head_dim", "group_norm_channels",
           "group_norm_auto", "group_norm_triton", "concat_parts", "cat_nhwc", "grid_fast", "fp8_grid",
           "quant_multiplier", "silu_gn", "CUDA_BF16_DEFAULTS"]

aten = torch.ops.aten
_Q = torch.ops.msfp.quantize.default
_QF = torch.ops.msfp.quantize_folded.default
_DQP = torch.ops.msfp.dequantize_packed.default
_FP8 = torch.float8_e4m3fn
_BF16 = torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# Quantization as pointwise torch ops (what Inductor fuses into the producer kernels)
# ----------------------------------------------------------------------------------------------------------------


class _Spec(NamedTuple):
    """What grid_round needs of a format, as plain Python values (torch.compile cannot trace the Format objects'
    cached properties)."""

    kind: str  # "int", "fp" (bit rounding) or "table"
    signed: bool
    max: float
    man_bits: int
    emin: int
    levels: tuple[float, ...]
    thresholds: tuple[float, ...]
    table: tuple[float, ...]  # value of each code


_SPECS: dict[str, _Spec] = {}


def _spec(fmt: str) -> _Spec:
    """The format's spec; computed on first use outside the compiled region (build_fast does it for every format
    of the graph), a plain dict lookup inside it."""
    if fmt not in _SPECS:
        f = get_format(fmt)
        if isinstance(f, IntFormat):
            kind, man, emin = "int", 0, 0
        elif isinstance(f, FPFormat) and (f.man_bits > 0 or f.bias % 2 == 1):
            kind, man, emin = "fp", f.man_bits, 1 - f.bias
        else:
            kind, man, emin = "table", 0, 0
        _SPECS[fmt] = _Spec(kind, f.signed, f.max, man, emin, tuple(f.levels.tolist()), tuple(f.thresholds.tolist()),
                            tuple(f.code_table.tolist()))
    return _SPECS[fmt]


for _f in ("e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"):
    _spec(_f)  # the formats the compiler chooses from, ready before any tracing


def _bit_rne(a: torch.Tensor, man_bits: int) -> torch.Tensor:
    """Round positive float32 a to man_bits mantissa bits, nearest, ties to even, on the bits (no float rounding
    tricks, so FMA contraction in generated code cannot change it)."""
    drop = 23 - man_bits
    bits = a.view(torch.int32)
    lsb = (bits >> drop) & 1
    bits = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


def grid_round(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """``get_format(fmt).round_to_grid(v)`` (nearest, ties to even code, saturating) in ops Inductor fuses.

    Bit-identical to the reference for finite inputs (tested): normal binades by integer RNE of the float32 bits
    (for M = 0 the float32 exponent LSB is the code parity, true when the bias is odd), the subnormal range by
    ``round(v * 2^(M - emin)) * 2^(emin - M)`` (exact power-of-two scalings, round half to even on the code).
    Formats outside that (M = 0 with an even bias) use the threshold sum, also exact. NaN is not handled (the
    reference maps it to +-max).
    """
    f = _spec(fmt)
    v = v.float()
    a = v.abs() if f.signed else v.clamp_min(0.0)
    a = a.clamp_max(f.max)
    if f.kind == "int":
        r = torch.round(a)
    elif f.kind == "fp":
        sub = torch.round(a * 2.0 ** (f.man_bits - f.emin)) * 2.0 ** (f.emin - f.man_bits)
        r = torch.where(a < 2.0 ** f.emin, sub, _bit_rne(a, f.man_bits))
    else:
        lv, r = f.levels, torch.zeros_like(a)
        for i, t in enumerate(f.thresholds):
            r = r + torch.where(a > t, lv[i + 1] - lv[i], 0.0)
    return torch.copysign(r, v) if f.signed else r + 0.0


def _scaled(x: torch.Tensor, scale: Any, zero_point: Any) -> torch.Tensor:
    """(x - z) / s in float32, as the reference computes it (a Python-number scale is a 0-d constant)."""
    return (x.float() - zero_point) / scale


# FP8 formats whose round-to-nearest-even conversion is a grid_round: (dtype, its emin) by mantissa bits
_FP8_GRID = {2: (torch.float8_e5m2, -14), 3: (torch.float8_e4m3fn, -6)}


def fp8_grid(fmt: str) -> tuple[torch.dtype, float] | None:
    """(FP8 dtype, power of two p) with ``grid_round(v, fmt) == (clamp(v, -max, max) * p).to(dtype) / p`` (unsigned:
    clamp to [0, max]), or None. A format of M = 2 or 3 mantissa bits has E5M2's or E4M3's rounding once its
    smallest normal binade 2^emin is moved onto theirs (p = 2^(emin_fp8 - emin)): the same M bits in every normal
    binade, the same subnormal step 2^(emin - M) (scaled), ties to even, and its largest value (a grid point, so
    nothing rounds above it) inside the FP8 range. Hopper converts float32 pairs to FP8 in one instruction."""
    f = _spec(fmt)
    if f.kind != "fp" or f.man_bits not in _FP8_GRID:
        return None
    dtype, emin = _FP8_GRID[f.man_bits]
    p = 2.0 ** (emin - f.emin)
    return (dtype, p) if f.max * p <= torch.finfo(dtype).max else None


def quant_multiplier(scale: float | torch.Tensor, fmt: str) -> torch.Tensor:
    """``p / s`` as a float32 tensor of the scale's shape (p: ``fp8_grid``'s power of two, 1 for other formats):
    what ``grid_fast`` multiplies (x - z) by. Rounded once from the float64 quotient, so (x - z) * it is within 1.5
    float32 ulps of ((x - z) / s) * p (CUDA's division in Triton is div.full.f32, within 2 ulps)."""
    g = fp8_grid(fmt)
    return ((g[1] if g else 1.0) / torch.as_tensor(scale, dtype=torch.float64)).float()


def grid_fast(x: torch.Tensor, zero_point: Any, mult: Any, fmt: str) -> torch.Tensor:
    """``grid_round((x - z) / s, fmt)`` as float32, with ``mult = quant_multiplier(s, fmt)``: a multiplication
    instead of a division, and for M = 2 / 3 formats the rounding as one FP8 conversion (``fp8_grid``) instead of
    the bit arithmetic and the subnormal branch. In SD1.5's GroupNorm + SiLU + quantizer kernel (sm_90 SASS) the
    two save ~8 instructions per element (2.6 the multiplication, 5-6.5 the conversion; docs/triton.md session
    19). The rounding is grid_round's for the same
    scaled value (tested); the scaled value can differ from the reference's by the multiplication's rounding, which
    moves a code only where (x - z) / s lies within about an ulp of a rounding boundary. For unsigned formats a -0.0
    input stays -0.0 (grid_round gives +0.0): the same value, one instruction per element less."""
    v = (x.float() - zero_point) * mult
    g = fp8_grid(fmt)
    if g is None:
        return grid_round(v, fmt)
    dtype, p = g
    f = _spec(fmt)
    v = v.clamp(-f.max * p if f.signed else 0.0, f.max * p)
    return v.to(dtype).float() * (1.0 / p)


def fake_quant(x: torch.Tensor, scale: Any, zero_point: Any, fmt: str, folded: bool = False,
               out_dtype: torch.dtype | None = _BF16, mult: Any = None) -> torch.Tensor:
    """msfp::quantize (``folded``: msfp::quantize_folded) as pointwise ops, result in ``out_dtype`` (None: x's).
    ``mult`` (``quant_multiplier(scale, fmt)``): the grid by ``grid_fast`` instead of ``grid_round``."""
    if mult is None:
        q = grid_round(_scaled(x, scale, zero_point), fmt) * scale
    else:
        q = grid_fast(x, zero_point, mult, fmt) * scale
    if not folded:
        q = q + zero_point
    return q.to(out_dtype or x.dtype)


def grid_e4m3(x: torch.Tensor, scale: Any, zero_point: Any, fmt: str) -> torch.Tensor:
    """The activation's grid values (quantize(x) = z + s * grid) as E4M3: the A operand of the FP8 GEMM."""
    return grid_round(_scaled(x, scale, zero_point), fmt).to(_FP8)


class PartQuant(torch.nn.Module):
    """The fake quantizers of a merged GEMM's parts (Q, K, V: each quantized before attention) as one pointwise
    function of the whole output, with per-column parameters: ``fake_quant`` of part j on part j's columns, bit for
    bit (the same float32 operations, scalars broadcast as column vectors), so Inductor can emit one kernel for all
    parts instead of one per part. Formats of grid_round's ``int`` and ``fp`` kinds; signedness may differ by part."""

    def __init__(self, quants: list[tuple[float, float, str, bool]], widths: list[int]):
        """quants: (scale, zero point, format, folded) of each part; widths: the parts' column counts."""
        super().__init__()
        cols: dict[str, list] = {k: [] for k in ("scale", "zero", "vmax", "fsub", "finv", "thr", "signed", "folded",
                                                 "drop")}
        for (scale, zero, fmt, folded), w in zip(quants, widths):
            f = _spec(fmt)
            if f.kind not in ("int", "fp"):
                raise ValueError(f"format {fmt}: no per-column form (threshold table)")
            m, emin = (0, 0) if f.kind == "int" else (f.man_bits, f.emin)
            vals = {"scale": scale, "zero": zero, "vmax": f.max, "signed": f.signed, "folded": folded,
                    # int: always the round() branch (threshold +inf, unit factors), as grid_round's torch.round(a)
                    "fsub": 1.0 if f.kind == "int" else 2.0 ** (m - emin),
                    "finv": 1.0 if f.kind == "int" else 2.0 ** (emin - m),
                    "thr": math.inf if f.kind == "int" else 2.0 ** emin, "drop": 23 - m}
            for k, v in vals.items():
                cols[k] += [v] * w
        for k in ("scale", "zero", "vmax", "fsub", "finv", "thr"):
            self.register_buffer(k, torch.tensor(cols[k], dtype=torch.float32))
        for k in ("signed", "folded"):
            self.register_buffer(k, torch.tensor(cols[k], dtype=torch.bool))
        drop = torch.tensor(cols["drop"], dtype=torch.int32)
        self.register_buffer("drop", drop)
        self.register_buffer("half_m1", (1 << (drop - 1)) - 1)  # _bit_rne's rounding constant per column
        self.register_buffer("mask", ~((1 << drop) - 1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        v = (y.float() - self.zero) / self.scale
        a = torch.minimum(torch.where(self.signed, v.abs(), v.clamp_min(0.0)), self.vmax)
        sub = torch.round(a * self.fsub) * self.finv
        bits = a.view(torch.int32)
        rne = ((bits + self.half_m1 + ((bits >> self.drop) & 1)) & self.mask).view(torch.float32)
        r = torch.where(a < self.thr, sub, rne)
        r = torch.where(self.signed, torch.copysign(r, v), r + 0.0)
        q = r * self.scale
        return torch.where(self.folded, q, q + self.zero).to(y.dtype)


def decode_packed(halves: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor, shape: list[int],
                  out_dtype: torch.dtype = _BF16) -> torch.Tensor:
    """msfp::dequantize_packed (for the layers left unfused) from the fast path's own layout: ``halves`` [1, N, K'/2]
    (``pack_halves`` of the codes as [N, K], K' = K rounded up to even) decoded by ``msfp_fast::decode_w4``, then
    ``scale * value`` in float32 as the reference computes it (every 4-bit value is exact in E4M3)."""
    k = math.prod(shape[1:])
    w = torch.ops.msfp_fast.decode_w4(halves, lut)[:, :k].float().reshape(shape)
    return (w * scale).to(out_dtype)


def halves_of_packed(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The compiler's packed codes (``msfp_compiler.ops.pack_codes``: flat, element 2i in the low nibble) in the
    layout ``decode_packed`` reads: [1, N, K'/2] halves rows, K' = K rounded up to even (padded with code 0)."""
    n, k = shape[0], math.prod(shape[1:])
    codes = unpack_codes(packed.reshape(-1), n * k).reshape(n, k)
    return pack_halves(F.pad(codes, (0, k % 2)))[None]


# ----------------------------------------------------------------------------------------------------------------
# The fused layer
# ----------------------------------------------------------------------------------------------------------------


class FastGemm(torch.nn.Module):
    """linear / conv2d of a quantized activation and 4-bit weights as one FP8 ``torch._scaled_mm``.

    ``y = (s_a s_w[n]) (G_a @ Q_w^T) + beta[n] (+ zmap[l, n])``: G_a the activation's E4M3 grid values, Q_w the
    weight's E4M3 code values. Convs read an NHWC im2col (K ordered kh, kw, c) and return an NCHW view of NHWC memory.
    TALoRA weight sets (S > 1) are selected per call by ``set_index``.
    """

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, wfmt: str, a_scale: float, a_zero: float,
                 afmt: str, bias: torch.Tensor | None, zp_in_bias: bool, weights: str = "packed",
                 conv: dict | None = None, w_deq_conv: torch.Tensor | None = None, zmap_args: tuple | None = None,
                 dtype: torch.dtype = _BF16):
        """codes uint8 [S, N, K] (conv: K in kh, kw, c order); w_scale [S, N]; bias [N] or None."""
        super().__init__()
        s, n, k = codes.shape
        self.sets, self.n, self.k = s, n, k
        _spec(afmt), _spec(wfmt)
        self.afmt, self.a_scale, self.a_zero = afmt, float(a_scale), float(a_zero)
        # 0-d buffers rather than Python constants: layers of one shape and format then generate the same kernel
        # source, which Inductor compiles once (baked constants made every layer's kernels unique)
        self.register_buffer("a_s", torch.tensor(self.a_scale))
        self.register_buffer("a_z", torch.tensor(self.a_zero))
        self.register_buffer("a_mult", quant_multiplier(self.a_scale, afmt))
        self.fast_quant = False  # the activation's grid by grid_fast (build_fast(quant_math="fast"))
        self.conv = conv
        self.weights = weights
        self.dtype = dtype  # of the output (bf16 on the fast path; float32 to check the rewrite itself)
        table = get_format(wfmt).code_table.double()
        w_deq = table[codes.long()] * w_scale.double()[..., None]  # [S, N, K]
        beta = torch.zeros(s, n, dtype=torch.float64)
        if bias is not None:
            beta += bias.double().reshape(1, n)
        if not zp_in_bias:
            beta += self.a_zero * w_deq.sum(-1)
        self.register_buffer("beta", beta.float())  # added to the bf16 GEMM output in fp32, then rounded once
        self.register_buffer("scale_b", (self.a_scale * w_scale.double()).float().reshape(s, 1, n))
        self.register_buffer("one", torch.ones((), dtype=torch.float32))
        self.group_offset = 0  # where its weights start in its DecodeGroup's output (when grouped)
        self.parts: list[int] | None = None  # merged layers (merge): the output's split along N
        self.part_quant: PartQuant | None = None  # the parts' fake quantizers, applied before the split
        self.lut_rows = [n]  # rows decoded by each row of lut ([16] here, [R, 16] in merged layers)
        self.implicit = False  # k x k stride-1 conv as msfp_fast::conv_e4m3 instead of im2col + cuBLAS (implicit_conv)
        if weights == "fp8":
            self.register_buffer("w8", table[codes.long()].to(_FP8).contiguous())
        elif weights == "packed":  # decoded per step by one bandwidth-bound Triton kernel (w4_decode)
            self.register_buffer("packed", pack_halves(codes))
            self.register_buffer("lut", e4m3_lut(wfmt))
        else:
            raise ValueError(f"unknown weights mode {weights!r} (packed, fp8 or mixed)")
        zmap = None
        if conv is not None and zmap_args is not None:
            # [S, L, N], bf16 on the bf16 path: it only corrects the bf16 GEMM output (its own rounding is 2^-9 of
            # the zero-point term), and float32 maps were ~90 MB resident on SD1.5
            zmap = _zmap(w_deq_conv, *zmap_args).to(torch.float32 if dtype == torch.float32 else _BF16)
        self.register_buffer("zmap", zmap)

    def weight_e4m3(self, set_index: torch.Tensor | None = None, wflat: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] E4M3 weights of the chosen set: resident (fp8), a slice of the decode group's output ``wflat``
        (packed, grouped), or decoded by one launch of its own (packed)."""
        if wflat is not None:
            return wflat[self.group_offset:self.group_offset + self.n * self.k].view(self.n, self.k)
        if self.weights == "fp8":
            w = self.w8
            return w[0] if self.sets == 1 else w.index_select(0, set_index.reshape(1).long())[0]
        if self.lut.dim() == 1:
            return torch.ops.msfp_fast.decode_w4(self.packed, self.lut, None if self.sets == 1 else set_index)
        rows = self.packed.split(self.lut_rows, dim=1)  # a merged layer of several formats (one set)
        return torch.cat([torch.ops.msfp_fast.decode_w4(r.contiguous(), lut) for r, lut in zip(rows, self.lut)])

    @classmethod
    def merge(cls, layers: list["FastGemm"]) -> "FastGemm":
        """One GEMM for linears that read the same quantized activation (Q/K/V projections of an attention block,
        every cross-attention K/V projection of the text states): weights, scales and biases concatenated along N;
        forward returns the members' outputs as a tuple."""
        f = layers[0]
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        m.sets, m.k, m.n = 1, f.k, sum(x.n for x in layers)
        m.afmt, m.a_scale, m.a_zero, m.conv, m.weights, m.dtype = f.afmt, f.a_scale, f.a_zero, None, f.weights, f.dtype
        m.group_offset, m.parts, m.part_quant, m.implicit = 0, [x.n for x in layers], None, False
        m.fast_quant = f.fast_quant
        for name in ("a_s", "a_z", "a_mult", "one"):
            m.register_buffer(name, getattr(f, name))
        m.register_buffer("beta", torch.cat([x.beta for x in layers], 1))
        m.register_buffer("scale_b", torch.cat([x.scale_b for x in layers], 2))
        m.register_buffer("zmap", None)
        if f.weights == "fp8":
            m.register_buffer("w8", torch.cat([x.w8 for x in layers], 1))
            m.lut_rows = [m.n]
        else:
            m.register_buffer("packed", torch.cat([x.packed for x in layers], 1))
            m.register_buffer("lut", torch.cat([x.lut.reshape(-1, 16) for x in layers]))
            m.lut_rows = [r for x in layers for r in x.lut_rows]
        return m

    def _gemm(self, a: torch.Tensor, set_index: torch.Tensor | None, wflat: torch.Tensor | None) -> torch.Tensor:
        """a @ W^T of the E4M3 rows a in ``self.dtype`` (cuBLAS FP8)."""
        w = self.weight_e4m3(set_index, wflat)
        # tensorwise unit scales: the per-column scale joins beta in the pointwise epilogue Inductor fuses into the
        # consumer (rowwise scales needed a [M, 1] ones tensor written per GEMM, one more kernel each)
        return torch._scaled_mm(a, w.t(), self.one, self.one, out_dtype=self.dtype, use_fast_accum=True)

    def _pick(self, t: torch.Tensor, set_index: torch.Tensor | None) -> torch.Tensor:
        return t[0] if self.sets == 1 else t.index_select(0, set_index.reshape(1).long())[0]

    def forward(self, x: torch.Tensor, set_index: torch.Tensor | None = None,
                wflat: torch.Tensor | None = None) -> torch.Tensor:
        """x: the quantizer's input (any float dtype / strides); wflat: the output of this layer's DecodeGroup.
        Returns bfloat16."""
        if self.fast_quant:
            g = grid_fast(x, self.a_z, self.a_mult, self.afmt)
        else:
            g = grid_round(_scaled(x, self.a_s, self.a_z), self.afmt)
        if self.conv is None:
            a = g.reshape(-1, self.k).to(_FP8).contiguous()  # _scaled_mm wants A row-major (a view may not be)
            lead = x.shape[:-1]
            y = self._gemm(a, set_index, wflat)
        elif self.implicit:
            y, lead = self._implicit_conv(g, set_index, wflat)
        else:
            a, lead = self._im2col(g)
            y = self._gemm(a, set_index, wflat)
        m = y.shape[0]
        y = y.float() * self._pick(self.scale_b, set_index)
        if self.zmap is not None:
            y = (y.view(-1, self.zmap.shape[1], self.n) + self._pick(self.zmap, set_index)).view(m, self.n)
        y = (y + self._pick(self.beta, set_index)).to(self.dtype)
        if self.conv is None:
            y = y.view(*lead, self.n)
            if self.parts is None:
                return y
            if self.part_quant is not None:  # one kernel quantizes every part; the parts are views of its output
                return tuple(self.part_quant(y).split(self.parts, dim=-1))
            return tuple(p.contiguous() for p in y.split(self.parts, dim=-1))
        b, ho, wo = lead
        return y.view(b, ho, wo, self.n).permute(0, 3, 1, 2)

    def _implicit_conv(self, g: torch.Tensor, set_index: torch.Tensor | None,
                       wflat: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The conv's raw GEMM output [B*Ho*Wo, N] (bf16, as _gemm returns it) by the implicit-GEMM FP8 kernel,
        which reads the NHWC E4M3 activation directly (no im2col buffer)."""
        b, c, h, w = g.shape
        kern, stride, pads = list(self.conv["kernel"]), list(self.conv["stride"]), list(self.conv["pads"])
        ho, wo = conv_out_size(h, w, kern, stride, pads)
        nhwc = g.permute(0, 2, 3, 1).to(_FP8).contiguous()
        y = torch.ops.msfp_fast.conv_e4m3(nhwc, self.weight_e4m3(set_index, wflat), kern, stride, pads)
        return y, (b, ho, wo)

    def _im2col(self, g: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B*Ho*Wo, kh*kw*C] E4M3 rows of the grid values g [B, C, H, W]; padding holds grid 0 (E4M3 +0.0)."""
        kh, kw = self.conv["kernel"]
        sh, sw = self.conv["stride"]
        left, right, top, bottom = self.conv["pads"]
        b, c, h, w = g.shape
        ho, wo = conv_out_size(h, w, [kh, kw], [sh, sw], [left, right, top, bottom])
        nhwc = g.permute(0, 2, 3, 1).to(_FP8).contiguous()  # Inductor fuses this store into the producer
        if kh == kw == sh == sw == 1 and not any(self.conv["pads"]):
            return nhwc.reshape(-1, c), (b, ho, wo)
        cols = torch.ops.msfp_fast.im2col_e4m3(nhwc, [kh, kw], [sh, sw], [left, right, top, bottom])
        return cols, (b, ho, wo)


class DecodeGroup(torch.nn.Module):
    """The packed weights of consecutive layers, decoded to E4M3 by one launch (``msfp_fast::decode_w4_group``).

    Takes the members' ``packed`` / ``lut`` buffers over (the 4-bit codes stay resident once); each member reads its
    [N, K] slice of the group's output, a transient buffer of the group's decoded size."""

    def __init__(self, layers: list[FastGemm], block: int | None = None):
        """block: bytes per kernel program (a power of two, >= 16; each layer starts on a block boundary). Default:
        the largest of 4096, 2048, ..., 256 whose padding stays under 1/32 of the codes (4096 on SD1.5). Every
        layer's K must be a multiple of 8 (the kernel moves int32 words)."""
        super().__init__()
        sizes = [m.packed[0].numel() for m in layers]
        if block is None:
            block = next((b for b in (4096, 2048, 1024, 512) if sum(-s % b for s in sizes) * 32 <= sum(sizes)), 256)
        if block < 16 or block & (block - 1) or any(m.k % 8 for m in layers):
            raise ValueError(f"decode group: block {block} must be a power of two >= 16 and every K a multiple of 8")
        parts, meta, block_layer, row_lut, start = [], [], [], [], 0
        luts: dict[tuple[int, ...], int] = {}
        for i, m in enumerate(layers):
            p = m.packed[0].reshape(-1)
            blocks = -(-p.numel() // block)
            parts += [p, p.new_zeros(blocks * block - p.numel())]
            meta.append((start // 4, m.k // 8, p.numel() // 4, len(row_lut)))  # in int32 words
            block_layer += [i] * blocks
            for lut, rows in zip(m.lut.reshape(-1, 16), m.lut_rows):
                key = tuple(lut.tolist())  # one table per format: row_lut fits a byte
                row_lut += [luts.setdefault(key, len(luts))] * rows
            m.group_offset = 2 * start
            start += blocks * block
        self.register_buffer("packed", torch.cat(parts))
        self.register_buffer("luts", torch.tensor(list(luts), dtype=torch.uint8))
        self.register_buffer("row_lut", torch.tensor(row_lut, dtype=torch.uint8))
        self.register_buffer("block_layer", torch.tensor(block_layer, dtype=torch.int32))
        if 2 * start >= 2**31:
            raise ValueError(f"decode group of {2 * start} bytes: over the kernel's int32 offsets")
        self.register_buffer("meta", torch.tensor(meta, dtype=torch.int32))
        for m in layers:
            m.packed = m.lut = None

    def forward(self) -> torch.Tensor:
        return torch.ops.msfp_fast.decode_w4_group(self.packed, self.luts, self.row_lut, self.block_layer, self.meta)


# Decoded E4M3 bytes per decode group (the transient buffer one group's layers read their weights from). One launch
# per layer was launch-bound (280 launches of 3-20 us per SD1.5 step on the H200, 0.8 ms at any batch size); 64 MiB
# makes ~14 groups on SD1.5, each launch long enough to run at memory bandwidth. 0: one launch per layer.
DECODE_GROUP_BYTES = 64 << 20


def _group_decodes(gm: fx.GraphModule, group_bytes: int) -> int:
    """Gather the packed single-set FastGemm layers, in graph order, into DecodeGroups of at most ``group_bytes``
    decoded bytes (a larger layer makes a group of its own); returns the number of groups."""
    groups: list[list[fx.Node]] = []
    size = 0
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, FastGemm) or mod.weights != "packed" or mod.sets != 1 or mod.k % 8:
            continue  # TALoRA sets and K % 8 != 0 (the group kernel moves int32 words) decode on their own
        if not groups or size + mod.n * mod.k > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(node)
        size += mod.n * mod.k
    for i, nodes in enumerate(groups):
        name = f"msfp_fast_decode_group_{i}"
        gm.add_submodule(name, DecodeGroup([gm.get_submodule(n.target) for n in nodes]))
        with gm.graph.inserting_before(nodes[0]):
            wflat = gm.graph.call_module(name, ())
        for n in nodes:
            n.kwargs = {**n.kwargs, "wflat": wflat}
    return len(groups)


def _merge_shared_inputs(gm: fx.GraphModule) -> int:
    """Merge the single-set linears that read the same activation through the same quantizer into one FastGemm
    each (FastGemm.merge); returns how many GEMMs that removes."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, FastGemm) or mod.conv is not None or mod.sets != 1 or node.kwargs:
            continue
        key = (node.args[0], mod.afmt, mod.a_scale, mod.a_zero, mod.weights, mod.dtype, mod.k)
        groups.setdefault(key, []).append(node)
    removed = 0
    for i, nodes in enumerate(g for g in groups.values() if len(g) > 1):
        name = f"msfp_fast_merged_{i}"
        gm.add_submodule(name, FastGemm.merge([gm.get_submodule(n.target) for n in nodes]))
        with gm.graph.inserting_before(nodes[0]):  # the first reader in graph order: before every member's users
            merged = gm.graph.call_module(name, (nodes[0].args[0],))
        for j, n in enumerate(nodes):
            with gm.graph.inserting_before(n):
                item = gm.graph.call_function(operator.getitem, (merged, j))
            item.meta = dict(n.meta)
            n.replace_all_uses_with(item)
            gm.graph.erase_node(n)
        removed += len(nodes) - 1
    return removed


_VIEWS = (aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.unsqueeze.default)


def _part_quantizer(item: fx.Node) -> fx.Node | None:
    """The fake_quant node that reads a merged GEMM's part through views only, each node with one user, or None."""
    cur = item
    while len(cur.users) == 1:
        (user,) = cur.users
        if user.op != "call_function" or user.args[0] is not cur:
            return None
        if user.target is fake_quant:
            return user
        if user.target not in _VIEWS:
            return None
        cur = user
    return None


def _quantize_parts_in_epilogue(gm: fx.GraphModule) -> int:
    """Move the per-part fake quantizers after merged GEMMs (Q/K/V before attention) into the GEMM as one
    ``PartQuant``; returns how many quantizers moved. A merged GEMM is left alone unless every part goes through
    views to a per-tensor fake quantizer of an int/fp-kind format with constant parameters."""
    from .runtime import _const

    moved = 0
    for node in list(gm.graph.nodes):
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(mod, FastGemm) or mod.parts is None or mod.part_quant is not None:
            continue
        items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if len(items) != len(node.users) or sorted(items) != list(range(len(mod.parts))):
            continue
        fqs = [_part_quantizer(items[j]) for j in range(len(mod.parts))]
        quants = []
        for fq in fqs:
            if fq is None or fq.args[5] != mod.dtype:
                break
            s, z = (_const(gm, a) if isinstance(a, fx.Node) else torch.tensor(float(a)) for a in fq.args[1:3])
            if s is None or z is None or s.numel() != 1 or z.numel() != 1 or _spec(fq.args[3]).kind == "table":
                break
            quants.append((float(s), float(z), fq.args[3], bool(fq.args[4])))
        if len(quants) != len(fqs):
            continue
        mod.part_quant = PartQuant(quants, mod.parts)
        for fq in fqs:
            fq.replace_all_uses_with(fq.args[0])
            gm.graph.erase_node(fq)
        moved += len(fqs)
    return moved


def _route_implicit_convs(gm: fx.GraphModule) -> int:
    """Mark the single-set k x k stride-1 convs whose channel count the kernel takes (C % 16) for the implicit-GEMM
    conv; returns how many. Strided convs keep im2col (the kernel's pointer gather is their only form there); the
    float32 checking dtype keeps _scaled_mm's float32 output (the kernel rounds to bf16)."""
    count = 0
    for mod in gm.modules():
        if isinstance(mod, FastGemm) and mod.conv is not None and mod.sets == 1 and mod.dtype == _BF16:
            kh, kw = mod.conv["kernel"]
            if kh * kw > 1 and tuple(mod.conv["stride"]) == (1, 1) and (mod.k // (kh * kw)) % 16 == 0:
                mod.implicit = True
                count += 1
    return count


def _zmap(w_deq: torch.Tensor, c: int, h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
          pads: tuple[int, int, int, int], z_valid: float, z_pad: float) -> torch.Tensor:
    """What the border contributes where the GEMM pads with grid 0: conv(P, W_deq), P = z_valid inside the image and
    z_pad on the padding. w_deq [S, N, C, kh, kw] -> [S, Ho*Wo, N] (NHWC order)."""
    left, right, top, bottom = pads
    p = torch.full((1, c, h + top + bottom, w + left + right), z_pad, dtype=torch.float64)
    p[:, :, top:top + h, left:left + w] = z_valid
    s, n = w_deq.shape[:2]
    zm = F.conv2d(p, w_deq.double().reshape(s * n, *w_deq.shape[2:]), stride=stride)  # [1, S*N, Ho, Wo]
    return zm.reshape(s, n, -1).transpose(1, 2).float().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Graph rewrite
# ----------------------------------------------------------------------------------------------------------------


def _linear_as(dtype: torch.dtype, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))


def _conv2d_as(dtype: torch.dtype, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               *args: Any) -> torch.Tensor:
    return F.conv2d(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), *args)


def _sdpa_as(dtype: torch.dtype, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
             **kwargs: Any) -> torch.Tensor:
    """SDPA in dtype, its output in [B, L, heads, d] memory as the captured graph's views expect (the flash kernels
    write that layout; float32 on the GPU runs a kernel that writes [B, heads, L, d], which those views reject)."""
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), *args, **kwargs)
    return out.transpose(1, 2).contiguous().transpose(1, 2) if out.dim() == 4 else out


def group_norm_channels(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, eps: float = 1e-5, *_: Any) -> torch.Tensor:
    """``F.group_norm`` of an [N, C, H, W] activation kept in NHWC memory, as reductions Inductor reads coalesced.

    Inductor lowers ``aten.group_norm`` through a reshape to [N, G, C/G * H * W], which on NHWC memory reads each
    group's C/G channels (20 bytes of every 640-byte row at SD1.5's 320 channels) position by position: its SD1.5
    GroupNorm kernels run an order of magnitude below the copy bandwidth (docs/triton.md session 13). Here the
    statistics are per channel over the positions, channels innermost (Welford, float32), then combined into the
    groups exactly (equal counts: the group mean is the mean of the channel means, the group variance the mean of
    the channel variances plus the variance of the channel means); the normalization is one scale and shift per
    (sample, channel) that Inductor fuses with the producer and the consumers (SiLU, the quantizer) into one
    pointwise kernel. The output is NHWC memory viewed as [N, C, H, W], as the GEMMs' outputs are."""
    if x.dim() != 4:
        return F.group_norm(x, groups, weight, bias, eps)
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view where x is NHWC memory
    var_c, mean_c = torch.var_mean(rows.float(), dim=1, correction=0)  # [N, C]
    mean_cg = mean_c.view(n, groups, c // groups)
    mean_g = mean_cg.mean(-1, keepdim=True)
    var_g = (var_c.view(n, groups, c // groups).mean(-1, keepdim=True)
             + (mean_cg - mean_g).square().mean(-1, keepdim=True))
    return _group_norm_apply(x, groups, mean_g, torch.rsqrt(var_g + eps), weight, bias)


def _group_norm_apply(x: torch.Tensor, groups: int, mean_g: torch.Tensor, rstd_g: torch.Tensor,
                      weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm's normalization from the per-(sample, group) mean and 1 / std (N * G elements each) as one scale
    and shift per (sample, channel) over x's NHWC rows; output NHWC memory viewed as [N, C, H, W]."""
    scale, shift = group_scale_shift(mean_g.reshape(x.shape[0], groups), rstd_g, x.shape[1], weight, bias)
    return _scale_shift_rows(x, scale, shift)


def _scale_shift_rows(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with one float32 scale and shift per (sample, channel) ([N, C] each) over x's NHWC
    rows; output NHWC memory viewed as [N, C, H, W]."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view where x is NHWC memory
    y = rows.float() * scale[:, None, :] + shift[:, None, :]
    return y.to(x.dtype).contiguous().view(n, h, w, c).permute(0, 3, 1, 2)  # eager: the broadcasts can reorder y


def group_norm_triton(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, eps: float = 1e-5, *_: Any,
                      parts: list[torch.Tensor] | None = None, affine: bool = False) -> torch.Tensor:
    """``F.group_norm`` of an [N, C, H, W] activation with the statistics from ``msfp_fast::gn_stats`` (our Triton
    kernels on CUDA: tiles of NHWC rows, per-group partials combined exactly; ``gn_stats``), the normalization one
    scale and shift per (sample, channel) that Inductor fuses with the producer and the consumers. ``parts``: the
    tensors x is the channel concatenation of (the up blocks' skip connections), read part by part for the
    statistics. ``affine``: the scale and shift come from ``msfp_fast::gn_scale_shift`` (the combine kernel writes
    them) instead of being recomputed per element from the group statistics and the weights in the apply kernel.
    Output NHWC memory viewed as [N, C, H, W], as ``group_norm_channels``."""
    if x.dim() != 4:
        return F.group_norm(x, groups, weight, bias, eps)
    if affine:
        ss = torch.ops.msfp_fast.gn_scale_shift(parts if parts else [x], groups, float(eps), weight, bias)
        return _scale_shift_rows(x, ss[0], ss[1])
    stats = torch.ops.msfp_fast.gn_stats(parts if parts else [x], groups, float(eps))
    return _group_norm_apply(x, groups, stats[0], stats[1], weight, bias)


GN_TRITON_MIN_BATCH = 4  # group_norm_auto: group_norm_triton from this batch size on, aten.group_norm below
# (SD1.5 on the H200: session 13, batch 8 16.31 vs 16.93 ms per step with group_norm_channels, batch 1 5.03 vs 4.80:
# its two more kernels per GroupNorm cost ~0.35 ms at any batch size, the coalesced reads gain ~0.12 ms per sample;
# session 14 call 1, batch 8: group_norm_triton 15.88 vs channels 16.28 ms, same process; batch 1 not measured)


def group_norm_auto(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *_: Any,
                    parts: list[torch.Tensor] | None = None, affine: bool = False) -> torch.Tensor:
    """``group_norm_triton`` for 4-d inputs of at least ``GN_TRITON_MIN_BATCH`` samples, else ``F.group_norm``
    (the batch size is static in each compiled graph; a dynamic one gets a guard)."""
    if x.dim() == 4 and x.shape[0] >= GN_TRITON_MIN_BATCH:
        return group_norm_triton(x, groups, weight, bias, eps, parts=parts, affine=affine)
    return F.group_norm(x, groups, weight, bias, eps)


FP8_ATTENTION_MIN_KV = 1024  # keys per query below which cuDNN's FP8 attention lost to bf16 (SD1.5 cross-attention,
# the 16x16 / 8x8 levels: 0.56-0.91x on the H200, bench_gpu_kernels --sections fp8attn); the same gate for our Triton
# kernel ("fp8-triton"), whose micro-bench times only the self-attentions it admits (--sections flashfp8)


def fp8_head_dim(d: int) -> int:
    """cuDNN's FP8 attention needs a head dim multiple of 16; below 64 a padded 64 ran faster than 48 (SD1.5's 40:
    0.495 vs 0.604 ms against bf16's 0.603 at batch 8 on the H200)."""
    return 64 if d <= 64 else -(-d // 16) * 16


def sdpa_fp8_fq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: tuple, kp: tuple, vp: tuple,
                scale: float | None = None, dtype: torch.dtype = _BF16) -> torch.Tensor:
    """Attention of the fake-quantized q, k, v (qp, kp, vp: each quantizer's scale, zero point and format) on FP8:
    the grid values go to ``msfp_fast::sdpa_fp8`` as E4M3 (exact: 4-bit grids), head dim zero-padded to
    ``fp8_head_dim``, with the scales as descales. K's zero point adds a constant to each score row (softmax drops
    it); V's comes back as + z_v (P's rows sum to 1); Q's must be 0 (``_fp8_attention_args`` checks). Rounds where
    the bf16 path does not: P and O to E4M3 (docs/triton.md session 12). Output as ``_sdpa_as``'s."""
    d = q.shape[-1]
    dp = fp8_head_dim(d)

    def e4m3(x: torch.Tensor, p: tuple) -> torch.Tensor:  # [B, H, S, dp] view of [B, S, H, dp] memory (BSHD)
        g = grid_round(_scaled(x, p[0], p[1]), p[2]).transpose(1, 2)
        return F.pad(g, (0, dp - d)).to(_FP8).transpose(1, 2)

    o8 = torch.ops.msfp_fast.sdpa_fp8(e4m3(q, qp), e4m3(k, kp), e4m3(v, vp), float(qp[0]), float(kp[0]), 1.0, 1.0,
                                      d ** -0.5 if scale is None else float(scale))
    o = (o8[..., :d].float() * vp[0] + vp[1]).to(dtype)
    return o.transpose(1, 2).contiguous().transpose(1, 2)


def flash_fp8_fq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qp: tuple, kp: tuple, vp: tuple,
                 scale: float | None = None, dtype: torch.dtype = _BF16) -> torch.Tensor:
    """``sdpa_fp8_fq``'s attention on our Triton FP8 flash kernel (``msfp_fast::flash_fp8``): the grid values as
    E4M3 at their own head dim (no padding copy), V written transposed ([B, H, D, T]: the kernel's K-major P @ V
    operand) by the quantizer's kernel, O in bfloat16 straight from the kernel. Rounds where the bf16 path does not:
    P to E4M3 (docs/triton.md session 17). Output as ``_sdpa_as``'s."""
    vt = grid_e4m3(v, *vp).transpose(-1, -2).contiguous()
    qk_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o = torch.ops.msfp_fast.flash_fp8(grid_e4m3(q, *qp), grid_e4m3(k, *kp), vt, float(qp[0]), float(kp[0]),
                                      float(vp[0]), float(vp[1]), qk_scale)
    return o if dtype == _BF16 else o.to(dtype)  # .to keeps the [B, S, H, D] memory; float32 builds get bf16 values


@dataclass
class FastReport:
    """What the rewrite turned into FP8 GEMMs and why the rest stayed bf16 fake quantization."""

    fused: dict[str, int] = field(default_factory=lambda: {"linear": 0, "conv2d": 0})
    skipped: dict[str, str] = field(default_factory=dict)
    fake_quant: int = 0
    decode_groups: int = 0
    merged_away: int = 0  # GEMMs saved by merging linears of one quantized input
    part_quant_moved: int = 0  # fake quantizers of merged GEMMs' parts moved into the GEMM (quantize_parts)
    implicit_convs: int = 0  # k x k convs run by the implicit-GEMM kernel (implicit_conv)
    fp8_attention: int = 0  # attentions run by msfp_fast::sdpa_fp8 (attention="fp8") or flash_fp8 ("fp8-triton")
    group_norms: int = 0  # GroupNorms as group_norm_channels / _auto / _triton (group_norm= "channels" etc.)
    split_concat: int = 0  # 1x1 convs on a per-part quantized concatenation as one FP8 GEMM per part
    cat_nhwc: int = 0  # 4-d channel concatenations laid out NHWC (cat_nhwc=True)
    gelu_tanh: int = 0  # exact GELUs as gelu_fast, the tanh form (gelu="tanh")
    gn_affine: int = 0  # Triton GroupNorms taking their scale and shift from msfp_fast::gn_scale_shift (gn_affine)
    fast_quant: int = 0  # quantizers by grid_fast (quant_math="fast")
    silu_gn: int = 0  # SiLUs of Triton GroupNorms as silu_gn (silu="sigmoid")

    def __str__(self) -> str:
        lines = [f"FP8 GEMMs: linear={self.fused['linear']} conv2d={self.fused['conv2d']}; "
                 f"bf16 fake quantizers kept: {self.fake_quant}; GEMMs saved by merging linears of one input: "
                 f"{self.merged_away}; packed-weight decode launches: {self.decode_groups}"
                 + (f"; part quantizers moved into merged GEMMs: {self.part_quant_moved}" if self.part_quant_moved
                    else "")
                 + (f"; implicit-GEMM convs: {self.implicit_convs}" if self.implicit_convs else "")
                 + (f"; FP8 attentions: {self.fp8_attention}" if self.fp8_attention else "")
                 + (f"; channels-last GroupNorms (or batch-dependent): {self.group_norms}" if self.group_norms else "")
                 + (f"; concatenation convs as one GEMM per part: {self.split_concat}" if self.split_concat else "")
                 + (f"; channel concatenations in NHWC memory: {self.cat_nhwc}" if self.cat_nhwc else "")
                 + (f"; GELUs in tanh form: {self.gelu_tanh}" if self.gelu_tanh else "")
                 + (f"; GroupNorms marked for the combined scale and shift (from GN_TRITON_MIN_BATCH samples under "
                    f"auto): {self.gn_affine}" if self.gn_affine else "")
                 + (f"; quantizers by grid_fast: {self.fast_quant}" if self.fast_quant else "")
                 + (f"; SiLUs after Triton GroupNorms as x * sigmoid(x): {self.silu_gn}" if self.silu_gn else "")]
        lines += [f"  kept {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def _spatial(node: fx.Node) -> tuple[int, int] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 4:
        h, w = val.shape[2:]
        if isinstance(h, int) and isinstance(w, int):
            return h, w
    return None


# "mixed" weights: layers of at most this many weights keep E4M3 resident (1 byte a weight instead of 0.5). Their
# decode is launch-bound (~3-5 us for any size below ~2M weights on the H200, results/gpu_sd15_kernels.json); on
# SD1.5 they are 115 of 280 layers but 33M of 859M weights: +17 MB resident (0.28x -> 0.29x of bf16).
SMALL_LAYER = 1 << 19


def _layer_weights(weights: str, n: int, k: int) -> str:
    if weights == "mixed":
        return "fp8" if n * k <= SMALL_LAYER else "packed"
    return weights


def _fuse_one(gm: fx.GraphModule, node: fx.Node, kind: str, weights: str, dtype: torch.dtype) -> FastGemm | str:
    from .runtime import _match_gemm  # its activations are exact in E4M3 (kernels.fp8_exact)

    args = list(node.args)
    match = _match_gemm(gm, node, kind)
    if isinstance(match, str):
        return match
    act, w, bias, pads, z_pad = match
    n = w.codes.shape[1]
    a_s, a_z = float(act.scale), float(act.zero_point)
    if kind == "linear":
        if w.codes.dim() != 3 or w.codes.shape[-1] % 16 or n % 16:
            return "linear weight not 2-D with K, N multiples of 16 (FP8 GEMM)"
        mode = _layer_weights(weights, n, w.codes.shape[-1])
        return FastGemm(w.codes, w.scale, w.fmt, a_s, a_z, act.fmt, bias, act.folded, mode, dtype=dtype)
    return _fuse_conv(args, act, w, bias, pads, z_pad, weights, dtype)


def _fuse_conv(args: list, act: Any, w: Any, bias: torch.Tensor | None, pads: tuple[int, int, int, int],
               z_pad: float, weights: str, dtype: torch.dtype) -> FastGemm | str:
    """The FastGemm of a conv2d (im2col order, zero-point border map where padding meets a zero point)."""
    from .runtime import conv_geometry

    geom = conv_geometry(args, w.codes, pads)
    if isinstance(geom, str):
        return geom
    stride, pads = geom
    sets, n, c, kh, kw = w.codes.shape
    if (c * kh * kw) % 16 or n % 16:
        return "conv K or N not a multiple of 16 (FP8 GEMM)"
    flat = w.codes.permute(0, 1, 3, 4, 2).reshape(sets, n, -1)  # K as (kh, kw, c): NHWC im2col order
    conv = {"kernel": (kh, kw), "stride": tuple(stride), "pads": tuple(pads)}
    a_s, a_z = float(act.scale), float(act.zero_point)
    mode = _layer_weights(weights, n, c * kh * kw)
    z_valid = 0.0 if act.folded else a_z
    if any(pads) and (z_valid != 0.0 or z_pad != 0.0):
        hw = _spatial(act.x)
        if hw is None:
            return "padded conv with a zero point needs the input's spatial size (node meta)"
        return FastGemm(flat, w.scale, w.fmt, a_s, a_z, act.fmt, bias, True, mode, conv, w.deq(),
                        (c, hw[0], hw[1], (kh, kw), tuple(stride), tuple(pads), z_valid, z_pad), dtype)
    if any(pads):  # zero point 0 everywhere: padding with grid 0 is exact
        return FastGemm(flat, w.scale, w.fmt, a_s, a_z, act.fmt, bias, True, mode, conv, dtype=dtype)
    return FastGemm(flat, w.scale, w.fmt, a_s, a_z, act.fmt, bias, act.folded, mode, conv, dtype=dtype)


def _rewrite(gm: fx.GraphModule, weights: str, report: FastReport, dtype: torch.dtype,
             attention: str = "bf16", group_norm: str = "auto", split_concat: bool = False) -> None:
    _fuse_gemms(gm, weights, report, dtype, split_concat)
    _lower_rest(gm, report, dtype, attention, group_norm)


def _split_concat_conv(gm: fx.GraphModule, node: fx.Node, weights: str,
                       dtype: torch.dtype) -> tuple[list[tuple[fx.Node, FastGemm]], Any] | None:
    """A 1x1 unpadded conv on a concatenation quantized per part (QuantConfig.split_concat; SD1.5's 12 up-block
    conv_shortcuts) as one FastGemm per part: the part's own activation scale, the weight's input channels of that
    part (a K range of a 1x1 conv), the bias on the first part. Returns [(part input, module)] and the weight's
    set selector (or None), or None where the pattern does not hold (the conv then stays as it was)."""
    from .runtime import _Weight, _input_pad, _match_act, _match_weight_bias

    padded = _input_pad(node)
    if isinstance(padded, str) or any(padded[1]):
        return None
    inp = padded[0]
    if not (isinstance(inp, fx.Node) and inp.meta.get("msfp_split_cat") and inp.target == aten.cat.default):
        return None
    dim = inp.args[1] if len(inp.args) > 1 else inp.kwargs.get("dim", 0)
    padding = list(node.args[4]) if len(node.args) > 4 else [0, 0]
    wb = _match_weight_bias(gm, node.args)
    if dim not in (1, -3) or any(padding) or isinstance(wb, str):
        return None
    w, bias = wb
    if w.codes.dim() != 5 or tuple(w.codes.shape[3:]) != (1, 1):
        return None
    out, c0 = [], 0
    for i, part in enumerate(inp.args[0]):
        act = _match_act(gm, part)
        if isinstance(act, str):
            return None
        val = part.meta.get("val")
        if val is None and isinstance(act.x, fx.Node):  # a quantizer a later pass replaced: its input's shape
            val = act.x.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            return None
        c = int(val.shape[1])
        w_i = _Weight(w.codes[:, :, c0:c0 + c].contiguous(), w.scale, w.fmt, w.select)
        mod = _fuse_conv(list(node.args), act, w_i, bias if i == 0 else None, (0, 0, 0, 0), 0.0, weights, dtype)
        if isinstance(mod, str):
            return None
        out.append((act.x, mod))
        c0 += c
    if c0 != w.codes.shape[2]:
        return None
    return out, w.select


def _fuse_gemms(gm: fx.GraphModule, weights: str, report: FastReport, dtype: torch.dtype,
                split_concat: bool = False) -> None:
    """Linears and convs reading a quantized input become FastGemm modules (``split_concat``: also 1x1 convs on a
    concatenation quantized per part, one FastGemm per part, summed); the others run in ``dtype``."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in (aten.linear.default, aten.conv2d.default):
            continue
        kind = "linear" if node.target == aten.linear.default else "conv2d"
        mod = _fuse_one(gm, node, kind, weights, dtype)
        split = _split_concat_conv(gm, node, weights, dtype) if isinstance(mod, str) and split_concat \
            and kind == "conv2d" else None
        if split is not None:
            parts, select = split
            outs = []
            with g.inserting_before(node):
                for i, (x, part_mod) in enumerate(parts):
                    name = f"msfp_fast_{node.name}_part{i}"
                    gm.add_submodule(name, part_mod)
                    kwargs = {}
                    if select is not None:  # the TALoRA set index, as for one GEMM
                        kwargs["set_index"] = g.call_function(chosen_set, tuple(select.args[:2]))
                    outs.append(g.call_module(name, (x,), kwargs))
                    outs[-1].meta = dict(node.meta)
                new = outs[0]
                for o in outs[1:]:  # each part's GEMM rounded to dtype, then summed in dtype
                    new = g.call_function(operator.add, (new, o))
                    new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            report.fused[kind] += 1
            report.split_concat += 1
            continue
        if isinstance(mod, str):
            report.skipped[node.name] = mod
            with g.inserting_before(node):
                new = g.call_function(_linear_as if kind == "linear" else _conv2d_as, (dtype, *node.args))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            continue
        from .runtime import _input_pad, _match_act, _match_weight

        x_node = _input_pad(node)[0] if kind == "conv2d" else node.args[0]
        act = _match_act(gm, x_node)
        w = _match_weight(gm, node.args[1])
        name = f"msfp_fast_{node.name}"
        gm.add_submodule(name, mod)
        with g.inserting_before(node):
            kwargs = {}
            if w.select is not None:  # type: ignore[union-attr]  # the set index, int64 [1]: table[timestep[0]]
                kwargs["set_index"] = g.call_function(chosen_set, tuple(w.select.args[:2]))  # type: ignore[union-attr]
            new = g.call_module(name, (act.x,), kwargs)  # type: ignore[union-attr]
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        report.fused[kind] += 1
    g.eliminate_dead_code()


def _fp8_attention_args(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """sdpa_fp8_fq's arguments for an SDPA node whose q, k, v are per-tensor 4-bit fake quantizers (Q without zero
    point), no mask, dropout or causality, at least ``FP8_ATTENTION_MIN_KV`` keys; None otherwise."""
    from .runtime import _const

    names = ("attn_mask", "dropout_p", "is_causal", "scale")
    opt = {**dict(zip(names, node.args[3:])), **node.kwargs}
    if opt.get("attn_mask") is not None or opt.get("dropout_p", 0.0) or opt.get("is_causal", False) \
            or set(opt) - set(names):
        return None
    parts = []
    for a in node.args[:3]:
        if not (isinstance(a, fx.Node) and a.target is fake_quant) or a.args[4]:  # folded: z is in a bias elsewhere
            return None
        x, s, z, fmt = a.args[:4]
        s, z = (_const(gm, v) if isinstance(v, fx.Node) else torch.tensor(v) for v in (s, z))
        if s is None or z is None or s.numel() != 1 or z.numel() != 1 or _spec(fmt).kind not in ("int", "fp") \
                or get_format(fmt).bits != 4:
            return None
        parts.append((x, (float(s), float(z), fmt)))
    kv = node.args[1].meta.get("val")
    if parts[0][1][1] != 0.0 or kv is None or not isinstance(kv.shape[-2], int) or kv.shape[-2] < FP8_ATTENTION_MIN_KV:
        return None
    (q, qp), (k, kp), (v, vp) = parts
    return (q, k, v, qp, kp, vp, opt.get("scale"))


def cat_nhwc(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 1)`` of [N, C_i, H, W] activations as the concatenation of their NHWC views along the
    channels: NHWC memory viewed as [N, C, H, W], the layout the GEMMs write and read. Inductor lays an
    ``aten.cat`` on dim 1 out in the output's logical (NCHW) order unless a part's layout is already fixed
    channels-last when it lowers the cat; then the parts' producers store into it transposed and its readers
    (GroupNorm, quantizers) read it transposed (docs/triton.md, session 15 CPU: layout copies; on SD1.5 the first
    concatenation of up blocks 1-3). The values are the cat's."""
    return torch.cat([p.permute(0, 2, 3, 1) for p in parts], dim=-1).permute(0, 3, 1, 2)


def _replace_calls(gm: fx.GraphModule, fn: Any, args_of: Any) -> int:
    """Replace every node for which ``args_of(node)`` gives arguments (None: keep the node) by ``fn(*arguments)``,
    keeping the node's meta; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        args = args_of(node) if node.op == "call_function" else None
        if args is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fn, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


def _cat_nhwc(gm: fx.GraphModule) -> int:
    """Replace every 4-d channel concatenation (``concat_parts``) by ``cat_nhwc``; returns how many."""
    def args_of(node: fx.Node) -> tuple | None:
        parts = concat_parts(node) if node.target == aten.cat.default else None
        return None if parts is None else (parts,)

    return _replace_calls(gm, cat_nhwc, args_of)


# GELU's tanh form as a sigmoid: (1 + tanh(u)) / 2 = sigmoid(2u)
_GELU_2U = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form, ``x * sigmoid(2u)`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)`` (= ``F.gelu(x,
    approximate="tanh")``), in float32, rounded once to x's dtype. Exact GELU's erf was the costliest math of the
    step's largest pointwise kernels (GEGLU + the next quantizer: sm_90 SASS 40 instructions per element for the
    GELU against 23 here); the forms differ by at most 4.7e-4 (at |x| ~ 2.7), and the next layer's 4-bit quantizer
    moves 2.4e-6 (64x64) to 7.5e-6 (32x32) of its codes (H200, SD1.5's GEGLU shapes at batch 8; docs/triton.md
    session 18)."""
    xf = x.float()
    return (xf * torch.sigmoid(_GELU_2U * (xf + 0.044715 * xf * xf * xf))).to(x.dtype)


def _gn_affine(gm: fx.GraphModule) -> int:
    """Set ``affine=True`` on every ``group_norm_triton`` / ``group_norm_auto`` node; returns how many."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (group_norm_triton, group_norm_auto)]
    for n in nodes:
        n.kwargs = {**n.kwargs, "affine": True}
    return len(nodes)


def silu_gn(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a Triton GroupNorm's output: ``x * sigmoid(x)`` in float32 (Triton's sigmoid: the hardware exp2 and
    reciprocal, where Inductor's ``aten.silu`` divides by 1 + libdevice's exp) from ``GN_TRITON_MIN_BATCH`` samples
    on, ``F.silu`` below (batch 1's aten GroupNorm kernels measured 0.08 ms slower with it; docs/triton.md session
    18). The same function; it rounds differently in the last float32 bits."""
    if x.shape[0] < GN_TRITON_MIN_BATCH:
        return F.silu(x)
    xf = x.float()
    return (xf * torch.sigmoid(xf)).to(x.dtype)


def _silu_after_gn(gm: fx.GraphModule) -> int:
    """Replace every ``aten.silu`` of a ``group_norm_triton`` / ``group_norm_auto`` output by ``silu_gn``; returns
    how many."""
    gn = (group_norm_triton, group_norm_auto)
    return _replace_calls(gm, silu_gn, lambda node: (node.args[0],) if node.target == aten.silu.default
                          and isinstance(node.args[0], fx.Node) and node.args[0].target in gn else None)


def _fast_quantizers(gm: fx.GraphModule) -> int:
    """Every FP8 GEMM's activation quantizer and every bf16 fake quantizer to ``grid_fast`` (``quant_math="fast"``):
    the multiplier ``quant_multiplier`` becomes a float32 buffer next to the scale; returns how many."""
    from .runtime import _const

    count = 0
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, FastGemm):
            mod.fast_quant = True
            count += 1
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fake_quant or "mult" in node.kwargs:
            continue
        s_n, fmt = node.args[1], node.args[3]
        s = _const(gm, s_n) if isinstance(s_n, fx.Node) else torch.tensor(float(s_n))
        if s is None:
            continue
        name = f"_qmult_{count}"
        gm.register_buffer(name, quant_multiplier(s, fmt))
        with gm.graph.inserting_before(node):
            mult = gm.graph.get_attr(name)
        node.kwargs = {**node.kwargs, "mult": mult}
        count += 1
    return count


def _gelu_tanh(gm: fx.GraphModule) -> int:
    """Replace every exact ``aten.gelu`` by ``gelu_fast``; returns how many."""
    return _replace_calls(gm, gelu_fast, lambda node: (node.args[0],) if node.target == aten.gelu.default
                          and node.kwargs.get("approximate", "none") == "none" else None)


def concat_parts(node: Any) -> list[fx.Node] | None:
    """The inputs of a 4-d channel concatenation (``aten.cat`` on dim 1 of two or more parts, or ``cat_nhwc``),
    else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is cat_nhwc:
        return list(node.args[0])
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.cat.default):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    parts = list(node.args[0])
    val = node.meta.get("val")
    if val is None or val.dim() != 4 or dim not in (1, -3) or len(parts) < 2:
        return None
    return parts


def _lower_rest(gm: fx.GraphModule, report: FastReport, dtype: torch.dtype, attention: str = "bf16",
                group_norm: str = "auto") -> None:
    """The remaining quantizers, packed weights and attention become ``dtype`` pointwise torch ops (``attention``
    "fp8" / "fp8-triton": attentions ``_fp8_attention_args`` accepts become ``sdpa_fp8_fq`` / ``flash_fp8_fq``;
    ``group_norm`` "channels" / "auto" /
    "triton": 4-d GroupNorms become ``group_norm_channels`` / ``group_norm_auto`` / ``group_norm_triton``)."""
    from .runtime import _const

    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target in (_Q, _QF):
            x, s, z, fmt = node.args
            _spec(fmt)
            with g.inserting_before(node):
                new = g.call_function(fake_quant, (x, s, z, fmt, node.target == _QF, dtype))
            report.fake_quant += 1
        elif node.target == _DQP:
            packed_n, scale_n, fmt, shape = node.args
            packed = _const(gm, packed_n)
            if packed is None:  # not a constant: the registered op decodes it
                continue
            halves = f"{packed_n.target.replace('.', '_')}_halves"
            setattr(gm, halves, halves_of_packed(packed, list(shape)))
            setattr(gm, f"{halves}_lut", e4m3_lut(fmt))
            with g.inserting_before(node):
                new = g.call_function(decode_packed, (g.get_attr(halves), g.get_attr(f"{halves}_lut"), scale_n,
                                                      list(shape), dtype))
        elif node.target == aten.scaled_dot_product_attention.default:
            fp8 = _fp8_attention_args(gm, node) if attention != "bf16" else None
            with g.inserting_before(node):
                if fp8 is not None:
                    fn = flash_fp8_fq if attention == "fp8-triton" else sdpa_fp8_fq
                    new = g.call_function(fn, fp8, {"dtype": dtype})
                    report.fp8_attention += 1
                    report.fake_quant -= 3  # q, k, v's: inside the FP8 attention now
                else:
                    new = g.call_function(_sdpa_as, (dtype, *node.args), dict(node.kwargs))
        elif node.target == aten.group_norm.default and group_norm != "aten" and _spatial(node) is not None:
            with g.inserting_before(node):
                if group_norm in ("triton", "auto"):
                    kw = dict(node.kwargs)
                    parts = concat_parts(node.args[0])
                    if parts is not None:
                        kw["parts"] = parts
                    fn = group_norm_triton if group_norm == "triton" else group_norm_auto
                    new = g.call_function(fn, tuple(node.args), kw)
                else:
                    new = g.call_function(group_norm_channels, tuple(node.args), dict(node.kwargs))
            report.group_norms += 1
        elif node.target == aten._assert_tensor_metadata.default:
            g.erase_node(node)  # dtype assertions of the float32 capture
            continue
        else:
            continue
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete tensors no node reads any more (the fused layers' original packed codes, scales, biases): they would
    otherwise be moved to the GPU and stay resident next to the FastGemm copies."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    prefixes = {".".join(t.split(".")[:i]) for t in used for i in range(1, t.count(".") + 2)}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or any(name.startswith(u + ".") for u in used):
            continue
        *path, leaf = name.split(".")
        delattr(gm.get_submodule(".".join(path)) if path else gm, leaf)
    for name in [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor) and k not in prefixes]:
        delattr(gm, name)
    gm.delete_all_unused_submodules()


def _cast_constants(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Float32 tensor attributes -> dtype, except what quantizers read (their math stays float32)."""
    keep: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (fake_quant, decode_packed):
            for a in (*node.args, *node.kwargs.values()):
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    keep.add(a.target)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in keep:
            continue
        *path, leaf = node.target.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        val = getattr(owner, leaf)
        if isinstance(val, torch.Tensor) and val.dtype == torch.float32:
            new = val.detach().to(dtype)
            if isinstance(val, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=False)
            setattr(owner, leaf, new)


def _to_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    gm = gm.to(device)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            *path, leaf = node.target.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            val = getattr(owner, leaf)
            if isinstance(val, torch.Tensor) and val.device != device:
                setattr(owner, leaf, val.to(device))
        if "device" in node.kwargs and isinstance(node.kwargs["device"], torch.device) \
                and node.kwargs["device"] != device:
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()
    return gm


class FastUNet(torch.nn.Module):
    """The rewritten graph: float inputs are cast to bf16, the output is returned as float32.

    ``compile(mode)`` wraps it in ``torch.compile`` (Inductor); mode "max-autotune" also captures CUDA graphs.
    """

    def __init__(self, gm: fx.GraphModule, report: FastReport, weights: str, dtype: torch.dtype = _BF16):
        super().__init__()
        self.gm, self.report, self.weights, self.dtype = gm, report, weights, dtype
        self._compiled: Any = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            # channels-last from the input on, as the FP8 GEMMs write: fewer transposed reads in Inductor's kernels
            args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return self.gm(*args).float()

    def compile_fast(self, mode: str | None = "max-autotune", **kwargs: Any) -> Any:
        self._compiled = torch.compile(self, mode=mode, **kwargs)
        return self._compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


# What build_fast's options default to on CUDA at bf16 (elsewhere: "exact" and False), each measured on SD1.5 on the
# H200 (docs/triton.md sessions 18-19); a CPU run passes them to reproduce the GPU build's numerics
CUDA_BF16_DEFAULTS: dict[str, Any] = {"gelu": "tanh", "quant_math": "fast", "silu": "sigmoid", "split_concat": True}
_OTHER_DEFAULTS: dict[str, Any] = {"gelu": "exact", "quant_math": "exact", "silu": "exact", "split_concat": False}


def build_fast(gm: fx.GraphModule, device: str | torch.device = "cuda", weights: str = "packed",
               inplace: bool = False, dtype: torch.dtype = _BF16,
               decode_group_bytes: int | None = None, merge: bool = True, quantize_parts: bool = False,
               implicit_conv: bool | None = None, attention: str = "bf16", group_norm: str = "auto",
               split_concat: bool | None = None, cat_nhwc: bool = True, gelu: str | None = None,
               gn_affine: bool | None = None, quant_math: str | None = None, silu: str | None = None) -> FastUNet:
    """Rewrite a quantized GraphModule (``CompiledModel.graph_module`` or a loaded .pt2's module) for Inductor.

    ``dtype``: of the activations between ops (bf16; float32 checks the rewrite against the reference graph with
    only the GEMM's accumulation order and FP8-exact operands differing; on CUDA run it under
    ``msfp_compiler.device.exact_fp32()``: the layers left in float32 are cuDNN convs, TF32 by default, whose 10-bit
    inputs flip 4-bit decisions downstream). ``decode_group_bytes``: decoded bytes per
    launch of the packed-weight decode (default ``DECODE_GROUP_BYTES``; 0: one launch per layer). ``merge``: one GEMM
    for the linears that share a quantized input (Q/K/V; the cross-attention K/V of every block). ``quantize_parts``:
    the fake quantizers of the merged GEMMs' parts (Q/K/V before attention) as one per-column epilogue of the GEMM
    (``PartQuant``; bit-exact; its speed on the GPU is not measured yet). ``implicit_conv``: the k x k stride-1
    convs by the implicit-GEMM FP8 kernel (``conv_fp8``, op ``msfp_fast::conv_e4m3``, tuned per shape against
    im2col + cuBLAS) instead of im2col + cuBLAS; the same sums, rounded once to bf16 (bit-exact where the float32
    sum is exact). Default (None): on for CUDA devices (SD1.5 at batch 8 on the H200: 16.98 ms per step against
    17.37-17.39 without, 1.13x against bf16 default-graph; docs/triton.md session 8), off elsewhere (on the CPU the
    op is im2col + GEMM anyway). ``attention``: "bf16" (PyTorch SDPA on the fake-quantized q, k, v) or "fp8"
    (``sdpa_fp8_fq``: cuDNN's FP8 attention on their grid values where ``_fp8_attention_args`` admits it: SD1.5's
    self-attention at 64x64 and 32x32; P and O rounded to E4M3 on top of the graph's own quantization) or
    "fp8-triton" (``flash_fp8_fq``: the same attentions on our Triton FP8 flash kernel, unpadded head dim, V^T from the
    quantizer, bf16 O; P rounded to E4M3).
    ``group_norm``: "channels" (``group_norm_channels``: per-channel statistics read in NHWC order, combined per group),
    "aten" (``aten.group_norm`` as captured, which Inductor reduces in NCHW order) or "triton"
    (``group_norm_triton``: the statistics from our Triton kernels in ``gn_stats``, concatenated inputs read part by
    part) or "auto" (the default, ``group_norm_auto``: triton from ``GN_TRITON_MIN_BATCH`` samples on, where it
    measured fastest on SD1.5 at batch 8, aten below, as session 13 measured batch 1). ``split_concat``: the 1x1
    convs on a concatenation quantized per part (SD1.5's 12 up-block conv_shortcuts, otherwise kept as bf16 fake
    quantization + conv) as one FP8 GEMM per part with its own activation scale, summed in ``dtype``. Default (None):
    on for CUDA at bf16 (SD1.5 at batch 8 on the H200: device time 14.294 against 14.370 ms per step; docs/triton.md
    session 19), off elsewhere. ``cat_nhwc`` (the default since session 16): the 4-d channel
    concatenations (SD1.5's 12 up-block skip connections, and the concatenations of their quantized parts) as
    ``cat_nhwc``, NHWC memory like every other activation, instead of the NCHW buffer Inductor gives an
    ``aten.cat`` none of whose parts it has fixed channels-last yet (3 of SD1.5's); the same values (a layout
    change only; compiled, Inductor's fusions change, and with them a few roundings). SD1.5 at batch 8 on the H200,
    same process: 15.60-15.68 ms per step against 15.73-15.86 with ``aten.cat`` (device time 15.21 vs 15.45 ms;
    docs/triton.md session 16); False gives that graph. ``gelu``: "tanh" (``gelu_fast``: GELU in its tanh form,
    as a sigmoid) or "exact" (the captured erf form). Default (None): tanh on CUDA at bf16 (SD1.5 at batch 8 on the
    H200: the GEGLU kernels 0.786 ms per step against 0.993, rel-RMSE against the float32 reference unchanged;
    docs/triton.md session 18), exact otherwise (the CPU and the float32 check compare with the reference graph).
    ``gn_affine``: the Triton GroupNorms (group_norm "triton", or "auto" from ``GN_TRITON_MIN_BATCH`` samples) take
    each (sample, channel)'s scale and shift from ``msfp_fast::gn_scale_shift`` instead of recomputing them per
    element in the apply kernel (SD1.5's GroupNorm + SiLU + quantizer kernel: 71 sm_90 SASS instructions per element
    down to 44). Default (None): on with group_norm "auto" / "triton"; True with another mode is a ValueError.
    ``quant_math``: "fast" (every FP8 GEMM's activation quantizer and every bf16 fake quantizer by ``grid_fast``:
    (x - z) times ``quant_multiplier`` instead of a division, and formats of 2 or 3 mantissa bits rounded by one FP8
    conversion; the rounding is ``grid_round``'s, the multiplication can move a code lying within ~an ulp of a
    boundary) or "exact" (``grid_round`` of (x - z) / s, as the reference). ``silu``: "sigmoid" (``silu_gn``: the
    SiLUs of the Triton GroupNorms as x * sigmoid(x), Triton's exp2 and reciprocal) or "exact". Defaults (None):
    ``CUDA_BF16_DEFAULTS`` on CUDA at bf16, "exact" elsewhere. Together with gn_affine they took the step's
    GroupNorm + SiLU + quantizer kernel from 71 to 30 instructions per element and SD1.5's batch-8 step on the H200
    from 15.129 to 14.505 ms of device time (docs/triton.md session 19)."""
    if quant_math not in (None, "exact", "fast"):
        raise ValueError(f"unknown quant_math {quant_math!r} (exact or fast)")
    if silu not in (None, "exact", "sigmoid"):
        raise ValueError(f"unknown silu mode {silu!r} (exact or sigmoid)")
    gpu_bf16 = torch.device(device).type == "cuda" and dtype == _BF16
    base = CUDA_BF16_DEFAULTS if gpu_bf16 else _OTHER_DEFAULTS
    quant_math, silu, gelu = quant_math or base["quant_math"], silu or base["silu"], gelu or base["gelu"]
    if gn_affine is None:
        gn_affine = group_norm in ("auto", "triton")
    if split_concat is None:
        split_concat = base["split_concat"]
    if gn_affine and group_norm not in ("auto", "triton"):
        raise ValueError(f"gn_affine=True needs group_norm 'auto' or 'triton' (the Triton statistics), "
                         f"not {group_norm!r}")
    if gelu not in (None, "tanh", "exact"):
        raise ValueError(f"unknown gelu mode {gelu!r} (tanh or exact)")
    if group_norm not in ("auto", "channels", "aten", "triton"):
        raise ValueError(f"unknown group_norm mode {group_norm!r} (auto, channels, aten or triton)")
    if attention not in ("bf16", "fp8", "fp8-triton"):
        raise ValueError(f"unknown attention mode {attention!r} (bf16, fp8 or fp8-triton)")
    if weights not in ("packed", "fp8", "mixed"):
        raise ValueError(f"unknown weights mode {weights!r} (packed, fp8 or mixed)")
    if not inplace:
        gm = copy.deepcopy(gm)
    report = FastReport()
    _rewrite(gm, weights, report, dtype, attention, group_norm, split_concat)
    if cat_nhwc:  # after the rewrite: the GroupNorms have taken their concatenations' parts
        report.cat_nhwc = _cat_nhwc(gm)
    if gelu == "tanh":
        report.gelu_tanh = _gelu_tanh(gm)
    if gn_affine:
        report.gn_affine = _gn_affine(gm)
    if silu == "sigmoid":
        report.silu_gn = _silu_after_gn(gm)
    if merge:
        report.merged_away = _merge_shared_inputs(gm)
        if quantize_parts:
            report.part_quant_moved = _quantize_parts_in_epilogue(gm)
    if quant_math == "fast":  # last: the passes above recognise fake_quant nodes by their arguments
        report.fast_quant = _fast_quantizers(gm)
    if implicit_conv or (implicit_conv is None and torch.device(device).type == "cuda"):
        report.implicit_convs = _route_implicit_convs(gm)
    group_bytes = DECODE_GROUP_BYTES if decode_group_bytes is None else decode_group_bytes
    groups = _group_decodes(gm, group_bytes) if group_bytes > 0 else 0
    _drop_unused_attributes(gm)
    report.decode_groups = groups + sum(len(m.lut_rows) if m.lut.dim() == 2 else 1 for m in gm.modules()
                                        if isinstance(m, FastGemm) and getattr(m, "packed", None) is not None)
    _cast_constants(gm, dtype)
    gm.recompile()
    fast = FastUNet(_to_device(gm, torch.device(device)), report, weights, dtype)
    for m in fast.modules():  # not .eval(): a loaded .pt2's module raises in train() (torch 2.11)
        m.training = False
    return fast


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer resident in the module (what stays on the GPU between steps)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for node in getattr(module, "gm", module).graph.nodes if hasattr(getattr(module, "gm", module), "graph") else []:
        if node.op == "get_attr":  # plain tensor attributes (lifted constants) are neither params nor buffers
            gm = getattr(module, "gm", module)
            *path, leaf = node.target.split(".")
            val = getattr(gm.get_submodule(".".join(path)) if path else gm, leaf)
            if isinstance(val, torch.Tensor) and id(val) not in seen:
                seen.add(id(val))
                total += val.numel() * val.element_size()
    return total
