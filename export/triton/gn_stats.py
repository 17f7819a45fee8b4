"""GroupNorm statistics of NHWC activations in Triton (``msfp_fast::gn_stats``'s CUDA implementation): partials per
tile, combined exactly per group by a second kernel, or (``FUSED_COMBINE``, opt-in until a GPU has run it) by the
last program that stores a group's partials, one kernel launch per input part.

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
offset) into the group's mean and 1 / sqrt(var + eps). These two are the two-kernel form (``fused_combine=False``,
the default: parts + 1 launches per GroupNorm); ``tools/bench_gpu_kernels.py --sections gnstats`` times both forms.

``_gn_fused_kernel`` (``fused_combine=True``; opt-in: ``FUSED_COMBINE`` becomes True once the GPU tests
(``-k gn_stats``: the graph replay, SD1.5's largest concatenation) pass on a device and the sweep has it ahead):
the partial kernel's tile, then the combine folded into
the same launch, so a GroupNorm is one launch per part (the H200 ran the 61 combine launches of a batch-8 SD1.5 step
at ~3 us each, launch-bound: docs/triton.md session 14). Design:

* Counting. An int32 counter per (sample, group) counts the (position tile, channel) pairs whose partials are
  stored: after its stores, a program adds, for each group its channel block touches, the number of its channels in
  that group (one vector ``tl.atomic_add``, ``sem="acq_rel"``, ``scope="gpu"``: a lane per group). A group's
  counter reaches PB x C/G exactly when every one of its partials is stored; the one program whose add reaches it
  combines that group and stores 0 to the counter.
* Concatenated inputs. Counting channels, not programs, makes the target independent of how the channels are cut
  into parts and channel blocks, so every part's launch runs the same kernel and none needs to know it is the last:
  a group inside an early part is combined during that part's launch, a group straddling parts by the launch of the
  part holding its last channels (the earlier launches' partials are visible by stream order).
* Determinism. The combining program runs ``_gn_combine_group``, the two-kernel combine's code, reading the group's
  partials in the same fixed order with the same tile (``combine_tile``), so the result does not depend on which
  program is last. At the same warps both forms give the same bits (the interpreter tests check it bit for bit; on
  the GPU ``tl.sum``'s order follows the layout, i.e. the warps: the two-kernel combine runs 4 warps by default).
* Memory ordering on the GPU. Each program's threads store their partials, meet at ``tl.debug_barrier()``
  (bar.sync), then release through the atomic (``atom.global.gpu.acq_rel``; the release is cumulative, so it
  carries every thread's stores: the pattern of CUDA's threadFenceReduction sample and of cooperative groups' grid
  sync, a block barrier then the atomic). The program that sees the last count acquired with the same atomic;
  Triton hands the atomic's result to the other lanes by a warp shuffle and a barrier (bar.sync), and the branch
  barriers once more before the combine's loads, which are ``.cg`` (from L2, the coherence point: no stale L1 line
  of a partial another SM wrote). PTX checked (sm_90, compiled on the CPU): bar.sync, atom.global.gpu.acq_rel.add,
  shfl.sync + bar.sync, the branch, bar.sync, ld.global.cg. The Triton interpreter runs programs one after
  another, so there the atomics are trivially ordered: the interpreter tests check the counting, the reset and the
  combine, not the GPU ordering, which relies on these acq_rel semantics (not yet run on a GPU).
* Counters and CUDA graphs. One zero-initialized buffer per (device, N x G), allocated on first use and kept
  (``_counters``: a captured graph keeps its address); every launch leaves it zeroed (each counter is reset by its
  group's combining program), so the next part's launch, the next GroupNorm and the next graph replay find zeros
  with no memset. GroupNorms sharing it must be stream-ordered: on one stream (the UNet's step and its graph) they
  are sequential, so one buffer per device and size suffices; two GroupNorms of the same N x G in flight on two
  streams at once would corrupt each other's counts (not supported; e.g. switching to a side stream right after
  GroupNorms on another one without a synchronization, as ``do_bench_cudagraph``'s warm-up would). A first call
  during a capture gets a buffer of its own, zero-filled by a captured memset, not cached.
* Cost, on paper (not measured yet): one atomic instruction per program, two barriers, and G combines per sample in
  the programs that happen to finish their groups (overlapping the other programs' reads, except the last group's:
  the launch's tail is one combine, 2 x PB / BLOCK_PB iterations of loads from L2, against a separate launch); the
  combine's registers count in the whole kernel, hence ``combine_tile``'s cap (~90 registers instead of 80 for the
  16 x 64 / 1-warp tile, 135 uncapped).

Agrees with ``aten.group_norm``'s statistics within float32 summation order (the shifted sums avoid the
cancellation of sum-of-squares forms). Kernels are defined on import: import after choosing TRITON_INTERPRET.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gn_stats_triton", "combine_tile", "BLOCK_P", "BLOCK_C", "GN_WARPS", "FUSED_COMBINE"]

BLOCK_P = 64  # positions per tile: 64 x 64 channels x 2 bytes = 8 KB per program, one warp (GN_WARPS)
BLOCK_C = 64  # channels per tile row: 128 contiguous bytes in bf16 (one full memory transaction per row)
GN_WARPS = 1
FUSED_COMBINE = False  # the default of gn_stats_triton's fused_combine (see the module docstring)
# Tiles measured on the H200 (docs/triton.md): session 14, 4-8 chunks of 64 x 64 per program, or 128 channels, were
# slower than 64 x 64 / 4 warps on all 14 SD1.5 batch-8 GroupNorm shapes, and runtime (unspecialized) sizes made
# these kernels 0.18 ms slower per batch-8 step; session 16, one warp per program won: 16 x 64 / 1 warp 0.611 ms per
# batch-8 step against 0.793 for 64 x 64 / 4 warps; 32 x 64 (0.480) and 64 x 64 (0.445) with one warp are faster still
# but 32 x 64 failed test_gn_stats_matches_group_norm's SD1.5 case on the H200 (its former fixed output tolerance;
# results/gpu_sd15_kernels_session16_*.json, docs/triton.md session 16); session 17: 64 x 64 / 1 warp passed every GPU
# test (test_gn_stats_sd15_tiles included) and swept fastest again (0.446 ms a batch-8 step; in the step gn_partial +
# gn_combine 0.503 ms against 0.637 with 16 x 64 / 1).


@triton.jit
def _gn_partial_tile(x_ptr, sum_ptr, m2_ptr, n, pb, cb, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
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
def _gn_combine_group(sum_ptr, m2_ptr, stats_ptr, n, g, P, PB, C_TOTAL, CPG, G, NG, eps,
                      BLOCK_PB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, CACHE: tl.constexpr):
    j = tl.arange(0, BLOCK_J)
    jm = j < CPG
    base = n.to(tl.int64) * PB * C_TOTAL + g * CPG
    total = P * CPG * 1.0  # float32; also where Triton made P or CPG a constant (an argument equal to 1)
    acc = tl.zeros([BLOCK_PB, BLOCK_J], dtype=tl.float32)
    for pb0 in range(0, PB, BLOCK_PB):
        pb = pb0 + tl.arange(0, BLOCK_PB)
        mask = (pb < PB)[:, None] & jm[None, :]
        acc += tl.load(sum_ptr + base + pb[:, None].to(tl.int64) * C_TOTAL + j[None, :], mask=mask, other=0.0,
                       cache_modifier=CACHE)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_PB, BLOCK_J], dtype=tl.float32)
    for pb0 in range(0, PB, BLOCK_PB):
        pb = pb0 + tl.arange(0, BLOCK_PB)
        mask = (pb < PB)[:, None] & jm[None, :]
        off = base + pb[:, None].to(tl.int64) * C_TOTAL + j[None, :]
        s = tl.load(sum_ptr + off, mask=mask, other=0.0, cache_modifier=CACHE)
        m2 = tl.load(m2_ptr + off, mask=mask, other=0.0, cache_modifier=CACHE)
        cnt = tl.maximum(tl.minimum(P - pb * BLOCK_P, BLOCK_P), 1).to(tl.float32)[:, None]
        dm = s / cnt - mean
        acc += tl.where(mask, m2 + cnt * dm * dm, 0.0)
    var = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    tl.store(stats_ptr + n * G + g, mean)
    tl.store(stats_ptr + n * G + g + NG, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_partial_kernel(x_ptr, sum_ptr, m2_ptr, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    _gn_partial_tile(x_ptr, sum_ptr, m2_ptr, tl.program_id(0), tl.program_id(1), tl.program_id(2), P, W, C, C_TOTAL,
                     c_off, sxn, sxc, sxh, sxw, PB, BLOCK_P, BLOCK_C)


@triton.jit
def _gn_combine_kernel(sum_ptr, m2_ptr, stats_ptr, P, PB, C_TOTAL, CPG, G, eps,
                       BLOCK_PB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr):
    ng = tl.program_id(0)  # n * G + g
    n = ng // G
    _gn_combine_group(sum_ptr, m2_ptr, stats_ptr, n, ng - n * G, P, PB, C_TOTAL, CPG, G, tl.num_programs(0), eps,
                      BLOCK_PB, BLOCK_J, BLOCK_P, "")


@triton.jit
def _gn_fused_kernel(x_ptr, sum_ptr, m2_ptr, stats_ptr, cnt_ptr, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB,
                     CPG, G, NG, eps, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_PB: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(0)
    pb = tl.program_id(1)
    cb = tl.program_id(2)
    _gn_partial_tile(x_ptr, sum_ptr, m2_ptr, n, pb, cb, P, W, C, C_TOTAL, c_off, sxn, sxc, sxh, sxw, PB, BLOCK_P,
                     BLOCK_C)
    # every thread's partial stores before the counters' release (bar.sync orders them within the program; the
    # atomics' release at gpu scope is cumulative, as in CUDA's threadFenceReduction / cooperative groups' grid sync)
    tl.debug_barrier()
    lo = c_off + cb * BLOCK_C  # this tile's channels in the concatenation: [lo, hi)
    hi = c_off + tl.minimum(cb * BLOCK_C + BLOCK_C, C)
    k = tl.arange(0, BLOCK_K)
    g = lo // CPG + k  # the groups the tile touches (BLOCK_K >= their number), then groups past hi
    inc = tl.minimum(hi, (g + 1) * CPG) - tl.maximum(lo, g * CPG)  # the tile's channels in group g (<= 0 past hi)
    km = inc > 0
    old = tl.atomic_add(cnt_ptr + n * G + g, inc, mask=km, sem="acq_rel", scope="gpu")
    last = km & (old + inc == PB * CPG)  # this program completed group g: every (position tile, channel) counted
    if tl.max(last.to(tl.int32), axis=0) > 0:  # rare: at most G programs per sample take this branch
        tl.debug_barrier()  # the acquiring threads' atomics before every thread's partial loads below
        for i in range(0, BLOCK_K):  # increasing group order; each group's combine is independent of which is last
            if tl.sum(tl.where((k == i) & last, 1, 0), axis=0) > 0:
                _gn_combine_group(sum_ptr, m2_ptr, stats_ptr, n, lo // CPG + i, P, PB, C_TOTAL, CPG, G, NG, eps,
                                  BLOCK_PB, BLOCK_J, BLOCK_P, ".cg")  # .cg: L2, never a stale L1 line
        tl.store(cnt_ptr + n * G + g, tl.zeros_like(inc), mask=last)  # reset: the next launch finds zeros


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _counters(dev: torch.device, size: int) -> torch.Tensor:
    """The fused path's per-(sample, group) arrival counters: int32 zeros, one buffer per device and size, allocated
    once and never freed (a captured CUDA graph keeps its address). Every launch leaves it zeroed (each group's last
    program resets its counter), so the next GroupNorm, the next part's launch or the next graph replay finds zeros
    without a memset. Launches sharing a buffer must be ordered (one stream, as the UNet's step and its graph are);
    GroupNorms of one size running concurrently on two streams would corrupt each other's counts. A first call
    during a capture gets a buffer of its own whose zero fill is captured (replayed with the graph), not cached."""
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # one key per device: "cuda" is "cuda:0" here
    key = (dev, size)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = torch.zeros(size, dtype=torch.int32, device=dev)
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return buf
        _COUNTERS[key] = buf
    return buf


def combine_tile(pb: int, cpg: int, warps: int) -> tuple[int, int]:
    """The combine's [BLOCK_PB, BLOCK_J] tile of (position tile, channel) partials for PB position tiles and CPG
    channels per group, in a kernel of ``warps`` warps: up to 64 x the group's channels (both >= 16: no 1-wide
    tiles), BLOCK_PB halved (not below 4) while the tile exceeds 512 elements per warp. The cap is for the fused
    kernel (one warp): its registers are the partial tile's and the combine's together, 135 per thread for a 64 x 16
    combine tile against 80 for the partial kernel alone, ~90 for 32 x 16 / 16 x 32 / 8 x 64 (ptxas for sm_90, the
    16 x 64 partial tile), so the cap keeps the partial's occupancy. The summation order follows the tile: both paths
    at the same warps combine in the same order."""
    block_j = max(16, triton.next_power_of_2(cpg))
    block_pb = max(16, min(64, triton.next_power_of_2(pb)))
    while block_pb > 4 and block_pb * block_j > 512 * warps:
        block_pb //= 2
    return block_pb, block_j


def gn_stats_triton(parts: list[torch.Tensor], groups: int, eps: float, block_p: int = BLOCK_P,
                    block_c: int = BLOCK_C, num_warps: int = GN_WARPS, fused_combine: bool | None = None,
                    combine_warps: int = 4) -> torch.Tensor:
    """parts: [N, C_i, H, W] tensors (any strides; NHWC memory reads coalesced) whose channel concatenation is the
    GroupNorm input -> float32 [2, N, G]: each (sample, group)'s mean and 1 / sqrt(biased var + eps).
    ``block_p`` x ``block_c`` / ``num_warps``: the partial kernel's tile (``tools/bench_gpu_kernels.py --sections
    gnstats`` times others on SD1.5's shapes). ``fused_combine``: one ``_gn_fused_kernel`` launch per part, each
    group combined by its last program; False: ``_gn_partial_kernel`` per part, then ``_gn_combine_kernel`` with
    ``combine_warps`` warps (the two-kernel form); None: ``FUSED_COMBINE``."""
    if fused_combine is None:
        fused_combine = FUSED_COMBINE
    n, _, h, w = parts[0].shape
    c_total = sum(t.shape[1] for t in parts)
    assert c_total % groups == 0, (c_total, groups)
    p = h * w
    pb = triton.cdiv(p, block_p)
    cpg = c_total // groups
    dev = parts[0].device
    sums = torch.empty((n, pb, c_total), dtype=torch.float32, device=dev)
    m2s = torch.empty_like(sums)
    stats = torch.empty((2, n, groups), dtype=torch.float32, device=dev)
    block_pb, block_j = combine_tile(pb, cpg, num_warps if fused_combine else combine_warps)
    cnt = _counters(dev, n * groups) if fused_combine else None
    block_k = triton.next_power_of_2(min(groups, (block_c - 1) // cpg + 2))  # >= the groups one tile touches
    c_off = 0
    for t in parts:
        c = t.shape[1]
        if c:
            sn, sc, sh, sw = t.stride()
            grid = (n, pb, triton.cdiv(c, block_c))
            if fused_combine:
                _gn_fused_kernel[grid](t, sums, m2s, stats, cnt, p, w, c, c_total, c_off, sn, sc, sh, sw, pb, cpg,
                                       groups, n * groups, eps, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
                                       BLOCK_PB=block_pb, BLOCK_J=block_j, num_warps=num_warps)
            else:
                _gn_partial_kernel[grid](t, sums, m2s, p, w, c, c_total, c_off, sn, sc, sh, sw, pb, BLOCK_P=block_p,
                                         BLOCK_C=block_c, num_warps=num_warps)
        c_off += c
    if not fused_combine:
        _gn_combine_kernel[(n * groups,)](sums, m2s, stats, p, pb, c_total, cpg, groups, eps, BLOCK_PB=block_pb,
                                          BLOCK_J=block_j, BLOCK_P=block_p, num_warps=combine_warps)
    return stats
