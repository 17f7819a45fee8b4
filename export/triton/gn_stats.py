"""GroupNorm statistics of NHWC activations as two Triton kernels (``msfp_fast::gn_stats``'s CUDA implementation).

Inductor's reductions for SD1.5's GroupNorms ran at 38-100 us each at batch 8 where ~15 us reads the activation at
copy bandwidth (docs/triton.md session 13): the per-group reduction reads 20 bytes of each 640-byte NHWC row, the
per-channel one (``fast.group_norm_channels``) has too few outputs at small batches, and chunked forms became
persistent kernels reading a few channels per row. Here the reduction order is ours:

``_gn_partial_kernel``: one program per (sample, ITERS x BLOCK_P positions, BLOCK_C channels) tile, read as ITERS
chunks of BLOCK_P rows of BLOCK_C contiguous channels (128 bytes per row in bf16 at 64), each chunk's per-channel
sum and squared deviations from its mean combined into the tile's exactly (Chan et al.); it writes the tile's
per-channel sum and sum of squared deviations from the tile mean (float32) to partials [N, PB, C]. The tile
(``GnConfig``) is chosen per input shape on the GPU by timing ``CONFIGS`` (``pick_gn_config``), as the implicit
conv's tiles are: session 14 measured the first kernel's fixed 64 x 64 tile at ~26% of the copy bandwidth. A
concatenated input (the up blocks' skip connections) is read part by part, each part's launch writing its channel
range, so the concatenation is not materialized for the statistics.
``_gn_combine_kernel``: one program per (sample, group) combines the PB x C/G partials exactly (Chan et al.: the
group mean from the sums, the group M2 as the sum of the tile M2s plus each tile's count times its squared mean
offset) into the group's mean and 1 / sqrt(var + eps).

Agrees with ``aten.group_norm``'s statistics within float32 summation order (the shifted sums avoid the
cancellation of sum-of-squares forms). Kernels are defined on import: import after choosing TRITON_INTERPRET.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kernels import INTERPRET
from .timing import graphed_ms

__all__ = ["gn_stats_triton", "GnConfig", "CONFIGS", "DEFAULT", "pick_gn_config", "TUNE_TIMES"]


@dataclass(frozen=True)
class GnConfig:
    """One program's tile: ``iters`` chunks of ``block_p`` positions x ``block_c`` channels, ``warps`` warps."""

    block_p: int
    iters: int
    block_c: int
    warps: int

    @property
    def name(self) -> str:
        return f"p{self.block_p}x{self.iters}_c{self.block_c}_w{self.warps}"


# DEFAULT: the first kernel's tile (8 KB per program; session 14 call 1: SD1.5 batch 8, 0.654 ms for 73 launches);
# the others read 16-64 KB per program (fewer, longer programs; fewer partials for the combine)
DEFAULT = GnConfig(64, 1, 64, 4)
CONFIGS = (DEFAULT, GnConfig(64, 4, 64, 4), GnConfig(64, 8, 64, 8), GnConfig(32, 4, 128, 4), GnConfig(64, 4, 128, 8))
TUNE = True  # False: DEFAULT everywhere (bench_gpu_sd15 --no-gn-tune)
_BEST: dict[tuple, GnConfig] = {}
TUNE_TIMES: dict[tuple, dict[str, float | str]] = {}  # per input shape: each candidate's ms (or why not), for benches


