"""Implicit-GEMM FP8 conv: a k x k conv of NHWC E4M3 activations as one Triton kernel, no im2col buffer.

The fast path's k x k convs were an im2col (``im2col.py``: each 3x3 conv writes 9x its input, 2.7 GB per SD1.5 step
at batch 8, 1.1 ms) followed by cuBLAS's FP8 GEMM. Here the GEMM's A tile is read straight from the activation, one
(kh, kw) tap and BK channels per K step, K ordered (kh, kw, c) as the weights are:

* ``TMA_A`` (stride-1 convs whose output width is a power of two that tiles BM): a row tile of BM output pixels is
  NB whole images or NH whole output rows, so for tap (i, j) its inputs are one 4-D box [NB, NH, Wo, BK] of the
  [B, H, W, C] tensor at (b0, oh0 + i - top, j - left, c0), read by the bulk tensor copy engine (TMA). TMA fills
  what lies outside the tensor with zeros, which is the padding (E4M3 +0.0 is grid 0), and channels past C.
* otherwise a pointer gather of the same rows with the padding masked (any stride, any width).

The weights ([N, K] E4M3, the decoded slice the GEMM read before) come through TMA; K steps past a tap's C channels
multiply zeros. The result is the raw fp32 accumulator rounded once to bf16, what ``torch._scaled_mm`` with unit
scales returns, so the fast path's epilogue (column scale, bias, zero-point map) stays where Inductor fuses it.
``fast_ops`` registers ``conv_e4m3_triton`` as ``msfp_fast::conv_e4m3``. Per conv shape the first call times a few
tiles (``CONFIGS``) against im2col + cuBLAS (``IM2COL``) and keeps the fastest, so shapes where cuBLAS wins (small
M: it splits K, these tiles do not) keep it; the interpreter (CPU tests) uses one small tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fast_ops import conv_out_size
from .kernels import INTERPRET, _grouped_tile, _store
from .timing import graphed_ms

__all__ = ["ConvConfig", "CONFIGS", "NEW_CONFIGS", "TIME_ALSO", "IM2COL", "ADMIT_ERR", "SPLIT_ADMIT_ERR", "TUNE_TIMES",
           "TUNE_ERRS", "conv_e4m3_triton", "tma_box", "pick_conv_config"]


@triton.jit
def _conv_kernel(x_desc, x_ptr, w_desc, out_ptr, M, N, H, W, C, HO, WO, PT, PL, SH, SW, CB, TAPS,
                 KW: tl.constexpr, TMA_A: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, SPLIT: tl.constexpr):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    m0 = pid_m * BM
    n0 = pid_n * BN
    rows = m0 + tl.arange(0, BM)
    rmask = rows < M
    L = HO * WO
    b0 = m0 // L  # TMA_A: the tile's first image and output row
    oh0 = (m0 % L) // WO
    b = rows // L  # pointer gather: every row's input window
    ih0 = ((rows % L) // WO) * SH - PT
    iw0 = (rows % WO) * SW - PL
    kk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    steps = TAPS * CB
    k_lo = 0
    k_hi = steps
    if SPLIT > 1:  # split-K: program (tile, s) sums K steps [s * per, (s + 1) * per) into its own fp32 partial
        per = tl.cdiv(steps, SPLIT)
        k_lo = tl.program_id(1) * per
        k_hi = tl.minimum(k_lo + per, steps)
        out_ptr += tl.program_id(1).to(tl.int64) * M * N
    for kt in range(k_lo, k_hi):
        tap = kt // CB
        c0 = (kt - tap * CB) * BK
        di = tap // KW
        dj = tap - di * KW
        if TMA_A:
            a = x_desc.load([b0, oh0 + di - PT, dj - PL, c0]).reshape(BM, BK)
        else:
            ih = ih0 + di
            iw = iw0 + dj
            ok = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            src = ((b * H + ih) * W + iw).to(tl.int64) * C + c0
            a = tl.load(x_ptr + src[:, None] + kk[None, :], mask=ok[:, None] & (c0 + kk < C)[None, :], other=0.0)
        w = w_desc.load([n0, tap * C + c0])
        acc = tl.dot(a, w.T, acc)
    cols = n0 + tl.arange(0, BN)
    _store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc, rmask[:, None] & (cols < N)[None, :])


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """out = the SPLIT fp32 partials [SPLIT, M*N] summed in order, rounded once to out's type."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.load(part_ptr + i, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
    _store(out_ptr + i, acc, mask)


