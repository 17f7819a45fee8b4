"""The Inductor fast path (export/triton/fast.py): exact grid rounding in fusable ops, the FP8 GEMM layers, the rewrite.

Runs on the CPU (torch._scaled_mm has a CPU kernel; Inductor generates C++ there) and on the GPU unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import msfp_compiler  # noqa: F401
from msfp_compiler.device import exact_fp32
from msfp_compiler.export.triton import fast as FA
from msfp_compiler.export.triton import fast_ops as O
from msfp_compiler.ops import get_format, pack_codes

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FORMATS = ["e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]


def _inputs(fmt: str) -> torch.Tensor:
    """Levels, exact midpoints and their float32 neighbours, saturation, +-0, denormals, random values."""
    f = get_format(fmt)
    lv = f.levels
    mids = (lv[1:] + lv[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    v = torch.cat([lv, mids, up, down, torch.tensor([f.max * 1.01, f.max * 7, 1e-30, 1e-45, 0.0, 3e38])])
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([v, -v, torch.randn(4000, generator=gen) * f.max / 2, torch.randn(1000, generator=gen) * 1e-3])
    return v


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grid_round_bit_exact(fmt: str) -> None:
    v = _inputs(fmt)
    ref = get_format(fmt).round_to_grid(v)
    got = FA.grid_round(v, fmt)
    assert torch.equal(_bits(got), _bits(ref)), f"{fmt}: {(got != ref).sum()} of {v.numel()} differ"


def test_grid_round_compiled_bit_exact() -> None:
    """Inductor's generated code (C++ on the CPU, Triton on the GPU) rounds exactly as the reference."""
    fmts = ["e2m1", "ue2m2", "e3m0", "uint4"]

    def fn(v: torch.Tensor) -> list[torch.Tensor]:
        return [FA.grid_round(v * 1.0, f) for f in fmts]

    cf = torch.compile(fn, dynamic=False)
    for f, got in zip(fmts, cf(torch.cat([_inputs(f) for f in fmts]).to(DEV))):
        v = torch.cat([_inputs(g) for g in fmts])
        ref = get_format(f).round_to_grid(v)
        assert torch.equal(_bits(got.cpu()), _bits(ref)), f"{f}: {(got.cpu() != ref).sum()} differ"


def test_fake_quant_matches_op() -> None:
    x = torch.randn(3000) * 3
    s, z = torch.tensor(0.37), torch.tensor(-0.2785)
    for fmt in ("ue2m2", "e2m1", "int8"):
        ref = torch.ops.msfp.quantize(x, s, z, fmt)
        assert torch.equal(FA.fake_quant(x, s, z, fmt, out_dtype=torch.float32), ref)
        ref_f = torch.ops.msfp.quantize_folded(x, s, z, fmt)
        assert torch.equal(FA.fake_quant(x, s, z, fmt, folded=True, out_dtype=torch.float32), ref_f)
        # bf16 output: the float32 value rounded once
        assert torch.equal(FA.fake_quant(x, s, z, fmt), ref.bfloat16())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _weight(n: int, shape: tuple, fmt: str, gen: torch.Generator, sets: int = 1):
    codes = torch.randint(0, 16, (sets, n, *shape), generator=gen, dtype=torch.uint8)
    scale = torch.rand(sets, n, generator=gen) * 0.05 + 0.01
    deq = get_format(fmt).code_table[codes.long()] * scale.reshape(sets, n, *([1] * len(shape)))
    return codes, scale, deq


