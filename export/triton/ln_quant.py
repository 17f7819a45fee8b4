"""A transformer block's LayerNorm with its neighbours, fused by hand: GEMM epilogue, residual add, LayerNorm, E4M3
quantizer in one Triton kernel: op ``msfp_fast::ln_quant`` (fast_ops), wired by ``build_fast(ln_quant=True)``
(opt-in, ``fast._fuse_ln_quant``: the producer FastGemm hands its raw GEMM output over, the consumer FastGemm reads
the codes; bench variant ``lnquant``), not by default until ``tools/bench_gpu_kernels.py --sections lnquant`` and
the SD1.5 A/B show it beating what Inductor generates.

The chain, as ``fast.build_fast`` emits it for SD1.5 (one ``BasicTransformerBlock`` per ``Transformer2DModel``, 16
blocks, three LayerNorms each; C = 320 / 640 / 1280, M = batch x 4096 / 1024 / 256 / 64 tokens):

* ``y``: the raw output of the preceding ``FastGemm``'s ``torch._scaled_mm`` ([M, C] bf16, unit scales), and its
  epilogue from ``FastGemm.forward``: ``(y.float() * scale_b[0] + beta[0]).to(bf16)`` (the column scale
  ``s_a * s_w[n]`` and beta are float32 buffers; ``_pick`` selects set 0, the ``select`` of Inductor's kernel name);
  norm1 reads ``proj_in`` (a 1x1 unpadded conv: no zero-point map, its NHWC output viewed as [B, HW, C] rows),
  norm2 / norm3 read ``attn1.to_out[0]`` / ``attn2.to_out[0]``;
* norm2 / norm3 only: ``h = epilogue + residual`` (bf16 + bf16; between the epilogue and the add the graph has
  dropout's ``clone`` and the division by the attention's ``rescale_output_factor`` 1.0, both exact); norm1:
  ``h = epilogue`` (no add). ``h`` is the block's residual stream, read again by the next add, so it is an output
  (bf16). The residual of norm2 is proj_in's output (norm1's input), that of norm3 norm2's ``h``;
* ``aten.layer_norm(h, [C], w, b, 1e-5)`` in bf16 (``_cast_constants`` made w, b bf16);
* the next ``FastGemm``'s activation quantizer: ``grid_round((ln.float() - a_z) / a_s, afmt).to(e4m3)``
  (``_scaled``, ``grid_round``, ``_bit_rne``): the E4M3 grid values, the FP8 GEMM's A operand. The only reader of
  the LayerNorm output is that quantizer: norm1 feeds Q/K/V, one merged ``FastGemm`` (``_merge_shared_inputs``:
  one quantizer), norm2 feeds ``attn2.to_q`` (K / V read the text states), norm3 feeds the GEGLU ``ff.net[0].proj``.
  The LayerNorm output is therefore not written (``ln_out=True`` writes it, for tests). Checked on the rewritten
  tiny conditional UNet of the tests (tests/conftest.py ``make_unet_cond``, ``FAST_CONFIG``): each of its 12
  ``aten.layer_norm`` nodes has one user, a FastGemm (norm1: a merged Q/K/V one), and reads either
  view(permute(proj_in FastGemm)) or add(div(clone(to_out FastGemm)), residual).

Formats: ``grid_round``'s "int" (round half to even of |v| or max(v, 0)) and "fp" (integer RNE of the float32
bits in the normal range, ``round(a * 2^(M - emin)) * 2^(emin - M)`` below it) kinds, signed or unsigned,
saturating at the format's max; the copysign is done on the bits, so -0.0 stays byte 0x80 as torch's copysign
gives it. The threshold-table kind (M = 0, even bias) is not handled (none of SD1.5's 4-bit choices needs it).

Numerics, two modes (``round_bf16``):

* True (default): eager PyTorch's roundings, those of ``ln_quant_reference``: the epilogue, the add and the
  LayerNorm output each rounded to bf16, statistics in float32; compiled without FMA contraction
  (``enable_fp_fusion=False``), as eager runs ``y * scale`` and ``+ beta`` as two kernels, and with IEEE divisions
  (``tl.div_rn``) in the statistics and the quantizer's ``(x - z) / s``.
* False: what Inductor generates for the fused chain (``emulate_precision_casts`` off): it elides bf16
  downcast/upcast pairs inside a kernel, so the add reads the float32 epilogue, the LayerNorm reads the float32
  sum (only the stored residual is rounded) and the quantizer reads the float32 LayerNorm output; Triton's
  default FMA contraction and its ``/`` (``div.full.f32`` on NVIDIA: approximate, within 2 ulp), as Inductor's
  kernels have them (its ``eager_numerics.division_rounding`` is off by default, so the fast path's compiled
  quantizers divide approximately too, unlike eager ``grid_round``). The bench compares the kernel in this mode with
  ``torch.compile(ln_quant_reference)``.

Bit-exactness: the residual and the quantizer are pointwise and bit-exact; the LayerNorm statistics are float32
sums whose order differs from torch's (tree sums here, torch's CPU / CUDA kernels and Inductor's Welford each their
own), so mean and 1/std differ in the last float32 bits and a small fraction of LayerNorm outputs land one bf16
step apart (tests: under 1%, never more than one step), the E4M3 codes of those one grid step apart at most.

Kernel: one program normalizes BLOCK_M rows of BLOCK_C = next_power_of_2(C) lanes (C is at most 1280 on SD1.5, so a
whole row sits in registers: one read of each input, one write of each output, the minimum bytes: 2 + 2 + 2 + 1
per element with the residual, 2 + 2 + 1 without).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fast import grid_e4m3, grid_round
from .kernels import _round_bf16, _round_to_grid, quant_spec

__all__ = ["ln_quant_reference", "ln_quant_triton", "format_constants"]

_BF16 = torch.bfloat16
_FP8 = torch.float8_e4m3fn


def ln_quant_reference(y: torch.Tensor, col_scale: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None,
                       weight: torch.Tensor, bias: torch.Tensor, eps: float, a_scale: torch.Tensor | float,
                       a_zero: torch.Tensor | float, fmt: str,
                       round_bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chain as build_fast's graph computes it (module docstring): y [M, C] bf16 GEMM output, col_scale / beta [C]
    float32, residual [M, C] bf16 or None (norm1), weight / bias [C] bf16. Returns (h bf16, E4M3 grid values, the
    LayerNorm output: bf16 with ``round_bf16``, else float32). ``round_bf16=False``: Inductor's elided roundings
    written out in float32 (what torch.compile of the default form computes, up to reduction order)."""
    e = y.float() * col_scale + beta
    c = y.shape[-1]
    if round_bf16:
        h = e.to(_BF16)
        if residual is not None:
            h = h + residual
        ln = F.layer_norm(h, (c,), weight, bias, eps)
        return h, grid_e4m3(ln, a_scale, a_zero, fmt), ln
    h32 = e if residual is None else e + residual.float()
    var, mean = torch.var_mean(h32, -1, correction=0, keepdim=True)
    ln = (h32 - mean) * torch.rsqrt(var + eps) * weight.float() + bias.float()
    g = grid_round((ln - a_zero) / a_scale, fmt).to(_FP8)
    return h32.to(_BF16), g, ln