@dataclass(frozen=True)
class ConvConfig:
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    tma_a: bool = True  # A through a 4-D TMA box where the shape allows it (tma_box), else the pointer gather
    group_m: int = 8
    split_k: int = 1  # > 1: the K steps split over this many programs per tile, fp32 partials summed by a second kernel

    @property
    def name(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk}w{self.num_warps}s{self.num_stages}{'' if self.tma_a else 'p'}"
                + (f"k{self.split_k}" if self.split_k > 1 else ""))


# Candidates timed on the first call of each conv shape (Hopper FP8 wgmma: BK >= 32; 128-byte K rows for TMA's
# widest swizzle): tiles that won shapes in session 8's batch-1 sweep of seven (tools/bench_gpu_kernels.py
# --sections conv, results/gpu_sd15_conv_b1.json); at batch 8 only 256x128 won, on the 64x64 level (coordinator call
# m4). Left out: 128x128x128 with the TMA box, 8 warps, 4 stages -- it won 8 batch-1 shapes bit-exactly, but on the
# SD1.5 step's own batch-8 operands the tuner measured it 3-9% of the largest output off cuBLAS on 11 of 16 shapes
# (coordinator call m4, results/gpu_sd15.json); the same box with BM 256 (3 stages) or BN 64 (4 warps), and the same
# tile with the pointer gather, agree. Session 9 reproduced it on 4-bit grid operands (exact sums) at SD1.5 batch-8
# shapes (tests/export/test_fast_kernels.py::test_conv_configs_sd15_shapes_gpu, xfail): a miscompiled tile, not an
# accumulation-order effect. Cause not found; the tuner's output check is what caught it.
CONFIGS: tuple["ConvConfig", ...] = (ConvConfig(128, 128, 128, 8, 4, False), ConvConfig(256, 128, 128, 8, 3),
                                     ConvConfig(128, 64, 128, 4, 4))
# Session 9's candidates for the smaller levels, where cuBLAS still won at batch 8: a one-warpgroup 128x128 tile, a
# 64-row tile, and split-K (only timed where the unsplit tiles fill under SPLIT_MAX_WAVES waves of the SMs). Timed on
# every SD1.5 conv shape on the H200 (session 9): none beat im2col + cuBLAS on a shape where the three CONFIGS tiles
# did not already win, at batch 8 or 1 (e.g. 8x8 level, batch 8: split-K 0.036 ms vs im2col + cuBLAS 0.020), so
# they stay out of CONFIGS; kept for other models and GPUs (bench --conv-sets new times them without a recompile).
NEW_CONFIGS = (ConvConfig(128, 128, 128, 4, 4), ConvConfig(64, 128, 128, 4, 4),
               *(ConvConfig(128, 128, 128, 8, 4, False, split_k=k) for k in (2, 4, 8)))
# Also timed and recorded (TUNE_TIMES / TUNE_ERRS), never chosen: a benchmark sets this to NEW_CONFIGS to learn what
# they would give without a second tuning pass (tools/bench_gpu_sd15.py --conv-sets builds the choice from the record)
TIME_ALSO: tuple = ()
SPLIT_MAX_WAVES = 1.5  # split-K candidates only for shapes whose unsplit tiles fill fewer waves than this
_INTERP_CONFIG = ConvConfig(16, 16, 32, 1, 1)
_BEST: dict[tuple, ConvConfig | str] = {}
TUNE_TIMES: dict[tuple, dict[str, float | str]] = {}  # what the tuner measured per conv shape (ms), for the benches
# per conv shape and candidate: max |tile - cuBLAS| / max |cuBLAS| on the call's own operands (the admission check)
TUNE_ERRS: dict[tuple, dict[str, float]] = {}


