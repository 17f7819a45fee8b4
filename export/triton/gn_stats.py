"""GroupNorm statistics of NHWC activations as two Triton kernels (``msfp_fast::gn_stats``'s CUDA implementation).

Inductor's reductions for SD1.5's GroupNorms ran at 38-100 us each at batch 8 where ~15 us reads the activation at
copy bandwidth (docs/triton.md session 13): the per-group reduction reads 20 bytes of each 640-byte NHWC row, the
per-channel one (``fast.group_norm_channels``) has too few outputs at small batches, and chunked forms became
persistent kernels reading a few channels per row. Here the reduction order is ours:

``_gn_partial_kernel``: one program per (sample, BLOCK_P positions, BLOCK_C channels) tile, read as BLOCK_P rows of
BLOCK_C contiguous channels (128 bytes per row in bf16); it writes the tile's per-channel sum and sum of squared
deviations from the tile mean (float32) to partials [N, PB, C]. A concatenated input (the up blocks' skip
connections) is read part by part, each part's launch writing its channel range, so the concatenation is not
materialized for the statistics.
``_gn_combine_kernel``: one program per (sample, group) combines the PB x C/G partials exactly (Chan et al.: the
group mean from the sums, the group M2 as the sum of the tile M2s plus each tile's count times its squared mean
offset) into the group's mean and 1 / sqrt(var + eps), or (``affine``) straight into each channel's scale and shift
(``msfp_fast::gn_scale_shift``: the apply kernel then loads two contiguous [N, C] rows instead of gathering the
group's statistics and the affine weights per element). A GroupNorm is parts + 1 launches.
Session 17 measured the combine folded into the partial kernel's launch (per-group atomic counters, the last
program combining) on the H200: exact, slower at every tile (batch 8, 64 x 64 / 1 warp: 1.175 against 0.446 ms per
step); removed, the code is at 802e069.

Agrees with ``aten.group_norm``'s statistics within float32 summation order (the shifted sums avoid the
cancellation of sum-of-squares forms). Kernels are defined on import: import after choosing TRITON_INTERPRET.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gn_stats_triton", "combine_tile", "BLOCK_P", "BLOCK_C", "GN_WARPS"]

BLOCK_P = 64  # positions per tile: 64 x 64 channels x 2 bytes = 8 KB per program, one warp (GN_WARPS)
BLOCK_C = 64  # channels per tile row: 128 contiguous bytes in bf16 (one full memory transaction per row)
GN_WARPS = 1
# Tiles measured on the H200 (docs/triton.md): session 14, 4-8 chunks of 64 x 64 per program, or 128 channels, were
# slower than 64 x 64 / 4 warps on all 14 SD1.5 batch-8 GroupNorm shapes, and runtime (unspecialized) sizes made
# these kernels 0.18 ms slower per batch-8 step; session 16, one warp per program won: 16 x 64 / 1 warp 0.611 ms per
# batch-8 step against 0.793 for 64 x 64 / 4 warps; 32 x 64 (0.480) and 64 x 64 (0.445) with one warp are faster still
# but 32 x 64 failed test_gn_stats_matches_group_norm's SD1.5 case on the H200 (its former fixed output tolerance;
# results/gpu_sd15_kernels_session16_*.json, docs/triton.md session 16); session 17: 64 x 64 / 1 warp passed every GPU
# test (test_gn_stats_sd15_tiles included) and swept fastest again (0.446 ms a batch-8 step; in the step gn_partial +
# gn_combine 0.503 ms against 0.637 with 16 x 64 / 1).


@triton.jit
def _gn_partial_kernel(x_ptr, sum_ptr, m2_ptr, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < P
    cm = c < C
    h = p // W
    w = p - h * W
    offs = (n.to(tl.int64) * sxn + (h * sxh + w * sxw).to(tl.int64)[:, None] + (c * sxc).to(tl.int64)[None, :])
    mask = pm[:, None] & cm[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cnt = tl.minimum(P - pb * BLOCK_P, BLOCK_P).to(tl.float32)
    s = tl.sum(x, axis=0)  # [BLOCK_C]
    d = tl.where(mask, x - (s / cnt)[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    out = (n.to(tl.int64) * PB + pb) * C_TOTAL + c_off + c
    tl.store(sum_ptr + out, s, mask=cm)
    tl.store(m2_ptr + out, m2, mask=cm)


@triton.jit
def _gn_combine_kernel(sum_ptr, m2_ptr, stats_ptr, w_ptr, b_ptr, P, PB, C_TOTAL, CPG, G, eps,
                       BLOCK_PB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
                       AFFINE: tl.constexpr = False, HAS_W: tl.constexpr = False, HAS_B: tl.constexpr = False):
    ng = tl.program_id(0)  # n * G + g
    n = ng // G
    g = ng - n * G
    j = tl.arange(0, BLOCK_J)
    jm = j < CPG
    base = n.to(tl.int64) * PB * C_TOTAL + g * CPG
    total = P * CPG * 1.0  # float32; also where Triton made P or CPG a constant (an argument equal to 1)
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
        cnt = tl.maximum(tl.minimum(P - pb * BLOCK_P, BLOCK_P), 1).to(tl.float32)[:, None]
        dm = s / cnt - mean
        acc += tl.where(mask, m2 + cnt * dm * dm, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    rstd = 1.0 / tl.sqrt(var + eps)
    if AFFINE:  # each channel's scale and shift, in _group_norm_apply's order: rstd * w, (-mean * rstd) * w + b
        ch = g * CPG + j
        scale = tl.zeros([BLOCK_J], dtype=tl.float32) + rstd
        shift = tl.zeros([BLOCK_J], dtype=tl.float32) - mean * rstd
        if HAS_W:
            w = tl.load(w_ptr + ch, mask=jm, other=0.0).to(tl.float32)
            scale = scale * w
            shift = shift * w
        if HAS_B:
            shift = shift + tl.load(b_ptr + ch, mask=jm, other=0.0).to(tl.float32)
        out = n.to(tl.int64) * C_TOTAL + ch
        tl.store(stats_ptr + out, scale, mask=jm)
        tl.store(stats_ptr + C_TOTAL * (tl.num_programs(0) // G) + out, shift, mask=jm)
    else:
        tl.store(stats_ptr + ng, mean)
        tl.store(stats_ptr + ng + tl.num_programs(0), rstd)


def combine_tile(pb: int, cpg: int, warps: int) -> tuple[int, int]:
    """The combine's [BLOCK_PB, BLOCK_J] tile of (position tile, channel) partials for PB position tiles and CPG
    channels per group, in a kernel of ``warps`` warps: up to 64 x the group's channels (both >= 16: no 1-wide
    tiles), BLOCK_PB halved (not below 4) while the tile exceeds 512 elements per warp. This rule is what session 17
    measured on the H200 (the combine at 4 warps: 0.175 ms per batch-8 SD1.5 step). Session 16's combine was not
    capped (up to 64 x 128); at 4 warps the cap binds only above 2048 elements, which SD1.5's GroupNorms reach with
    16-position partial tiles (64 x 64 -> 32 x 64 at 32 x 32 with 1280 or 1920 channels), never with 32 or 64
    positions: there the tiles are the uncapped rule's. The summation order follows the tile."""
    block_j = max(16, triton.next_power_of_2(cpg))
    block_pb = max(16, min(64, triton.next_power_of_2(pb)))
    while block_pb > 4 and block_pb * block_j > 512 * warps:
        block_pb //= 2
    return block_pb, block_j