def format_constants(fmt: str) -> dict:
    """The kernel's constexpr description of an int- or fp-kind format (``kernels.quant_spec``'s arithmetic form,
    the one ``kernels._round_to_grid`` rounds by)."""
    spec = quant_spec(fmt)
    if not spec.arith:
        raise ValueError(f"format {fmt}: threshold-table kind, not handled by ln_quant")
    return {"SIGNED": spec.signed, "MAXV": spec.max, "SUB_LIMIT": spec.sub_limit, "MAGIC": spec.magic,
            "SHIFT": spec.shift}


@triton.jit
def _div(x, y, RN: tl.constexpr):
    """x / y: IEEE round to nearest (eager's division) with RN, else Triton's ``/`` (div.full.f32, within 2 ulp on
    NVIDIA GPUs: what Inductor emits unless TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1)."""
    if RN:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _ln_quant_kernel(y_ptr, cs_ptr, beta_ptr, res_ptr, w_ptr, b_ptr, h_ptr, g_ptr, ln_ptr, M, C, eps, a_s, a_z,
                     HAS_RES: tl.constexpr, STORE_LN: tl.constexpr, ROUND: tl.constexpr,
                     SIGNED: tl.constexpr, MAXV: tl.constexpr, SUB_LIMIT: tl.constexpr, MAGIC: tl.constexpr,
                     SHIFT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BC)
    cm = cols < C
    mask = (rows < M)[:, None] & cm[None, :]
    off = rows.to(tl.int64)[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    cs = tl.load(cs_ptr + cols, mask=cm, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cm, other=0.0)
    h = y * cs[None, :] + beta[None, :]
    if ROUND:
        h = _round_bf16(h)
    if HAS_RES:
        h = h + tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    hb = _round_bf16(h)
    tl.store(h_ptr + off, hb.to(tl.bfloat16), mask=mask)
    if ROUND:
        h = hb
    h = tl.where(mask, h, 0.0)
    mean = _div(tl.sum(h, axis=1), C.to(tl.float32), ROUND)
    d = tl.where(mask, h - mean[:, None], 0.0)
    var = _div(tl.sum(d * d, axis=1), C.to(tl.float32), ROUND)
    rstd = tl.rsqrt(var + eps)  # as Inductor (libdevice.rsqrt); torch.rsqrt in eager
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    ln = d * rstd[:, None] * w[None, :] + b[None, :]
    if ROUND:
        ln = _round_bf16(ln)
    if STORE_LN:
        tl.store(ln_ptr + off, ln.to(ln_ptr.dtype.element_ty), mask=mask)
    v = _div(ln - a_z, a_s, ROUND)
    # the arithmetic form only (ARITH, no threshold table: its pointers are never read)
    g = _round_to_grid(v, v, g_ptr, g_ptr, SIGNED, True, MAXV, SUB_LIMIT, MAGIC, SHIFT, 0)
    tl.store(g_ptr + off, g.to(tl.float8e4nv), mask=mask)


def ln_quant_triton(y: torch.Tensor, col_scale: torch.Tensor, beta: torch.Tensor, residual: torch.Tensor | None,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float, a_scale: float, a_zero: float, fmt: str,
                    round_bf16: bool = True, ln_out: bool = False, block_m: int = 1,
                    num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``ln_quant_reference``'s outputs from one kernel: (h bf16, E4M3 grid values, the LayerNorm output or None).
    y, residual: [M, C] bf16 rows (contiguous); col_scale, beta [C] float32; weight, bias [C]; ``block_m`` rows per
    program (a power of two); ``ln_out``: also write the LayerNorm output (bf16 with ``round_bf16``, else float32)."""
    c = y.shape[-1]
    y2 = y.reshape(-1, c).contiguous()
    m = y2.shape[0]
    res = residual.reshape(-1, c).contiguous() if residual is not None else y2
    h = torch.empty_like(y2, dtype=_BF16)
    g = torch.empty(y2.shape, dtype=_FP8, device=y.device)
    ln = torch.empty(y2.shape, dtype=_BF16 if round_bf16 else torch.float32, device=y.device) if ln_out else h
    if m:
        grid = (triton.cdiv(m, block_m),)
        _ln_quant_kernel[grid](y2, col_scale.float().contiguous(), beta.float().contiguous(), res,
                               weight.contiguous(), bias.contiguous(), h, g, ln, m, c, float(eps), float(a_scale),
                               float(a_zero), HAS_RES=residual is not None, STORE_LN=ln_out, ROUND=round_bf16,
                               BM=block_m, BC=triton.next_power_of_2(c), num_warps=num_warps,
                               enable_fp_fusion=not round_bf16, **format_constants(fmt))
    shape = y.shape
    return h.view(shape), g.view(shape), ln.view(shape) if ln_out else None