@pytest.mark.parametrize("weights", ["packed", "fp8"])
@pytest.mark.parametrize("afmt,zp,folded", [("e2m1", 0.0, False), ("ue2m2", -0.25, False), ("ue2m2", -0.25, True)])
def test_fast_linear_matches_fake_quant(weights: str, afmt: str, zp: float, folded: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    n, k = 48, 64
    codes, ws, deq = _weight(n, (k,), "e2m1", gen)
    bias = torch.randn(n, generator=gen)
    s_a = 0.21
    x = torch.randn(3, 5, k, generator=gen)
    q = (torch.ops.msfp.quantize_folded if folded else torch.ops.msfp.quantize)(x, torch.tensor(s_a), torch.tensor(zp), afmt)
    b_ref = bias + zp * deq[0].sum(-1) if folded else bias  # quantize_folded's consumer bias carries the zero point
    ref = F.linear(q, deq[0], b_ref)
    mod = FA.FastGemm(codes, ws, "e2m1", s_a, zp, afmt, b_ref if folded else bias, folded, weights).to(DEV)
    got = mod(x.to(DEV)).float().cpu()
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert _rel(got, ref) < 8e-3  # bf16 output; FP8 products are exact


@pytest.mark.parametrize("kernel,stride,pad,zp", [(3, 1, 1, -0.3), (3, 2, 1, 0.0), (1, 1, 0, -0.3), (3, 1, 1, 0.0)])
def test_fast_conv_matches_fake_quant(kernel: int, stride: int, pad: int, zp: float) -> None:
    gen = torch.Generator().manual_seed(2)
    b, c, h, w, n = 2, 32, 6, 5, 16
    codes, ws, deq = _weight(n, (c, kernel, kernel), "e1m2", gen)
    bias = torch.randn(n, generator=gen)
    afmt, s_a = ("ue2m2" if zp else "e2m1"), 0.17
    x = torch.randn(b, c, h, w, generator=gen)
    q = torch.ops.msfp.quantize(x, torch.tensor(s_a), torch.tensor(zp), afmt)
    ref = F.conv2d(q, deq[0], bias, stride, pad)
    flat = codes.permute(0, 1, 3, 4, 2).reshape(1, n, -1)
    conv = {"kernel": (kernel, kernel), "stride": (stride, stride), "pads": (pad,) * 4}
    zargs = (c, h, w, (kernel, kernel), (stride, stride), (pad,) * 4, zp, 0.0) if pad and zp else None
    mod = FA.FastGemm(flat, ws, "e1m2", s_a, zp, afmt, bias, bool(zargs), "packed", conv,
                      deq if zargs else None, zargs).to(DEV)
    got = mod(x.to(DEV))
    assert got.shape == ref.shape
    assert got.permute(0, 2, 3, 1).is_contiguous()  # NHWC memory: no layout transform for the next op
    assert _rel(got.float().cpu(), ref) < 8e-3


def test_fast_gemm_talora_sets() -> None:
    gen = torch.Generator().manual_seed(3)
    codes, ws, deq = _weight(32, (32,), "e2m1", gen, sets=3)
    x = torch.randn(4, 32, generator=gen)
    mod = FA.FastGemm(codes, ws, "e2m1", 0.3, 0.0, "e2m1", None, False, "packed").to(DEV)
    q = torch.ops.msfp.quantize(x, torch.tensor(0.3), torch.tensor(0.0), "e2m1")
    for k in range(3):
        got = mod(x.to(DEV), set_index=torch.tensor([k], device=DEV)).float().cpu()
        assert _rel(got, q @ deq[k].T) < 8e-3


def test_build_fast_conv_behind_an_explicit_pad() -> None:
    """fold_zero_point's explicit border (pad(quantize_folded(x), -z) into an unpadded conv, test_triton's _QNet):
    the conv fuses with the pad folded into its im2col, and the output is the fake-quant graph's (float32)."""
    from tests.export.test_triton import _exported

    ep, x = _exported()
    gm = ep.module()
    pad = torch.ops.aten.constant_pad_nd.default
    assert sum(n.target == pad for n in gm.graph.nodes) == 1
    fast = FA.build_fast(gm, DEV, dtype=torch.float32)
    assert fast.report.fused["conv2d"] == 3 and not any(n.target == pad for n in fast.gm.graph.nodes)
    with torch.no_grad(), exact_fp32():
        assert _rel(fast(x.to(DEV)).cpu(), gm(x)) < (1e-3 if DEV.type == "cuda" else 1e-5)


def test_build_fast_on_compiled_cond_unet(compiled_cond) -> None:
    """The rewritten tiny SD-style UNet: every 4-bit linear/conv becomes an FP8 GEMM, output close to the float32
    fake-quant graph (eager; on the GPU also under torch.compile), packed weights smaller than E4M3 ones."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    exact = FA.build_fast(gm, DEV, dtype=torch.float32)
    rep = exact.report
    assert rep.fused["conv2d"] >= 10 and rep.fused["linear"] >= 20, str(rep)
    assert all("8" in why or "not exact" in why or "16" in why or "per part" in why
               for why in rep.skipped.values()), str(rep)
    dev_args = [a.to(DEV) for a in args]
    with torch.no_grad():
        ref = gm(*args)
        # float32 activations: only the GEMM's summation order differs from the reference graph. No TF32 in the
        # kept float32 convs (cuDNN's default on CUDA): the H200 gave 0.078 with it (session 10); rounding those
        # convs' inputs to 10 mantissa bits on the CPU gives 0.24 (flipped 4-bit decisions downstream), without 2.4e-7
        with exact_fp32():
            got = exact(*dev_args).cpu()
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert _rel(got, ref) < (1e-3 if DEV.type == "cuda" else 1e-5)
        # bf16 activations: quantizers see bf16-rounded inputs, and in this random 16-channel model a few flipped
        # 4-bit decisions move the output by tens of percent (docs/triton.md: the trained models are the measure)
        fast = FA.build_fast(gm, DEV)
        out = fast(*dev_args).cpu()
        assert torch.isfinite(out).all() and _rel(out, ref) < 0.6
        # one graph for torch.compile: no graph breaks anywhere in the rewritten model, whose packed weights decode
        # in DecodeGroup modules (the grouped decode's code path; test_build_fast_decode_groups varies the grouping)
        assert any(isinstance(m, FA.DecodeGroup) for m in fast.modules())
        traced = torch.compile(fast, backend="eager", fullgraph=True)(*dev_args).cpu()
        assert torch.equal(traced, out)
    # resident bytes: the fused layers' original tensors are dropped, 4-bit codes take half of E4M3's bytes
    packed = FA.build_fast(gm, "cpu", weights="packed")
    fp8 = FA.build_fast(gm, "cpu", weights="fp8")
    assert not any("weight_packed" in n for n, _ in packed.named_buffers() if not n.startswith("gm.msfp_fast_"))
    layers = [m for m in packed.modules() if isinstance(m, FA.FastGemm)]
    codes = sum(m.n * m.k // 2 for m in layers)
    grouped = sum(m.packed.numel() for m in packed.modules() if isinstance(m, FA.DecodeGroup))
    assert codes <= grouped <= codes + max(codes / 32, 256 * len(layers)) and not any(getattr(m, "packed", None) is not None for m in
                                                            packed.modules() if isinstance(m, FA.FastGemm))
    # E4M3: 2 bytes per packed byte (the groups' block tables and padding cost a few percent on this tiny model)
    assert FA.weight_bytes(fp8) - FA.weight_bytes(packed) >= 0.85 * codes


def test_build_fast_decode_groups(compiled_cond) -> None:
    """Grouped decodes (several layers per launch) give the per-layer decode's output bit for bit, with the same
    resident codes. (A model decoding in DecodeGroup modules traces as one graph: test_build_fast_on_compiled_cond_unet;
    how many groups there are changes no code path.)"""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    per_layer = FA.build_fast(gm, DEV, decode_group_bytes=0)
    sizes = [m.n * m.k for m in per_layer.modules() if isinstance(m, FA.FastGemm)]
    grouped = FA.build_fast(gm, DEV, decode_group_bytes=4 * max(sizes))
    one = FA.build_fast(gm, DEV, decode_group_bytes=1)  # every layer a group of its own
    assert one.report.decode_groups == len(sizes) <= per_layer.report.decode_groups  # merged: a launch per format
    assert 1 < grouped.report.decode_groups < len(sizes), str(grouped.report)
    with torch.no_grad():
        ref = per_layer(*args)
        assert torch.equal(grouped(*args), ref) and torch.equal(one(*args), ref)
    codes = sum(m.packed.numel() for m in per_layer.modules() if isinstance(m, FA.FastGemm))
    grouped_codes = sum(m.packed.numel() for m in grouped.modules() if isinstance(m, FA.DecodeGroup))
    assert codes <= grouped_codes < codes + 4096 * len(sizes)  # plus at most a block of padding per layer


def test_build_fast_merges_shared_inputs(compiled_cond) -> None:
    """Linears reading one quantized input (Q/K/V, the cross-attention K/V of every block) become one GEMM each; the
    output is the unmerged one's up to the GEMM's summation order (float32 activations), packed and E4M3 alike."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    with torch.no_grad():
        for weights in ("packed", "fp8"):
            apart = FA.build_fast(gm, DEV, weights=weights, dtype=torch.float32, merge=False)
            merged = FA.build_fast(gm, DEV, weights=weights, dtype=torch.float32)
            gemms = [sum(isinstance(m, FA.FastGemm) for m in f.modules()) for f in (apart, merged)]
            assert apart.report.merged_away == 0 and merged.report.merged_away >= 10
            assert gemms[1] == gemms[0] - merged.report.merged_away
            assert _rel(merged(*args), apart(*args)) < (1e-3 if DEV.type == "cuda" else 1e-5)
    per_layer = FA.build_fast(gm, DEV, decode_group_bytes=0)  # merged layers decoded by their own launches
    assert per_layer.report.merged_away >= 10
    with torch.no_grad():
        assert torch.equal(per_layer(*args), FA.build_fast(gm, DEV)(*args))


def test_part_quant_matches_fake_quant_per_part() -> None:
    """PartQuant (one per-column function) gives each part's fake_quant bit for bit: signed and unsigned fp / int
    formats, folded and not, zeros of both signs, saturation, float32 and bfloat16."""
    quants = [(0.37, 0.0, "e1m2", False), (0.05, -0.3, "ue2m2", False), (1.3, 0.2, "int4", True),
              (0.11, 0.0, "e3m0", False), (0.7, 0.1, "uint4", False), (0.2, 0.0, "e2m1", True),
              (0.02, 0.0, "int8", False), (0.01, 0.0, "ue4m0", False)]
    widths = [3, 4, 2, 5, 3, 2, 4, 3]
    pq = FA.PartQuant(quants, widths)
    y = torch.randn(64, sum(widths), generator=torch.Generator().manual_seed(0)) * 3
    y[0], y[1], y[2], y[3] = 0.0, -0.0, 1e4, -1e4
    for dt, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        yy = y.to(dt)
        ref = torch.cat([FA.fake_quant(p, torch.tensor(s), torch.tensor(z), f, fo, dt)
                         for p, (s, z, f, fo) in zip(yy.split(widths, -1), quants)], -1)
        assert torch.equal(pq(yy).view(bits), ref.view(bits))


def test_build_fast_quantize_parts(compiled_cond) -> None:
    """quantize_parts: the Q/K/V (and cross-attention K/V) fake quantizers move into their merged GEMMs; the model's
    output is unchanged bit for bit (float32 and bf16). That the bf16 model (the one deployed; float32 is the checking
    dtype) traces as one graph is checked with implicit_conv in test_build_fast_implicit_conv (one Dynamo trace costs
    ~10 CPU-s of the suite)."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    for dtype in (torch.float32, torch.bfloat16):
        plain = FA.build_fast(gm, DEV, dtype=dtype)
        parts = FA.build_fast(gm, DEV, dtype=dtype, quantize_parts=True)
        moved = parts.report.part_quant_moved
        count = [sum(n.target is FA.fake_quant for n in f.gm.graph.nodes) for f in (plain, parts)]
        assert moved >= 10 and count[1] == count[0] - moved and plain.report.part_quant_moved == 0
        with torch.no_grad():
            assert torch.equal(parts(*args), plain(*args))


def test_build_fast_implicit_conv(compiled_cond) -> None:
    """implicit_conv (the default on CUDA): the k x k stride-1 convs go through msfp_fast::conv_e4m3 (no im2col op
    left for them); the bf16 model's output is unchanged bit for bit (the op sums the same E4M3 products in float32
    and rounds once, as _scaled_mm does); the float32 checking dtype is left alone. With quantize_parts too (it moves the attention
    operands' quantizers, implicit_conv the convs: disjoint layers), the bf16 model gives the same output and traces
    as one graph: one Dynamo trace for both options' code paths (the default build's im2col path is traced in
    test_build_fast_on_compiled_cond_unet)."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    plain = FA.build_fast(gm, DEV, implicit_conv=False)
    implicit = FA.build_fast(gm, DEV, implicit_conv=True)
    routed = [m for m in implicit.modules() if isinstance(m, FA.FastGemm) and m.implicit]
    assert implicit.report.implicit_convs == len(routed) >= 2 and plain.report.implicit_convs == 0
    assert all(m.conv["stride"] == (1, 1) and m.conv["kernel"] != (1, 1) for m in routed)
    assert FA.build_fast(gm, DEV, dtype=torch.float32, implicit_conv=True).report.implicit_convs == 0
    # the default: on for CUDA devices only (on the CPU the op is im2col + GEMM anyway)
    assert FA.build_fast(gm, "cpu").report.implicit_convs == 0
    both = FA.build_fast(gm, DEV, implicit_conv=True, quantize_parts=True)
    assert both.report.implicit_convs == len(routed) and both.report.part_quant_moved >= 10
    with torch.no_grad():
        ref = plain(*args)
        assert torch.equal(implicit(*args), ref)
        assert torch.equal(both(*args), ref)
        assert torch.equal(torch.compile(both, backend="eager", fullgraph=True)(*args), ref)