def gn_stats_triton(parts: list[torch.Tensor], groups: int, eps: float, block_p: int = BLOCK_P,
                    block_c: int = BLOCK_C, num_warps: int = GN_WARPS, combine_warps: int = 4,
                    affine: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> torch.Tensor:
    """parts: [N, C_i, H, W] tensors (any strides; NHWC memory reads coalesced) whose channel concatenation is the
    GroupNorm input -> float32 [2, N, G]: each (sample, group)'s mean and 1 / sqrt(biased var + eps); with
    ``affine=(weight, bias)`` (either may be None; C elements on the parts' device) float32 [2, N, C] instead: each
    (sample, channel)'s scale ``rstd * w`` and shift ``(-mean * rstd) * w + b``, written by the same combine launch.
    ``block_p`` x ``block_c`` / ``num_warps``: the partial kernel's tile (``tools/bench_gpu_kernels.py --sections
    gnstats`` times others on SD1.5's shapes), one ``_gn_partial_kernel`` launch per part; then
    ``_gn_combine_kernel`` with ``combine_warps`` warps and ``combine_tile``'s tile."""
    n, _, h, w = parts[0].shape
    c_total = sum(t.shape[1] for t in parts)
    assert c_total % groups == 0, (c_total, groups)
    p = h * w
    pb = triton.cdiv(p, block_p)
    cpg = c_total // groups
    dev = parts[0].device
    weight, bias = affine if affine is not None else (None, None)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.numel() != c_total or t.device != dev):
            raise ValueError(f"gn_stats_triton: {name} of {t.numel()} elements on {t.device}, want {c_total} on "
                             f"{dev}")
    weight, bias = (None if t is None else t.reshape(c_total).contiguous() for t in (weight, bias))  # read at stride 1
    sums = torch.empty((n, pb, c_total), dtype=torch.float32, device=dev)
    m2s = torch.empty_like(sums)
    c_off = 0
    for t in parts:
        c = t.shape[1]
        if c:
            sn, sc, sh, sw = t.stride()
            _gn_partial_kernel[(n, pb, triton.cdiv(c, block_c))](t, sums, m2s, p, w, c, c_total, c_off, sn, sc, sh,
                                                                 sw, pb, BLOCK_P=block_p, BLOCK_C=block_c,
                                                                 num_warps=num_warps)
        c_off += c
    stats = torch.empty((2, n, c_total if affine is not None else groups), dtype=torch.float32, device=dev)
    block_pb, block_j = combine_tile(pb, cpg, combine_warps)
    _gn_combine_kernel[(n * groups,)](sums, m2s, stats, stats if weight is None else weight,
                                      stats if bias is None else bias, p, pb, c_total, cpg, groups, eps,
                                      BLOCK_PB=block_pb, BLOCK_J=block_j, BLOCK_P=block_p,
                                      AFFINE=affine is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                                      num_warps=combine_warps)
    return stats