# sizes not specialized (each SD1.5 shape would compile its own kernel for every candidate tile at the first step,
# on the device's clock); the strides are (the channels' stride 1 and the rows' alignment make the loads vectors)
@triton.jit(do_not_specialize=["P", "C", "C_TOTAL", "c_off", "PB"])
def _gn_partial_kernel(x_ptr, sum_ptr, m2_ptr, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB,
                       BLOCK_P: tl.constexpr, ITERS: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    base = x_ptr + n.to(tl.int64) * sxn
    coff = (c * sxc).to(tl.int64)[None, :]
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    cnt = 0.0
    for i in tl.static_range(ITERS):
        p0 = (pb * ITERS + i) * BLOCK_P
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        h = p // W
        w = p - h * W
        mask = pm[:, None] & cm[None, :]
        x = tl.load(base + (h * sxh + w * sxw).to(tl.int64)[:, None] + coff, mask=mask, other=0.0).to(tl.float32)
        nb = tl.minimum(tl.maximum(P - p0, 0), BLOCK_P).to(tl.float32)
        mb = tl.sum(x, axis=0) / tl.maximum(nb, 1.0)  # the chunk's per-channel mean
        d = tl.where(mask, x - mb[None, :], 0.0)
        m2b = tl.sum(d * d, axis=0)
        tot = cnt + nb
        frac = nb / tl.maximum(tot, 1.0)
        delta = mb - mean
        mean = mean + delta * frac  # Chan et al.: running mean and M2 of the chunks so far
        m2 = m2 + m2b + delta * delta * (cnt * frac)
        cnt = tot
    out = (n.to(tl.int64) * PB + pb) * C_TOTAL + c_off + c
    tl.store(sum_ptr + out, mean * cnt, mask=cm)
    tl.store(m2_ptr + out, m2, mask=cm)


@triton.jit(do_not_specialize=["P", "PB", "C_TOTAL", "CPG", "G", "TILE_P"])
def _gn_combine_kernel(sum_ptr, m2_ptr, stats_ptr, P, PB, C_TOTAL, CPG, G, eps, TILE_P,
                       BLOCK_PB: tl.constexpr, BLOCK_J: tl.constexpr):
    ng = tl.program_id(0)  # n * G + g
    n = ng // G
    g = ng - n * G
    j = tl.arange(0, BLOCK_J)
    jm = j < CPG
    base = n.to(tl.int64) * PB * C_TOTAL + g * CPG
    total = P * CPG * 1.0  # float32 (also if Triton made P or CPG a constant: an argument equal to 1)
    acc = tl.zeros([BLOCK_PB, BLOCK_J], dtype=tl.float32)
    for pb0 in range(0, PB, BLOCK_PB):
        pb = pb0 + tl.arange(0, BLOCK_PB)
        mask = (pb < PB)[:, None] & jm[None, :]
        acc += tl.load(sum_ptr + base + pb[:, None].to(tl.int64) * C_TOTAL + j[None, :], mask=mask, other=0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_PB, BLOCK_J], dtype=tl.float32)
    for pb0 in range(0, PB, BLOCK_PB):
        pb = pb0 + tl.arange(0, BLOCK_PB)
        mask = (pb < PB)[:, None] & jm[None, :]
        off = base + pb[:, None].to(tl.int64) * C_TOTAL + j[None, :]
        s = tl.load(sum_ptr + off, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + off, mask=mask, other=0.0)
        cnt = tl.maximum(tl.minimum(P - pb * TILE_P, TILE_P), 1).to(tl.float32)[:, None]
        dm = s / cnt - mean
        acc += tl.where(mask, m2 + cnt * dm * dm, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    tl.store(stats_ptr + ng, mean)
    tl.store(stats_ptr + n * G + g + tl.num_programs(0), 1.0 / tl.sqrt(var + eps))


def gn_stats_triton(parts: list[torch.Tensor], groups: int, eps: float,
                    config: GnConfig | None = None) -> torch.Tensor:
    """parts: [N, C_i, H, W] tensors (any strides; NHWC memory reads coalesced) whose channel concatenation is the
    GroupNorm input -> float32 [2, N, G]: each (sample, group)'s mean and 1 / sqrt(biased var + eps).
    ``config``: the tile, or None (``pick_gn_config``: the fastest of ``CONFIGS`` for these shapes on the GPU)."""
    cfg = config if config is not None else pick_gn_config(parts, groups, eps)
    n, _, h, w = parts[0].shape
    c_total = sum(t.shape[1] for t in parts)
    p = h * w
    tile = cfg.block_p * cfg.iters
    pb = triton.cdiv(p, tile)
    dev = parts[0].device
    sums = torch.empty((n, pb, c_total), dtype=torch.float32, device=dev)
    m2s = torch.empty_like(sums)
    c_off = 0
    for t in parts:
        c = t.shape[1]
        if c:
            sn, sc, sh, sw = t.stride()
            _gn_partial_kernel[(n, pb, triton.cdiv(c, cfg.block_c))](
                t, sums, m2s, p, w, c, c_total, c_off, sn, sc, sh, sw, pb, BLOCK_P=cfg.block_p, ITERS=cfg.iters,
                BLOCK_C=cfg.block_c, num_warps=cfg.warps)
        c_off += c
    cpg = c_total // groups
    stats = torch.empty((2, n, groups), dtype=torch.float32, device=dev)
    _gn_combine_kernel[(n * groups,)](sums, m2s, stats, p, pb, c_total, cpg, groups, eps, tile,
                                      BLOCK_PB=max(16, min(64, triton.next_power_of_2(pb))),  # >= 16: no 1-wide
                                      BLOCK_J=max(16, triton.next_power_of_2(cpg)), num_warps=4)  # tiles
    return stats


def pick_gn_config(parts: list[torch.Tensor], groups: int, eps: float) -> GnConfig:
    """The fastest of ``CONFIGS`` for these parts' shapes and strides, timed once per key on the call's own inputs
    (device time of CUDA-graph replays, ``timing.graphed_ms``, partials and combine together). A candidate whose
    statistics differ from ``DEFAULT``'s beyond float32 summation order (mean by 2e-5 of |mean| + std, 1/std by
    1e-4 relative) is not one. ``DEFAULT`` in the interpreter, off the GPU, during a CUDA graph capture and where
    ``TUNE`` is off."""
    if INTERPRET or not TUNE or parts[0].device.type != "cuda":
        return DEFAULT
    key = (tuple((tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in parts), groups)
    if key in _BEST:
        return _BEST[key]
    if torch.cuda.is_current_stream_capturing():
        return DEFAULT
    ref = gn_stats_triton(parts, groups, eps, DEFAULT)
    times: dict[str, float | str] = {}
    best, best_ms = DEFAULT, math.inf
    for cfg in CONFIGS:
        try:
            got = gn_stats_triton(parts, groups, eps, cfg)
            ok = bool(((got[0] - ref[0]).abs() <= 2e-5 * (ref[0].abs() + 1 / ref[1])).all()
                      and ((got[1] - ref[1]).abs() <= 1e-4 * ref[1]).all())
            if not ok:
                times[cfg.name] = "mismatch"
                continue
            ms = graphed_ms(lambda: gn_stats_triton(parts, groups, eps, cfg), rep=3)  # noqa: B023 (called here)
        except Exception as e:  # noqa: BLE001  (a tile this Triton cannot compile: not a candidate)
            times[cfg.name] = repr(e)[:200]
            continue
        times[cfg.name] = round(ms, 5)
        if ms < best_ms:
            best, best_ms = cfg, ms
    _BEST[key], TUNE_TIMES[key] = best, times
    return best