def test_build_fast_mixed_weights(compiled_cond, monkeypatch) -> None:
    """weights="mixed": small layers E4M3-resident, large ones packed; decoding is exact, so the output is the packed
    model's bit for bit, and the resident bytes lie between the two."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    sizes = sorted(m.n * m.k for m in FA.build_fast(gm, "cpu").modules() if isinstance(m, FA.FastGemm))
    monkeypatch.setattr(FA, "SMALL_LAYER", sizes[len(sizes) // 2])
    mixed = FA.build_fast(gm, DEV, weights="mixed")
    modes = {m.weights for m in mixed.modules() if isinstance(m, FA.FastGemm)}
    assert modes == {"fp8", "packed"}
    packed, fp8 = FA.build_fast(gm, DEV, weights="packed"), FA.build_fast(gm, DEV, weights="fp8")
    with torch.no_grad():
        assert torch.equal(mixed(*args), packed(*args))
    assert FA.weight_bytes(packed) < FA.weight_bytes(mixed) < FA.weight_bytes(fp8)
    with pytest.raises(ValueError, match="weights mode"):
        FA.build_fast(gm, DEV, weights="int4")


def test_build_fast_on_loaded_pt2(compiled_unet2d, tmp_path) -> None:
    """msfp-sample --backend triton --fast rewrites the module of a loaded .pt2 (whose train()/eval() raise). On the
    UNet2DModel: the .pt2 round trip (torch.export, save, load) costs less than on the SD-style UNet, and the
    rewrite's layers are the same kinds."""
    from msfp_compiler.export.triton.runtime import load_pt2

    path = tmp_path / "m.pt2"
    compiled_unet2d.save_pt2(str(path))
    args = [a.to(DEV) for a in compiled_unet2d.calibration.batches[0].args]
    gm = load_pt2(str(path))

    def no_train(mode: bool = True) -> None:  # what torch 2.11's exported module does
        raise NotImplementedError("Calling train() is not supported yet.")

    gm.train = no_train
    fast = FA.build_fast(gm, DEV, inplace=True)  # as msfp-sample does
    direct = FA.build_fast(compiled_unet2d.graph_module, DEV)
    assert not fast.training and fast.report.fused == direct.report.fused and fast.report.fused["conv2d"] >= 5
    with torch.no_grad():
        assert torch.equal(fast(*args), direct(*args))