def tma_box(b: int, ho: int, wo: int, bm: int) -> tuple[int, int] | None:
    """(images, output rows) of one BM-row tile as a TMA box [NB, NH, Wo, BK], or None where tiles would not be
    whole rows of one image or whole images (Wo not a power of two, or above TMA's 256 box limit)."""
    if wo > 256 or wo & (wo - 1) or bm % wo:
        return None
    rows = bm // wo
    if rows <= ho:
        return (1, rows) if ho % rows == 0 else None
    return (rows // ho, ho) if rows % ho == 0 else None


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, kernel: list[int], stride: list[int],
            pads: list[int], cfg: ConvConfig) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, wd, c = x.shape
    n, k = w.shape
    ho, wo = conv_out_size(h, wd, kernel, stride, pads)
    m = b * ho * wo
    box = tma_box(b, ho, wo, cfg.bm) if cfg.tma_a and stride == [1, 1] else None
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [*box, wo, cfg.bk]) if box else None
    w_desc = TensorDescriptor(w, [n, k], [k, 1], [cfg.bn, cfg.bk])
    split = cfg.split_k
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split)
    _conv_kernel[grid](x_desc, x, w_desc, part, m, n, h, wd, c, ho, wo, pads[2], pads[0], stride[0], stride[1],
                       triton.cdiv(c, cfg.bk), kernel[0] * kernel[1], KW=kernel[1], TMA_A=box is not None,
                       BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, SPLIT=split, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
    if split > 1:
        block = 1024 if not INTERPRET else 64
        _split_sum_kernel[(triton.cdiv(m * n, block),)](part, out, m * n, SPLIT=split, BLOCK=block)


def _useful(cfg: ConvConfig, m: int, n: int, taps: int, c: int, sms: int) -> bool:
    """Whether a candidate is worth timing for this shape: split-K only where the unsplit tiles fill under
    ``SPLIT_MAX_WAVES`` waves and every split keeps at least 8 K steps."""
    if cfg.split_k == 1:
        return True
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    return tiles < SPLIT_MAX_WAVES * sms and taps * triton.cdiv(c, cfg.bk) // cfg.split_k >= 8


# Admission bounds of the tuner's output check (max |tile - cuBLAS| / max |cuBLAS| on the call's own operands).
# Unsplit tiles must give cuBLAS's bits: the same E4M3 products, accumulated over K in the same order by the same
# FP8 tensor-core instructions, rounded once to bf16. Measured on the H200 (session 9, results/gpu_sd15.json
# conv_tuning): every unsplit candidate on every SD1.5 conv shape at batches 8 and 1 had err exactly 0.0 (160
# checks), the wrong tile of call m4 3e-2 to 9e-2. Split-K sums its partial accumulators in float32, which the FP8
# tensor cores' own accumulation (not a full float32 sum) does not: 0.0 on 21 of 22 shapes, 6.5e-3 on one.
ADMIT_ERR = 0.0
SPLIT_ADMIT_ERR = 1e-2
IM2COL = "im2col"  # the other candidate: im2col.py's rows and cuBLAS's FP8 GEMM (what the fast path did before)
_ONES: dict[torch.device, torch.Tensor] = {}


def _im2col_cublas(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int],
                   pads: list[int]) -> torch.Tensor:
    from .im2col import im2col_triton

    one = _ONES.get(x.device)
    if one is None:
        one = _ONES[x.device] = torch.ones((), dtype=torch.float32, device=x.device)
    cols = im2col_triton(x, kernel, stride, pads)
    return torch._scaled_mm(cols, w.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)


def pick_conv_config(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int],
                     pads: list[int]) -> ConvConfig | str:
    """The fastest of ``CONFIGS`` and ``IM2COL`` (im2col + cuBLAS) for this conv shape, timed once per shape on the
    call's own operands (device time of CUDA-graph replays, ``timing.graphed_ms``: what the conv costs inside the
    captured step, without the host's launch cost that ``do_bench`` would count at small M): where no tile beats
    cuBLAS, the conv stays im2col + cuBLAS. A tile whose output differs from cuBLAS's by more than ``ADMIT_ERR`` of
    its largest magnitude (``SPLIT_ADMIT_ERR`` for split-K) is not a candidate (see ``CONFIGS``: one tile was caught
    that way); every candidate's difference is kept in ``TUNE_ERRS``, its time (or why it was rejected) in
    ``TUNE_TIMES``. ``TIME_ALSO`` candidates are timed and recorded, not chosen. During a CUDA graph capture, when
    nothing can be timed, IM2COL."""
    if INTERPRET or x.device.type != "cuda":
        return _INTERP_CONFIG
    key = (tuple(x.shape), tuple(w.shape), tuple(kernel), tuple(stride), tuple(pads))
    if key in _BEST:
        return _BEST[key]
    if torch.cuda.is_current_stream_capturing():
        return IM2COL
    ho, wo = conv_out_size(x.shape[1], x.shape[2], kernel, stride, pads)
    out = torch.empty(x.shape[0] * ho * wo, w.shape[0], dtype=torch.bfloat16, device=x.device)
    times: dict[str, float | str] = {}
    errs: dict[str, float] = {}
    best: ConvConfig | str = IM2COL
    ref = _im2col_cublas(x, w, kernel, stride, pads).float()
    scale = ref.abs().max().clamp_min(1e-30)
    # rep: milliseconds of replays per timing (10 timings, median): >= 5 ms covers 16+ calls of the largest SD1.5
    # conv; the session-8 tuner's 20 ms made the first step of a batch-8 compile ~30 s longer
    best_ms = times[IM2COL] = round(graphed_ms(lambda: _im2col_cublas(x, w, kernel, stride, pads), rep=5), 5)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    for cfg in (c for c in CONFIGS + TIME_ALSO
                if _useful(c, out.shape[0], w.shape[0], kernel[0] * kernel[1], x.shape[3], sms)):
        try:
            out.zero_()  # a tile that skips part of the output must not pass on the previous candidate's values
            _launch(x, w, out, kernel, stride, pads, cfg)
            # a tile must compute the same conv (up to the order of FP8 accumulation) before its speed counts
            err = errs[cfg.name] = float(((out.float() - ref).abs().max() / scale).item())
            if not err <= (ADMIT_ERR if cfg.split_k == 1 else SPLIT_ADMIT_ERR):
                times[cfg.name] = f"mismatch: max diff {err:.3g} of max |y|"
                continue
            ms = graphed_ms(lambda: _launch(x, w, out, kernel, stride, pads, cfg), rep=5)
        except Exception as e:  # noqa: BLE001  (a tile this shape or this Triton cannot compile: not a candidate)
            times[cfg.name] = repr(e)[:200]
            continue
        times[cfg.name] = round(ms, 5)
        if ms < best_ms and cfg in CONFIGS:
            best, best_ms = cfg, ms
    _BEST[key], TUNE_TIMES[key], TUNE_ERRS[key] = best, times, errs
    return best


def conv_e4m3_triton(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int],
                     config: ConvConfig | str | None = None) -> torch.Tensor:
    """x E4M3 [B, H, W, C] contiguous (C % 16 == 0), w E4M3 [N, K] (K = kh*kw*C ordered kh, kw, c; row-major,
    16-byte aligned rows); pads (left, right, top, bottom) -> bf16 [B*Ho*Wo, N], the fp32 sum rounded once.
    ``config``: a tile, ``IM2COL``, or None (the fastest for the shape, ``pick_conv_config``)."""
    x = x.contiguous()
    b, h, wd, c = x.shape
    ho, wo = conv_out_size(h, wd, kernel, stride, pads)
    n, k = w.shape
    if k != kernel[0] * kernel[1] * c or c % 16 or k % 16 or not w.is_contiguous():
        raise ValueError(f"conv_e4m3: weights {tuple(w.shape)} for C={c}, kernel {kernel} (C, K multiples of 16)")
    aligned = x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0  # TMA's global addresses
    cfg = (config or pick_conv_config(x, w, kernel, stride, pads)) if aligned else IM2COL
    if cfg == IM2COL:
        return _im2col_cublas(x, w, kernel, stride, pads)
    out = torch.empty(b * ho * wo, n, dtype=torch.bfloat16, device=x.device)
    if out.numel():
        _launch(x, w, out, kernel, stride, pads, cfg)
    return out