@pytest.mark.parametrize("fmt,shape", [("e2m1", [6, 7]), ("int4", [4, 3, 3, 3]), ("ue2m2", [5, 2, 1, 1])])
def test_decode_packed_matches_op(fmt: str, shape: list[int]) -> None:
    """Unfused packed weights: the compiler's interleaved codes in the fast path's halves layout (odd K padded),
    decoded by msfp_fast::decode_w4 and scaled, equal msfp::dequantize_packed bit for bit."""
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, get_format(fmt).code_table.numel(), shape, generator=gen, dtype=torch.uint8)
    p, s = pack_codes(codes), torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen)
    ref = torch.ops.msfp.dequantize_packed(p, s, fmt, shape)
    halves = FA.halves_of_packed(p, shape)
    assert halves.shape == (1, shape[0], (math.prod(shape[1:]) + 1) // 2)
    assert torch.equal(FA.decode_packed(halves, O.e4m3_lut(fmt), s, shape, torch.float32), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams and graphs")
def test_graphed_step_prefetch_exact(compiled_cond) -> None:
    """graphed.GraphedStep: the compiled step replayed from one CUDA graph, its decode groups decoded on a side
    stream ahead of their consumers, gives the compiled step's output bit for bit (same kernels, same inputs), as
    does the capture with the decode in line; a replay with new inputs follows them."""
    from msfp_compiler.export.triton.graphed import GraphedStep

    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    fast = FA.build_fast(gm, DEV, decode_group_bytes=1)  # several groups: several events to wait for
    assert fast.report.decode_groups >= 2, str(fast.report)
    step = torch.compile(fast)
    prefetched = GraphedStep(step, fast, tuple(args), prefetch=True)
    inline = GraphedStep(step, fast, tuple(args), prefetch=False)
    assert prefetched.prefetch is not None and inline.prefetch is None
    assert prefetched.prefetch.taken == len(prefetched.prefetch.groups) >= 2  # in the capture: every group
    with torch.no_grad():
        ref = step(*args).clone()
        assert torch.equal(prefetched(*args), ref) and torch.equal(inline(*args), ref)
        new = [args[0] * 0.5, *args[1:]]
        ref2 = step(*new).clone()
        assert not torch.equal(ref2, ref) and torch.equal(prefetched(*new), ref2)


def test_per_shape_builds_once_per_shape() -> None:
    """graphed.PerShape, msfp-sample --fast's step cache: one step built per new input shapes and dtypes, reused
    after; through the sampler, full chunks and the smaller last chunk each get their own step (CPU, stub steps)."""
    from msfp_compiler.export.triton.graphed import PerShape
    from msfp_compiler.export.triton.runtime import sample_ddim

    built: list[tuple] = []

    def build(example: tuple):
        built.append(tuple((tuple(a.shape), a.dtype) for a in example))
        mark = float(len(built))
        return lambda x, t: torch.full_like(x, mark)  # eps says which build answers

    step = PerShape(build)
    t3, t1 = torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    assert step(torch.zeros(3, 2), t3).unique().tolist() == [1.0]
    assert step(torch.ones(1, 2), t1).unique().tolist() == [2.0]
    assert step(torch.ones(3, 2), t3).unique().tolist() == [1.0] and len(built) == 2
    assert step(torch.ones(3, 2, dtype=torch.float64), t3).unique().tolist() == [3.0]

    built.clear()
    chunked = PerShape(build)
    for n in (3, 3, 1):  # -n 7 in chunks of 3, 2 DDIM steps each
        assert torch.isfinite(sample_ddim(chunked, (n, 1, 4, 4), 2, device="cpu")).all()
    assert built == [(((3, 1, 4, 4), torch.float32), ((3,), torch.int64)),
                     (((1, 1, 4, 4), torch.float32), ((1,), torch.int64))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_sample_fast_one_graph_per_chunk_shape(compiled_cond, tmp_path, monkeypatch) -> None:
    """msfp-sample --backend triton --fast: the graphed step (graphed_by_shape), one CUDA graph per chunk shape (a
    full chunk of 2, a last chunk of 1), each replaying its own compiled step exactly."""
    from msfp_compiler import cli
    from msfp_compiler.export.triton import graphed

    made: list[graphed.PerShape] = []
    real = graphed.graphed_by_shape

    def spy(module, prefetch=False):
        made.append(real(module, prefetch))
        return made[-1]

    monkeypatch.setattr(graphed, "graphed_by_shape", spy)
    monkeypatch.setattr(cli, "SAMPLE_CHUNK", 2)
    path, png = tmp_path / "m.pt2", tmp_path / "s.png"
    compiled_cond.save_pt2(str(path))
    assert cli.sample_main([str(path), "--backend", "triton", "--fast", "--out", str(png), "--steps", "2", "-n", "3",
                            "-q"]) == 0
    assert png.is_file() and len(made) == 1
    steps = made[0].steps
    assert sorted(k[0][0][0] for k in steps) == [1, 2]  # the sample's batch of each captured step
    for step in steps.values():
        args = [a.clone().normal_() if a.is_floating_point() else a.clone() for a in step.inputs]
        with torch.no_grad():
            ref = step.fn(*args).clone()
        assert torch.equal(step(*args), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_channels_matches_group_norm(dtype: torch.dtype) -> None:
    """group_norm_channels (per-channel Welford statistics combined per group, NHWC reads) gives F.group_norm's
    output on NCHW and NHWC memory, also where the mean is 300x the spread (the combination is exact, no
    E[x^2] - E[x]^2 cancellation), and returns NHWC memory; on the GPU also through Inductor."""
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, g = 2, 24, 5, 7, 6
    x = torch.randn(n, c, h, w, generator=gen) * torch.rand(1, c, 1, 1, generator=gen) * 3
    x = x + 300 * torch.randn(1, c, 1, 1, generator=gen).sign() * (torch.arange(c) % 4 == 0).view(1, c, 1, 1)
    wt, bs = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    for mem in (torch.contiguous_format, torch.channels_last):
        xi = x.to(DEV, dtype).contiguous(memory_format=mem)
        ref = F.group_norm(xi.float(), g, wt.to(DEV), bs.to(DEV), 1e-5)
        got = FA.group_norm_channels(xi, g, wt.to(DEV, dtype), bs.to(DEV, dtype), 1e-5)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        tol = 2e-6 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding (and the rounded weights)
        ref_w = F.group_norm(xi.float(), g, wt.to(DEV, dtype).float(), bs.to(DEV, dtype).float(), 1e-5)
        assert (got.float() - ref_w).abs().max() <= tol * ref_w.abs().max(), str(mem)
        assert _rel(got.float(), ref) < (1e-6 if dtype == torch.float32 else 1e-2)
        if DEV.type == "cuda":
            comp = torch.compile(FA.group_norm_channels)(xi, g, wt.to(DEV, dtype), bs.to(DEV, dtype), 1e-5)
            assert (comp.float() - ref_w).abs().max() <= tol * ref_w.abs().max()
    x3 = x[:, :, :, 0]  # [N, C, L]: not 4-d, aten's
    assert torch.equal(FA.group_norm_channels(x3, g), F.group_norm(x3, g))


def test_build_fast_group_norm_channels(compiled_cond) -> None:
    """build_fast(group_norm="channels") replaces every 4-d GroupNorm of the tiny cond UNet and keeps the float32
    rewrite's output at the reference graph's (the statistics' summation order is all that differs); "aten" keeps
    the captured op; "auto" (the default) runs the aten op below GN_TRITON_MIN_BATCH samples and group_norm_triton
    (with the concatenations' parts) from there on, bit for bit."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    n_gn = sum(1 for nd in gm.graph.nodes
               if nd.op == "call_function" and nd.target == torch.ops.aten.group_norm.default)
    chan = FA.build_fast(gm, "cpu", dtype=torch.float32, group_norm="channels")
    aten_gn = FA.build_fast(gm, "cpu", dtype=torch.float32, group_norm="aten")
    auto = FA.build_fast(gm, "cpu", dtype=torch.float32)
    assert chan.report.group_norms == auto.report.group_norms == n_gn >= 4 and aten_gn.report.group_norms == 0
    assert "channels-last GroupNorms" in str(chan.report)
    small = [a[:1] for a in args]  # batch 1: aten's op
    big = [torch.cat([a] * FA.GN_TRITON_MIN_BATCH)[:FA.GN_TRITON_MIN_BATCH] for a in small]
    tri = FA.build_fast(gm, "cpu", dtype=torch.float32, group_norm="triton")
    autos = [nd for nd in auto.gm.graph.nodes if nd.op == "call_function" and nd.target == FA.group_norm_auto]
    assert len(autos) == n_gn and sum("parts" in nd.kwargs for nd in autos) >= 1  # the concatenations' parts
    with torch.no_grad():
        ref = gm(*args)
        assert _rel(chan(*args), ref) < 1e-5  # aten's: test_build_fast_on_compiled_cond_unet (batch < 4: auto)
        assert torch.equal(auto(*small), aten_gn(*small)) and torch.equal(auto(*big), tri(*big))
    with pytest.raises(ValueError, match="group_norm"):
        FA.build_fast(gm, "cpu", group_norm="welford")


def test_group_norm_auto_small_batch_is_session12_graph(compiled_cond) -> None:
    """Below GN_TRITON_MIN_BATCH the default build is the graph session 12 measured (batch 1, 1.103x on the H200):
    build_fast's nodes are group_norm="aten"'s one for one (group_norm_auto where aten.group_norm stood, the same
    arguments), and group_norm_auto traces to the same aten ops as the captured op (the deprecated cudnn_enabled
    flag aside), so Dynamo and Inductor see one graph (docs/triton.md session 14, continuation: also compared
    through Inductor's IR on the CPU)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = compiled_cond.graph_module
    auto = FA.build_fast(gm, "cpu")
    aten_gn = FA.build_fast(gm, "cpu", group_norm="aten")

    def key(nd):
        tgt = torch.ops.aten.group_norm.default if nd.target is FA.group_norm_auto else nd.target
        return nd.op, str(tgt), len(nd.args)

    a, b = list(auto.gm.graph.nodes), list(aten_gn.gm.graph.nodes)
    assert [key(n) for n in a] == [key(n) for n in b]
    assert sum(n.target is FA.group_norm_auto for n in a) == auto.report.group_norms >= 4
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last).bfloat16()
    w, bias = torch.randn(16).bfloat16(), torch.randn(16).bfloat16()
    p0, p1 = x[:, :8].clone(), x[:, 8:].clone()  # a concatenation's parts: unused below GN_TRITON_MIN_BATCH

    def ops(fn):
        g = make_fx(fn)(x, w, bias, p0, p1)
        return [str(n.target) for n in g.graph.nodes if n.op == "call_function"]

    got = ops(lambda x, w, b, p0, p1: FA.group_norm_auto(x, 8, w, b, 1e-5, True, parts=[p0, p1]))
    assert got == ops(lambda x, w, b, p0, p1: torch.ops.aten.group_norm.default(x, 8, w, b, 1e-5, False))
    assert any("native_group_norm" in op for op in got)


def test_build_fast_group_norm_triton(compiled_cond) -> None:
    """build_fast(group_norm="triton") replaces every 4-d GroupNorm by group_norm_triton (statistics from
    msfp_fast::gn_stats; its CPU reference here, the Triton kernels in test_fast_kernels), passes the parts of
    concatenated inputs (the up blocks' skip connections) and keeps the float32 output at the reference graph's."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    gns = [nd for nd in gm.graph.nodes if nd.op == "call_function" and nd.target == torch.ops.aten.group_norm.default]
    fast = FA.build_fast(gm, "cpu", dtype=torch.float32, group_norm="triton")
    new = [nd for nd in fast.gm.graph.nodes if nd.op == "call_function" and nd.target == FA.group_norm_triton]
    assert fast.report.group_norms == len(new) == len(gns) >= 4
    cats = sum(1 for nd in gns if FA.concat_parts(nd.args[0]) is not None)
    assert sum(1 for nd in new if "parts" in nd.kwargs) == cats >= 1
    with torch.no_grad():
        assert _rel(fast(*args), gm(*args)) < 1e-5


def test_build_fast_split_concat(compiled_cond) -> None:
    """build_fast(split_concat=True): the 1x1 convs the default build keeps for a concatenation quantized per part
    become one FastGemm per part (each part's activation scale, its K range of the weight), summed; their part
    quantizers leave the graph; the float32 output stays at the reference graph's."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    base = FA.build_fast(gm, "cpu", dtype=torch.float32)
    fast = FA.build_fast(gm, "cpu", dtype=torch.float32, split_concat=True)
    kept = [why for why in base.report.skipped.values() if "per part" in why]
    still = [why for why in fast.report.skipped.values() if "per part" in why]
    n = fast.report.split_concat
    assert 1 <= n == len(kept) - len(still), str(fast.report)
    assert fast.report.fused["conv2d"] == base.report.fused["conv2d"] + n
    assert fast.report.fake_quant < base.report.fake_quant
    parts = [m for name, m in fast.gm.named_children() if "_part" in name]
    assert len(parts) >= 2 * n and all(isinstance(m, FA.FastGemm) for m in parts)
    assert len({m.a_scale for m in parts}) > 1  # the parts' own scales
    assert "one GEMM per part" in str(fast.report)
    with torch.no_grad():
        assert _rel(fast(*args), gm(*args)) < 1e-5


def _strided_nodes(fn, *args: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """fn compiled by Inductor (CPU): its scheduler nodes that load or store strided along their innermost loop
    (tools/layout_audit.py) and its output."""
    import sys
    from pathlib import Path

    import torch._inductor.config as icfg

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import layout_audit

    torch._dynamo.reset()
    with icfg.patch(force_disable_caches=True), layout_audit.recording() as (pre, _):
        out = torch.compile(fn, dynamic=False)(*args)
    return [r for r in pre if layout_audit.strided(r)], out


def test_cat_nhwc_keeps_concatenations_channels_last() -> None:
    """cat_nhwc: torch.cat's values in NHWC memory. Through Inductor, a channel concatenation of NHWC activations
    (an up block's skip connection: producers with a second reader, a quantizer writing NHWC rows) is laid out NCHW
    as aten.cat (ConcatKernel): the producers read transposed to store into it and its reader stores transposed;
    with cat_nhwc no node steps by more than one element along its innermost loop, and the outputs are equal
    (docs/triton.md, session 15 CPU: layout copies)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, c, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last).bfloat16()
            for c in (16, 32))
    assert torch.equal(FA.cat_nhwc([a, b]), torch.cat([a, b], 1))
    assert FA.cat_nhwc([a, b]).is_contiguous(memory_format=torch.channels_last)

    def block(cat):
        def fn(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pa, pb = a * 2 + 1, torch.sigmoid(b)  # producers with a second reader, as a skip connection's
            q = (cat([pa, pb]).float() * 3).round().to(torch.bfloat16)
            return q.permute(0, 2, 3, 1).contiguous(), pa * pb[:, :16]  # NHWC rows, as a GEMM's operand
        return fn

    slow, out_a = _strided_nodes(block(lambda p: torch.cat(p, 1)), a, b)
    fast, out_b = _strided_nodes(block(FA.cat_nhwc), a, b)
    assert len(slow) >= 3 and not fast
    assert all(torch.equal(u, v) for u, v in zip(out_a, out_b))


def test_build_fast_cat_nhwc(compiled_cond) -> None:
    """build_fast(cat_nhwc=True), the default, replaces every 4-d channel concatenation (the up blocks' skip
    connections and the concatenations of their per-part quantized copies) by cat_nhwc, the GroupNorms keep their
    parts, and the output is the aten.cat build's (cat_nhwc=False) bit for bit (eagerly: a layout change only;
    through Inductor on the whole tiny UNet also, tools/layout_audit.py, not a test: ~6 min)."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    for kw in ({}, {"split_concat": True}):
        base = FA.build_fast(gm, "cpu", cat_nhwc=False, **kw)
        fast = FA.build_fast(gm, "cpu", **kw)
        cats = [n for n in base.gm.graph.nodes if n.op == "call_function" and FA.concat_parts(n) is not None]
        assert fast.report.cat_nhwc == len(cats) >= 1 and base.report.cat_nhwc == 0
        assert not any(n.target == torch.ops.aten.cat.default and FA.concat_parts(n) for n in fast.gm.graph.nodes)
        parts = [n for n in fast.gm.graph.nodes if n.op == "call_function" and "parts" in n.kwargs]
        assert parts and all(p.kwargs["parts"] == list(p.args[0].args[0]) for p in parts)
        assert "channel concatenations in NHWC memory" in str(fast.report)
        for batch in (args[0].shape[0], 8):  # aten's GroupNorm below GN_TRITON_MIN_BATCH, gn_stats from it on
            x = [torch.cat([a] * 8)[:batch] for a in args]
            with torch.no_grad():
                assert torch.equal(fast(*x), base(*x))


def test_gelu_fast_is_the_tanh_form() -> None:
    """gelu_fast is GELU's tanh form (float32 rounding apart), within ~5e-4 of exact GELU, in its input's dtype."""
    x = torch.linspace(-12, 12, 20001)
    assert torch.allclose(FA.gelu_fast(x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    err = (FA.gelu_fast(x) - F.gelu(x)).abs().max().item()
    assert 1e-4 < err < 6e-4  # an approximation, and a close one
    assert FA.gelu_fast(x.bfloat16()).dtype == torch.bfloat16


def test_build_fast_gelu_tanh(compiled_cond) -> None:
    """gelu="tanh" replaces every exact aten.gelu of the tiny cond UNet (its GEGLUs) by gelu_fast, and its bf16
    output stays as close to the float32 reference graph as the exact bf16 build's (4-bit codes flip under any
    perturbation in this random-weight model: the bf16 build itself is ~25% off); the default on the CPU keeps
    the captured op; an unknown mode is a ValueError."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    n_gelu = sum(n.target == torch.ops.aten.gelu.default for n in gm.graph.nodes)
    exact = FA.build_fast(gm, "cpu")
    fast = FA.build_fast(gm, "cpu", gelu="tanh")
    assert exact.report.gelu_tanh == 0 and fast.report.gelu_tanh == n_gelu >= 1
    targets = [n.target for n in fast.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(FA.gelu_fast) == n_gelu and torch.ops.aten.gelu.default not in targets
    assert FA.gelu_fast not in [n.target for n in exact.gm.graph.nodes]
    assert "GELUs in tanh form" in str(fast.report)
    with torch.no_grad():
        ref = gm(*args)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float()
        a, b = exact(*args).float(), fast(*args).float()
    assert torch.isfinite(b).all()
    assert _rel(b, ref) <= 1.2 * _rel(a, ref), (_rel(b, ref), _rel(a, ref))
    with pytest.raises(ValueError, match="gelu"):
        FA.build_fast(gm, "cpu", gelu="approx")


def test_build_fast_gn_affine(compiled_cond) -> None:
    """gn_affine (the default with group_norm "auto" / "triton") marks every group_norm_auto node (the up blocks' concatenations included) to take its scale
    and shift from msfp_fast::gn_scale_shift; from GN_TRITON_MIN_BATCH samples on (where group_norm_auto is
    group_norm_triton) the output is the default build's bit for bit on the CPU (the op's reference is the same
    float32 operations; the GPU kernel's own test bounds its rounding); below it the graph is the same function;
    with a GroupNorm mode it cannot change it is a ValueError."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    base = FA.build_fast(gm, "cpu", dtype=torch.float32, gn_affine=False)
    aff = FA.build_fast(gm, "cpu", dtype=torch.float32)  # the default with group_norm "auto"
    gns = [n for n in aff.gm.graph.nodes if n.op == "call_function" and n.target is FA.group_norm_auto]
    assert aff.report.gn_affine == len(gns) == base.report.group_norms >= 3
    assert all(n.kwargs["affine"] for n in gns) and any("parts" in n.kwargs for n in gns)
    assert "GroupNorms marked for the combined scale and shift" in str(aff.report) and base.report.gn_affine == 0
    for batch in (args[0].shape[0], FA.GN_TRITON_MIN_BATCH * 2):
        x = [torch.cat([a] * 8)[:batch] for a in args]
        with torch.no_grad():
            assert torch.equal(aff(*x), base(*x)), batch  # on the CPU both take gn_stats' reference, same ops
    with pytest.raises(ValueError, match="gn_affine"):
        FA.build_fast(gm, "cpu", gn_affine=True, group_norm="channels")
    assert FA.build_fast(gm, "cpu", group_norm="channels").report.gn_affine == 0  # the default follows the mode


def test_fp8_grid_formats() -> None:
    """The M = 2 / 3 formats map onto E5M2 / E4M3 (their smallest normal binade onto the FP8's), others do not."""
    assert FA.fp8_grid("ue2m2") == (torch.float8_e5m2, 2.0 ** -14)
    assert FA.fp8_grid("e1m2") == (torch.float8_e5m2, 2.0 ** -15)
    assert FA.fp8_grid("ue1m3") == (torch.float8_e4m3fn, 2.0 ** -7)
    assert all(FA.fp8_grid(f) is None for f in ("e2m1", "ue3m1", "e3m0", "ue4m0", "int4", "uint8"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_grid_fast_rounding_exact(fmt: str) -> None:
    """With a power-of-two scale (so the multiplication is exact) grid_fast is grid_round bit for bit, up to the
    sign of zero for unsigned formats: levels, midpoints and their neighbours, saturation, denormals; eager and
    compiled (C++ on the CPU; Triton's FP8 conversion instructions on the GPU)."""
    v = _inputs(fmt)
    for scale in (1.0, 0.25):
        ref = FA.grid_round(v / scale, fmt)
        mult = FA.quant_multiplier(scale, fmt)
        got = FA.grid_fast(v, 0.0, mult, fmt)
        assert torch.equal(got, ref), f"{fmt}: {(got != ref).sum()} of {v.numel()} differ"
        cf = torch.compile(lambda t: FA.grid_fast(t * 1.0, 0.0, mult.to(DEV), fmt),
                           dynamic=False)
        got_c = cf(v.to(DEV)).cpu()
        assert torch.equal(got_c, ref), f"{fmt} compiled: {(got_c != ref).sum()} of {v.numel()} differ"


@pytest.mark.parametrize("fmt", ["ue2m2", "e2m1", "e1m2", "ue1m3", "int8"])
def test_fake_quant_mult_close(fmt: str) -> None:
    """fake_quant with the multiplier (grid_fast) against the reference op at a scale that is no power of two:
    a code moves only where the scaled value lies within a few float32 ulps of a rounding boundary, by one step."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=gen) * 3
    s, z = torch.tensor(0.3713), torch.tensor(-0.2785)
    ref = torch.ops.msfp.quantize(x, s, z, fmt)
    got = FA.fake_quant(x, s, z, fmt, out_dtype=torch.float32, mult=FA.quant_multiplier(s, fmt))
    diff = got != ref
    assert diff.float().mean() < 1e-4, diff.sum()
    if diff.any():
        v = ((x[diff] - z) / s).double()
        f = get_format(fmt)
        mids = ((f.levels[1:] + f.levels[:-1]) / 2).double()
        dist = (v.abs()[:, None] - mids.abs()[None, :]).abs().min(1).values if f.signed else \
            (v[:, None] - mids[None, :]).abs().min(1).values
        assert (dist <= 4 * v.abs() * 2.0 ** -23).all(), dist.max()


def test_build_fast_quant_math(compiled_cond) -> None:
    """quant_math="fast" puts every FP8 GEMM and every bf16 fake quantizer of the tiny cond UNet on grid_fast
    (the multiplier as a float32 buffer); in float32 its output is within the default build's distance of the
    reference graph (codes near a boundary may move: 4-bit flips propagate in this random-weight model); an
    unknown mode is a ValueError."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    exact = FA.build_fast(gm, "cpu", dtype=torch.float32)  # the default off CUDA
    fast = FA.build_fast(gm, "cpu", dtype=torch.float32, quant_math="fast")
    gemms = [m for m in fast.modules() if isinstance(m, FA.FastGemm)]
    fqs = [n for n in fast.gm.graph.nodes if n.op == "call_function" and n.target is FA.fake_quant]
    assert gemms and all(m.fast_quant for m in gemms) and not any(m.fast_quant for m in exact.modules()
                                                                  if isinstance(m, FA.FastGemm))
    assert fqs and all("mult" in n.kwargs for n in fqs)
    assert fast.report.fast_quant == len(gemms) + len(fqs) and "grid_fast" in str(fast.report)
    mult = getattr(fast.gm, fqs[0].kwargs["mult"].target)
    assert mult.dtype == torch.float32
    s0 = fqs[0].args[1]
    scale = getattr(fast.gm, s0.target) if isinstance(s0, torch.fx.Node) else torch.tensor(float(s0))
    p = FA.fp8_grid(fqs[0].args[3])[1] if FA.fp8_grid(fqs[0].args[3]) else 1.0
    assert torch.equal(mult, (p / scale.double()).float())
    with torch.no_grad():
        ref = gm(*args)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float()
        a, b = exact(*args).float(), fast(*args).float()
    assert torch.isfinite(b).all()
    assert _rel(b, ref) <= max(1.5 * _rel(a, ref), 0.05), (_rel(b, ref), _rel(a, ref))
    with pytest.raises(ValueError, match="quant_math"):
        FA.build_fast(gm, "cpu", quant_math="approx")


def test_build_fast_silu_sigmoid(compiled_cond) -> None:
    """silu="sigmoid" replaces the SiLUs of the GroupNorms (not others) by silu_gn: below GN_TRITON_MIN_BATCH
    samples it is F.silu (the same output as the default build), from it on x * sigmoid(x), the same function;
    an unknown mode is a ValueError."""
    gm = compiled_cond.graph_module
    args = compiled_cond.calibration.batches[0].args
    base = FA.build_fast(gm, "cpu", dtype=torch.float32)
    sig = FA.build_fast(gm, "cpu", dtype=torch.float32, silu="sigmoid")
    nodes = [n for n in sig.gm.graph.nodes if n.op == "call_function" and n.target is FA.silu_gn]
    assert sig.report.silu_gn == len(nodes) >= 2 and "x * sigmoid(x)" in str(sig.report)
    assert all(n.args[0].target in (FA.group_norm_auto, FA.group_norm_triton) for n in nodes)
    assert args[0].shape[0] < FA.GN_TRITON_MIN_BATCH
    with torch.no_grad():
        assert torch.equal(sig(*args), base(*args))  # batch < GN_TRITON_MIN_BATCH: F.silu
        x = torch.randn(FA.GN_TRITON_MIN_BATCH, 4, 6, 6)
        assert torch.allclose(FA.silu_gn(x), F.silu(x), rtol=1e-6, atol=1e-6)
        big = [torch.cat([a] * FA.GN_TRITON_MIN_BATCH)[:FA.GN_TRITON_MIN_BATCH] for a in args]
        y_sig, y_base = sig(*big), base(*big)  # the sigmoid form, float32: the same function to the last bits
        assert torch.isfinite(y_sig).all() and _rel(y_sig, y_base) < 1e-4, _rel(y_sig, y_base)
    with pytest.raises(ValueError, match="silu"):
        FA.build_fast(gm, "cpu", silu="fast")


def test_fast_quantizers_per_channel_scale() -> None:
    """_fast_quantizers on a fake_quant node with a per-channel scale buffer (as per-channel activation quantizers
    are kept): the multiplier buffer has the scale's shape, p / s per channel in float32, and the node's output
    equals the exact quantizer wherever the scaled value is not within an ulp of a boundary (here: everywhere)."""
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.register_buffer("s", torch.tensor([0.5, 0.25, 0.125]).reshape(1, 3, 1))
    g = gm.graph
    x = g.placeholder("x")
    fq = g.call_function(FA.fake_quant, (x, g.get_attr("s"), 0.0, "ue2m2", False, torch.float32))
    g.output(fq)
    gm.recompile()
    inp = torch.rand(2, 3, 50) * 4
    ref = gm(inp)
    assert FA._fast_quantizers(gm) == 1
    gm.recompile()
    (node,) = [n for n in gm.graph.nodes if n.target is FA.fake_quant]
    mult = getattr(gm, node.kwargs["mult"].target)
    assert mult.shape == (1, 3, 1) and torch.equal(mult, (2.0 ** -14 / gm.s.double()).float())
    assert torch.equal(gm(inp), ref)  # power-of-two scales: the multiplication is exact
