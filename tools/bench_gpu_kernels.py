"""The fast path's GEMM building blocks on the SD1.5 UNet's own layer shapes (GPU), per layer kind and per step.

    python tools/bench_gpu_kernels.py --batch 8 --out results/gpu_sd15_kernels.json

The layer list comes from one bf16 forward of the SD1.5-config UNet (random weights) with hooks on every Linear and
Conv2d (input shape, weight shape, stride, padding). For each distinct GEMM shape it times (``triton.testing.
do_bench``, median, ms): the cuBLAS FP8 GEMM of the fast path (``torch._scaled_mm``, rowwise scales, bf16 out) with
E4M3 weights resident, the per-step decode of packed 4-bit weights to E4M3 (``w4_decode``), the im2col of a k x k
conv (``im2col``), the Triton W4A4 GEMM that decodes packed weights in registers (``kernels.w4a4_gemm``; implicit
GEMM for k x k convs, no im2col), and the bf16 layer (cuBLAS / cuDNN channels-last) for scale. Totals weight each
shape by its count per UNet step, so they read as "ms per step spent in GEMM-like work" for each choice.

Sections (``--sections``): ``layers`` (the above), ``decode`` (the grouped packed-weight decode of every SD1.5 layer,
64 MiB groups as ``fast.build_fast`` makes them, replayed from one CUDA graph per step, next to a device copy of the
decoded bytes), ``im2col`` (tile configurations of the
im2col kernel on the SD1.5 k x k convs, ms per step), ``conv`` (the implicit-GEMM FP8 conv, each tile, against
im2col + cuBLAS on the SD1.5 k x k convs, outputs checked equal), ``fp8attn`` (cuDNN's FP8 flash attention through
cudnn-frontend against the bf16 cuDNN SDPA on SD1.5's attention shapes: ``bench_fp8_attention``), ``gnstats``
(tiles of our GroupNorm statistics kernels on SD1.5's GroupNorm shapes, ``bench_gnstats``), ``flashfp8`` (our Triton
FP8 flash attention's tiles against the bf16 SDPA on SD1.5's self-attentions at 64x64 and 32x32, ``bench_flash_fp8``),
``epilogue`` (the pointwise kernel after an FP8 GEMM, variants against its bytes' floor, ``bench_epilogue``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_timing import graphed_ms, hold_gpu_lock, kernel_ms  # noqa: E402
from unet_configs import SD15_UNET_CONFIG  # noqa: E402

DEV = "cuda"


def layer_shapes(batch: int) -> Counter:
    """(kind, M-side input shape, weight shape, stride, padding) -> count per UNet step, from one bf16 forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(dict(SD15_UNET_CONFIG)).to("cuda", torch.bfloat16).eval()
    seen: Counter = Counter()

    def hook(mod, inp, _out):
        x = inp[0]
        if isinstance(mod, torch.nn.Linear):
            seen[("linear", (x.numel() // x.shape[-1], x.shape[-1]), tuple(mod.weight.shape), (1, 1), (0, 0))] += 1
        else:
            seen[("conv", tuple(x.shape), tuple(mod.weight.shape), tuple(mod.stride), tuple(mod.padding))] += 1

    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(hook)
    x = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(batch, 77, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        unet(x, torch.full((batch,), 500, device="cuda"), encoder_hidden_states=c)
    del unet
    torch.cuda.empty_cache()
    return seen


def bench_shape(kind: str, xs: tuple, ws: tuple, stride: tuple, pad: tuple) -> dict:
    """Times of each way to run one layer of this shape (ms)."""
    from functools import partial


    from msfp_compiler.export.triton import kernels as K
    from msfp_compiler.export.triton.fast_ops import pack_halves
    from msfp_compiler.export.triton.im2col import im2col_triton
    from msfp_compiler.export.triton.w4_decode import decode_w4_triton

    do_bench = partial(kernel_ms, warmup=10, rep=40)
    dev = DEV
    n = ws[0]
    k = ws[1] * (ws[2] * ws[3] if kind == "conv" else 1)
    codes = torch.randint(0, 15, (1, n, k), device=dev, dtype=torch.uint8)
    packed, lut = pack_halves(codes), torch.arange(16, device=dev, dtype=torch.uint8) + 40
    w8 = decode_w4_triton(packed, lut)
    r: dict = {}
    if kind == "conv":
        b, c, h, w = xs
        x8 = (torch.randn(b, h, w, c, device=dev) * 2).to(torch.float8_e4m3fn)
        kern, strd, pads = [ws[2], ws[3]], list(stride), [pad[1], pad[1], pad[0], pad[0]]
        a = im2col_triton(x8, kern, strd, pads) if ws[2] * ws[3] > 1 or strd != [1, 1] else x8.reshape(-1, c)
        if ws[2] * ws[3] > 1:
            r["im2col_ms"] = do_bench(lambda: im2col_triton(x8, kern, strd, pads))
    else:
        a = (torch.randn(*xs, device=dev) * 2).to(torch.float8_e4m3fn)
    m = a.shape[0]
    sa, sb = torch.ones(m, 1, device=dev), torch.rand(1, n, device=dev)
    r["M"], r["N"], r["K"] = m, n, k
    r["cublas_fp8_ms"] = do_bench(lambda: torch._scaled_mm(a, w8.t(), sa, sb, out_dtype=torch.bfloat16,
                                                           use_fast_accum=True))
    r["decode_ms"] = do_bench(lambda: decode_w4_triton(packed, lut))
    wp = K.pack_weight(codes, torch.rand(n, device=dev) + 0.5, "e2m1")
    try:
        if kind == "conv" and ws[2] * ws[3] > 1:
            g = K.ConvGeom(xs[2], xs[3], xs[1], ws[2], ws[3], stride[0], stride[1], pad[0], pad[1],
                           (xs[2] + 2 * pad[0] - ws[2]) // stride[0] + 1, (xs[3] + 2 * pad[1] - ws[3]) // stride[1] + 1)
            xn = x8.permute(0, 3, 1, 2)
            r["triton_w4_ms"] = do_bench(lambda: K.w4a4_gemm(xn, wp, out_dtype=torch.bfloat16, conv=g))
        else:
            r["triton_w4_ms"] = do_bench(lambda: K.w4a4_gemm(a, wp, out_dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001
        r["triton_w4_error"] = repr(e)[:300]
    wb = torch.randn(ws, device=dev, dtype=torch.bfloat16)
    if kind == "conv":
        xb = torch.randn(xs, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wb = wb.contiguous(memory_format=torch.channels_last)
        r["bf16_ms"] = do_bench(lambda: F.conv2d(xb, wb, None, stride, pad))
    else:
        xb = torch.randn(xs, device=dev, dtype=torch.bfloat16)
        r["bf16_ms"] = do_bench(lambda: F.linear(xb, wb))
    return {kk: round(v, 5) if isinstance(v, float) else v for kk, v in r.items()}


def _decode_layers(shapes: Counter) -> list[SimpleNamespace]:
    """Random packed codes for every fused SD1.5 layer (what DecodeGroup reads of a FastGemm), formats in turn."""
    from msfp_compiler.export.triton.fast_ops import e4m3_lut, pack_halves

    fmts = ["e2m1", "e1m2", "e3m0", "int4"]
    layers = []
    gen = torch.Generator(device=DEV).manual_seed(0)
    for (kind, _xs, ws, _stride, _pad), count in sorted(shapes.items(), key=lambda kv: str(kv[0])):
        n, k = ws[0], ws[1] * (ws[2] * ws[3] if kind == "conv" else 1)
        if k % 8 or n % 16:
            continue
        for _ in range(count):
            codes = torch.randint(0, 16, (1, n, k), device=DEV, dtype=torch.uint8, generator=gen)
            fmt = fmts[len(layers) % len(fmts)]
            layers.append(SimpleNamespace(k=k, n=n, lut_rows=[n], packed=pack_halves(codes),
                                          lut=e4m3_lut(fmt).to(DEV)))
    return layers


def bench_decode(shapes: Counter) -> dict:
    """The grouped decode of every layer per step (64 MiB groups, as build_fast makes them), replayed from one CUDA
    graph, for two block sizes, next to a device copy of the decoded bytes."""
    from msfp_compiler.export.triton.fast import DECODE_GROUP_BYTES, DecodeGroup
    from msfp_compiler.export.triton.w4_decode import decode_w4_group_triton
    from gpu_timing import graphed_ms

    res: dict = {"variants": {}}
    base = _decode_layers(shapes)
    packed_bytes = sum(m.packed.numel() for m in base)
    res["layers"], res["packed_bytes"] = len(base), packed_bytes
    for block in (4096, 16384):
        layers = [SimpleNamespace(**vars(m)) for m in base]
        groups, size = [[]], 0
        for m in layers:
            if size + m.n * m.k > DECODE_GROUP_BYTES and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(m)
            size += m.n * m.k
        dg = [DecodeGroup(g, block=block).to(DEV) for g in groups]
        ms = graphed_ms(lambda: [decode_w4_group_triton(g.packed, g.luts, g.row_lut, g.block_layer, g.meta)
                                 for g in dg])
        res["variants"][f"block{block}"] = {"ms_per_step": round(ms, 4), "groups": len(dg),
                                            "tb_s": round(3 * packed_bytes / ms / 1e9, 3)}
        print(block, json.dumps(res["variants"][f"block{block}"]), flush=True)
        del dg
        torch.cuda.empty_cache()
    src = torch.empty(2 * packed_bytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = graphed_ms(lambda: dst.copy_(src))
    res["copy_decoded_bytes"] = {"ms": round(ms, 4), "tb_s": round(4 * packed_bytes / ms / 1e9, 3)}
    print("copy", json.dumps(res["copy_decoded_bytes"]), flush=True)
    return res


def bench_im2col(shapes: Counter) -> dict:
    """im2col tile configurations (BM rows x BC channels, warps) on the SD1.5 k x k convs, ms per step."""
    from functools import partial

    from msfp_compiler.export.triton.im2col import im2col_triton

    do_bench = partial(kernel_ms, warmup=10, rep=30)
    configs = [(32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 64, 8), (16, 256, 4), (128, 128, 8), (32, 256, 8)]
    totals: Counter = Counter()
    rows = []
    for (kind, xs, ws, stride, pad), count in sorted(shapes.items(), key=lambda kv: str(kv[0])):
        if kind != "conv" or ws[2] * ws[3] == 1 or ws[0] % 16 or ws[1] < 16:
            continue
        b, c, h, w = xs
        x8 = (torch.randn(b, h, w, c, device=DEV) * 2).to(torch.float8_e4m3fn)
        kern, strd, pads = [ws[2], ws[3]], list(stride), [pad[1], pad[1], pad[0], pad[0]]
        ref = im2col_triton(x8, kern, strd, pads)
        row = {"x": xs, "w": ws, "stride": stride, "count": count}
        for bm, bc, nw in configs:
            got = im2col_triton(x8, kern, strd, pads, bm=bm, bc=bc, num_warps=nw)
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
            ms = do_bench(lambda: im2col_triton(x8, kern, strd, pads, bm=bm, bc=bc, num_warps=nw))
            row[f"{bm}x{bc}w{nw}"] = round(ms, 5)
            totals[f"{bm}x{bc}w{nw}"] += count * ms
        row["out_bytes"] = ref.numel()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"per_step_ms": {k: round(v, 4) for k, v in totals.items()}, "rows": rows}


GN_TILES = ((64, 64, 1), (16, 64, 1), (32, 64, 1), (64, 64, 2), (32, 32, 1), (32, 128, 1), (64, 32, 1), (128, 64, 2),
            (64, 128, 2))
# (positions, channels, warps) of gn_stats' partial kernel, then _gn_combine_kernel at 4 warps; first: the default
# (BLOCK_P, BLOCK_C, GN_WARPS)
# session 16's sweeps (64x64w4 the default before): results/gpu_sd15_kernels_session16_b8.json (16x64w1 best of
# those tiles), results/gpu_sd15_kernels_session16_call2_b8.json (32x64w1 0.480 ms a step),
# results/gpu_sd15_kernels_session16_call4_b8.json (64x64w1 0.445)


def bench_gnstats(batch: int) -> dict:
    """Tiles of the GroupNorm statistics kernels (``gn_stats``: BLOCK_P positions x BLOCK_C channels, warps) on the
    SD1.5 GroupNorm shapes (``pointwise_roofline.GROUP_NORMS``, each as one NHWC bf16 tensor; the 12 concatenated
    inputs are read part by part in the UNet), partials + combine replayed from a CUDA graph (device time: what the
    captured step pays), ms per call and per step, with the read bandwidth; each tile's statistics are checked against
    the default tile's (float32 summation order: mean by 2e-5 of |mean| + std, 1/std by 1e-4 relative). Session 14
    measured 4-8 chunks per program slower than 64 x 64 tiles on every shape; session 16 one warp per program
    faster: this times the tiles around the default 64 x 64 / 1 warp."""
    from pointwise_roofline import GROUP_NORMS

    from msfp_compiler.export.triton.gn_stats import gn_stats_triton

    totals: Counter = Counter()
    rows = []
    for (side, c), count in sorted(Counter(GROUP_NORMS).items()):
        x = torch.randn(batch, c, side, side, device=DEV, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last) * 2 + 1
        ref = gn_stats_triton([x], 32, 1e-5)
        row: dict = {"x": [batch, c, side, side], "count": count, "mb": round(x.numel() * 2 / 1e6, 2)}
        for bp, bc, nw in GN_TILES:
            name = f"{bp}x{bc}w{nw}"
            got = gn_stats_triton([x], 32, 1e-5, block_p=bp, block_c=bc, num_warps=nw)
            ok = bool(((got[0] - ref[0]).abs() <= 2e-5 * (ref[0].abs() + 1 / ref[1])).all()
                      and ((got[1] - ref[1]).abs() <= 1e-4 * ref[1]).all())
            if not ok:
                row[name] = "mismatch"
                continue
            ms = graphed_ms(lambda: gn_stats_triton([x], 32, 1e-5, block_p=bp, block_c=bc, num_warps=nw))  # noqa: B023
            row[name] = round(ms, 5)
            row[f"{name}_gbs"] = round(x.numel() * 2 / ms / 1e6, 1)
            totals[name] += count * ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"per_step_ms": {k: round(v, 4) for k, v in totals.items()}, "timing": "graphed_ms (do_bench_cudagraph)",
            "rows": rows}


def bench_conv(shapes: Counter, gpu_lock: str | None = None) -> dict:
    """The implicit-GEMM FP8 conv (``conv_fp8``, every tile of ``CONFIGS``) against im2col + cuBLAS on the SD1.5
    k x k convs, ms per call and per step: ``*_ms`` do_bench (L2 flushed, launch included), ``*_graphed_ms``
    replayed from a CUDA graph (device time: what the captured UNet step pays). First every tile runs once per shape (compiles)
    and its output is compared with the im2col + cuBLAS output (operands in {-1, 0, 1}: the float32 sums are
    exact; ``<tile>_exact`` records whether they are bit for bit, a max relative difference above 1e-2 counts as a
    mismatch and is not timed); then, holding ``gpu_lock`` (an flock shared with bench_gpu_sd15 --gpu-lock, so
    that timings never share the GPU), the timings."""
    from functools import partial

    from msfp_compiler.export.triton import conv_fp8 as CV

    do_bench = partial(kernel_ms, warmup=10, rep=30)
    cases = []
    for (kind, xs, ws, stride, pad), count in sorted(shapes.items(), key=lambda kv: str(kv[0])):
        if kind != "conv" or ws[2] * ws[3] == 1 or ws[0] % 16 or ws[1] % 16:
            continue
        b, c, h, w = xs
        gen = torch.Generator(device=DEV).manual_seed(0)
        x8 = torch.randint(-1, 2, (b, h, w, c), device=DEV, generator=gen).float().to(torch.float8_e4m3fn)
        w8 = torch.randint(-1, 2, (ws[0], ws[2] * ws[3] * c), device=DEV, generator=gen).float().to(
            torch.float8_e4m3fn)
        kern, strd, pads = [ws[2], ws[3]], list(stride), [pad[1], pad[1], pad[0], pad[0]]
        ref = CV.conv_e4m3_triton(x8, w8, kern, strd, pads, config=CV.IM2COL)
        row: dict = {"x": xs, "w": ws, "stride": stride, "count": count, "M": ref.shape[0], "N": ws[0],
                     "K": w8.shape[1]}
        ok = []
        for cfg in CV.CONFIGS:
            try:
                got = CV.conv_e4m3_triton(x8, w8, kern, strd, pads, config=cfg)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1)).item()
                row[f"{cfg.name}_exact"] = torch.equal(got, ref)
                if err > 1e-2:  # Hopper's FP8 accumulation may round long sums; a wrong tap would be O(1)
                    row[cfg.name] = f"MISMATCH: max rel diff {err:.3g}"
                else:
                    ok.append(cfg)
            except Exception as e:  # noqa: BLE001
                row[cfg.name] = repr(e)[:300]
        cases.append((row, x8, w8, kern, strd, pads, ok))
    if gpu_lock:
        hold_gpu_lock(gpu_lock)
    totals: Counter = Counter()
    rows = []
    for row, x8, w8, kern, strd, pads, ok in cases:
        count = row["count"]
        for name, cfg in ((CV.IM2COL, CV.IM2COL), *((c.name, c) for c in ok)):
            def fn(cfg=cfg):
                return CV.conv_e4m3_triton(x8, w8, kern, strd, pads, config=cfg)

            row[f"{name}_ms"] = round(do_bench(fn), 5)  # launch included
            row[f"{name}_graphed_ms"] = round(graphed_ms(fn), 5)  # device time in a CUDA graph (the UNet's case)
        for suffix in ("_ms", "_graphed_ms"):
            base = row[f"{CV.IM2COL}{suffix}"]
            totals[f"im2col_cublas{suffix}"] += count * base
            if ok:
                best = min((c.name for c in ok), key=lambda k: row[f"{k}{suffix}"])
                row[f"best_tile{suffix}"] = [best, row[f"{best}{suffix}"]]
                totals[f"implicit_best_tile{suffix}"] += count * row[f"{best}{suffix}"]
                base = min(base, row[f"{best}{suffix}"])
            totals[f"best_of_both{suffix}"] += count * base
        if ok:
            t = row["best_tile_graphed_ms"][1]
            row["best_tile_graphed_tflops"] = round(2 * row["M"] * row["N"] * row["K"] / t / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"per_step_ms": {k: round(v, 4) for k, v in totals.items()}, "rows": rows}



# SD1.5's attention per UNet step: (level, query tokens at batch 1 latents 64x64, heads, head dim, transformer blocks)
ATTN_LEVELS = (("64x64", 4096, 8, 40, 5), ("32x32", 1024, 8, 80, 5), ("16x16", 256, 8, 160, 5), ("8x8", 64, 8, 160, 1))
TEXT_TOKENS = 77
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # a 4-bit grid: its values are exact in E4M3, as the graph's are


def grid_values(shape: tuple, gen: torch.Generator, device: str) -> torch.Tensor:
    """Random signed E2M1 grid values (float32): what a 4-bit Q/K/V quantizer outputs, divided by its scale."""
    lv = torch.tensor(E2M1)
    idx = torch.randint(0, len(E2M1), shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (lv[idx] * sign).to(device)


def level_flips(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of elements a per-tensor E2M1 quantizer (scale amax(ref) / 6, nearest level) puts on another level
    for got than for ref: what an FP8 attention output changes for the 4-bit out-projection that reads it."""
    s = ref.abs().amax().clamp_min(1e-30) / 6
    mids = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])], device=ref.device)

    def q(x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize((x / s).abs(), mids) * x.sign()

    return float((q(got) != q(ref)).float().mean())


def fp8_sdpa_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale: tuple, scale_s: float,
                   scale_o: float, attn_scale: float, out_bf16: bool) -> tuple[Callable[[], Any], torch.Tensor]:
    """cuDNN's FP8 flash attention, the library's graph (``attention_fp8.build_sdpa_fp8``, what
    ``msfp_fast::sdpa_fp8`` runs): q/k/v E4M3 [B, H, S, D] views of BSHD storage, per-tensor descales (the
    quantizers' scales), P scaled by scale_s into E4M3, O scaled by scale_o (E4M3 on Hopper; bf16 where out_bf16 and
    the backend supports it). Returns (run, O)."""
    from msfp_compiler.export.triton.attention_fp8 import build_sdpa_fp8

    B, H, S, _ = q.shape
    out = torch.empty(B, S, H, v.shape[-1], device=q.device, dtype=torch.bfloat16 if out_bf16 else torch.float8_e4m3fn)
    out = out.permute(0, 2, 1, 3)
    graph = build_sdpa_fp8(q, k, v, out, tuple(descale), scale_o, attn_scale, p_scale=scale_s)
    return (lambda: graph(q, k, v, out)), out


def _time(fn: Callable[[], Any]) -> tuple[float, str]:
    """CUDA-graph replay time where fn captures, else launched (do_bench): (ms, how)."""
    try:
        return round(graphed_ms(fn), 4), "graph"
    except Exception:  # noqa: BLE001  (a cuDNN frontend call that refuses capture)
        return round(kernel_ms(fn), 4), "launched"


def bench_fp8_attention(batch: int, levels: tuple = ATTN_LEVELS, device: str = DEV, pads: tuple = (16,)) -> dict:
    """cuDNN FP8 attention (cudnn-frontend) against the fast path's bf16 cuDNN SDPA on SD1.5's attention shapes,
    self (S x S) and cross (S x 77), Q/K/V as views of merged projection outputs as in the graph. Q/K/V are 4-bit
    grid values: exact in E4M3 with the quantizer's scale as descale, so FP8 rounds only P (to E4M3, scale 448) and O
    (E4M3 on Hopper, scale 1 / (6 s_v)). Head dims padded to a multiple of 16 as well (TMA needs 16-byte rows: 40
    E4M3 bytes are not) and of each of ``pads``; padding columns are zero, attn_scale stays 1 / sqrt(d). Per row: ms of each, O's error
    against the bf16 SDPA (rel-RMSE, max / max|ref|, E2M1 level flips of a 4-bit quantizer of O), and the bf16 SDPA's
    own error against float32 for scale; the per-step totals weight each level by its blocks."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    sq = sk = 0.6  # logits of std ~3 at d = 40 with E2M1 values
    sv = 0.1
    res: dict = {"batch": batch, "rows": [], "versions": {"torch": torch.__version__,
                                                           "cudnn_backend": torch.backends.cudnn.version()}}
    try:
        import cudnn

        res["versions"]["cudnn_frontend"] = cudnn.__version__
    except Exception as e:  # noqa: BLE001
        res["error"] = f"cudnn frontend: {e!r}"[:500]
        return res
    try:
        res["versions"]["cudnn_frontend_backend"] = cudnn.backend_version()
    except Exception as e:  # noqa: BLE001  (no libcudnn found: the FP8 rows say so too)
        res["versions"]["cudnn_frontend_backend"] = repr(e)[:200]
    totals: Counter = Counter()
    for level, tokens, heads, d, blocks in levels:
        for kind in ("self", "cross"):
            S, L = tokens, tokens if kind == "self" else TEXT_TOKENS
            row: dict = {"level": level, "kind": kind, "B": batch, "H": heads, "S": S, "L": L, "d": d,
                         "blocks": blocks}
            gq = grid_values((batch, S, heads, d), gen, device)
            gk = grid_values((batch, L, heads, d), gen, device)
            gv = grid_values((batch, L, heads, d), gen, device)
            # bf16 as the fast path runs it: Q/K/V quantized to bf16 grid values, parts of merged GEMM outputs
            qkv = torch.stack([gq * sq, gk * sk, gv * sv], 2) if kind == "self" else None
            if kind == "self":
                q16, k16, v16 = (qkv[:, :, i].bfloat16() for i in range(3))
                m = torch.stack([q16, k16, v16], 2)  # [B, S, 3, H, d] as one GEMM output
                q16, k16, v16 = (m[:, :, i].transpose(1, 2) for i in range(3))
            else:
                q16 = (gq * sq).bfloat16().transpose(1, 2)
                m = torch.stack([(gk * sk).bfloat16(), (gv * sv).bfloat16()], 2)
                k16, v16 = (m[:, :, i].transpose(1, 2) for i in range(2))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION if device == "cuda" else SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q16, k16, v16)
                row["bf16_cudnn_ms"], row["bf16_timing"] = _time(lambda: F.scaled_dot_product_attention(q16, k16, v16))
            r0 = ref[:1].float()
            f32 = F.scaled_dot_product_attention(q16[:1].float(), k16[:1].float(), v16[:1].float())
            row["bf16_vs_f32"] = {"rel_rmse": round(float((r0 - f32).pow(2).mean().sqrt() / f32.pow(2).mean().sqrt()), 6),
                                  "level_flips": round(level_flips(r0, f32), 6)}
            del f32, r0
            best = None
            for dp in sorted({d, *(-(-d // p) * p for p in pads)}):
                for out_bf16 in (True, False):
                    key = f"fp8_d{dp}_{'bf16' if out_bf16 else 'e4m3'}_out"
                    try:
                        def pad(x: torch.Tensor) -> torch.Tensor:
                            return F.pad(x, (0, dp - d))
                        if kind == "self":
                            st = pad(torch.stack([gq, gk, gv], 2)).to(torch.float8_e4m3fn)  # [B, S, 3, H, dp]
                            q8, k8, v8 = (st[:, :, i].transpose(1, 2) for i in range(3))
                        else:
                            q8 = pad(gq).to(torch.float8_e4m3fn).transpose(1, 2)
                            st = pad(torch.stack([gk, gv], 2)).to(torch.float8_e4m3fn)
                            k8, v8 = (st[:, :, i].transpose(1, 2) for i in range(2))
                        so = 1.0 / (6 * sv)
                        run, out = fp8_sdpa_cudnn(q8, k8, v8, (sq, sk, sv), 448.0, so, d ** -0.5, out_bf16)
                        run()
                        torch.cuda.synchronize()
                        got = out[..., :d].float() / so
                        ms, how = _time(run)
                        rf = ref.float()
                        row[key] = {"ms": ms, "timing": how,
                                    "rel_rmse": round(float((got - rf).pow(2).mean().sqrt() / rf.pow(2).mean().sqrt()), 6),
                                    "max_err": round(float((got - rf).abs().max() / rf.abs().max()), 6),
                                    "level_flips": round(level_flips(got, rf), 6)}
                        if best is None or ms < row[best]["ms"]:
                            best = key
                        del run, out, got
                    except Exception as e:  # noqa: BLE001  (an unsupported head dim or output type)
                        row[key] = {"error": repr(e)[:400]}
            row["best_fp8"] = best
            if best:
                row["speedup"] = round(row["bf16_cudnn_ms"] / row[best]["ms"], 3)
                totals["fp8_best_ms"] += blocks * row[best]["ms"]
            else:
                totals["fp8_best_ms"] += blocks * row["bf16_cudnn_ms"]  # no FP8 kernel: bf16 stays
            totals["bf16_ms"] += blocks * row["bf16_cudnn_ms"]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            del ref
            torch.cuda.empty_cache()
    res["per_step_ms"] = {k: round(v, 4) for k, v in totals.items()}
    res["per_step_saving_ms"] = round(totals["bf16_ms"] - totals["fp8_best_ms"], 4)
    return res


FLASH_TILES = ((128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 128, 4, 3, True), (128, 64, 4, 3, False),
               (128, 64, 4, 3, True), (128, 64, 8, 4, True), (64, 128, 4, 3, True), (128, 128, 8, 4, True))


def flash_tile_name(tile: tuple) -> str:
    """(128, 64, 4, 3, True) -> "128x64w4s3e16": BLOCK_M x BLOCK_N, warps, stages, f16x2 exponentials."""
    bm, bn, w, st, e16 = tile
    return f"{bm}x{bn}w{w}s{st}{'e16' if e16 else ''}"


def bench_flash_fp8(batch: int, levels: tuple = ATTN_LEVELS, tiles: tuple = FLASH_TILES, device: str = DEV,
                    pad64: bool = True) -> dict:
    """Our Triton FP8 flash attention (``flash_fp8.flash_fp8_triton``, op ``msfp_fast::flash_fp8``) against the bf16
    SDPA the fast path runs (PyTorch's default backend: cuDNN's flash kernel on the H200) on SD1.5's self-attentions,
    Q/K/V as the graph has them: bf16 views of one merged projection output for SDPA; for the kernel E4M3 q/k at
    their head dim and V^T, as ``fast.flash_fp8_fq`` writes them. Per level and tile: ms (CUDA-graph replay), O's
    rel-RMSE against the bf16 SDPA, E2M1 level flips of a 4-bit quantizer of O; per-step totals weight each level
    by its blocks (the step runs 5 self-attentions at each of 64x64 and 32x32). ``pad64``: every tile also on
    operands whose head dim is zero-padded to 64 in memory ("<tile>_pad64"; session 17's first run, unpadded only:
    1.028 ms against cuDNN's 0.615 at 64x64). ``best_tile`` / ``per_step_saving_ms``: the one unpadded tile fastest
    over all levels, what a build runs; ``per_step_saving_best_per_level_ms``: a different tile per level."""
    from msfp_compiler.export.triton.flash_fp8 import flash_fp8_triton

    gen = torch.Generator().manual_seed(0)
    sq = sk = 0.6  # logits of std ~3 at d = 40 with E2M1 values
    sv, zv = 0.1, 0.0
    res: dict = {"batch": batch, "rows": [], "timing": "graphed_ms"}
    totals: Counter = Counter()
    measured: Counter = Counter()  # levels at which each tile ran
    for level, tokens, heads, d, blocks in levels:
        row: dict = {"level": level, "B": batch, "H": heads, "S": tokens, "d": d, "blocks": blocks}
        gq, gk, gv = (grid_values((batch, tokens, heads, d), gen, device) for _ in range(3))
        m = torch.stack([(gq * sq).bfloat16(), (gk * sk).bfloat16(), (gv * sv).bfloat16()], 2)  # [B, S, 3, H, d]
        q16, k16, v16 = (m[:, :, i].transpose(1, 2) for i in range(3))
        ref = F.scaled_dot_product_attention(q16, k16, v16)
        row["bf16_sdpa_ms"] = round(graphed_ms(lambda: F.scaled_dot_product_attention(q16, k16, v16)), 4)
        rf = ref.float()
        best = None
        for tile, pad in [(t, False) for t in tiles] + [(t, True) for t in tiles if pad64 and d < 64]:
            # pad: the head dim zero-padded to 64 in memory (16-byte rows: 16-byte cp.async instead of 8-byte),
            # what the quantizer kernel could write instead at 1.6x the bytes
            dp = 64 if pad else d
            q8 = F.pad(gq, (0, dp - d)).to(torch.float8_e4m3fn).transpose(1, 2)
            k8 = F.pad(gk, (0, dp - d)).to(torch.float8_e4m3fn).transpose(1, 2)
            vt8 = F.pad(gv, (0, dp - d)).to(torch.float8_e4m3fn).permute(0, 2, 3, 1).contiguous()  # [B, H, dp, S]
            key = flash_tile_name(tile) + ("_pad64" if pad else "")
            try:
                def run(tile=tile, q8=q8, k8=k8, vt8=vt8):
                    return flash_fp8_triton(q8, k8, vt8, sq, sk, sv, zv, d ** -0.5, tile=tile)
                got = run()[..., :d].float()
                row[key] = {"ms": round(graphed_ms(run), 4),
                            "rel_rmse": round(float((got - rf).norm() / rf.norm()), 6),
                            "level_flips": round(level_flips(got, rf), 6)}
                if not pad and (best is None or row[key]["ms"] < row[best]["ms"]):
                    best = key  # unpadded only: what flash_fp8_fq passes
            except Exception as e:  # noqa: BLE001  (a tile that does not compile or fit)
                row[key] = {"error": repr(e)[:400]}
        row["best"] = best
        totals["bf16_ms"] += blocks * row["bf16_sdpa_ms"]
        totals["best_ms"] += blocks * (row[best]["ms"] if best else row["bf16_sdpa_ms"])
        for tile in tiles:  # a padded tile at a head dim of 64 or more is the unpadded one
            for key in (flash_tile_name(tile), flash_tile_name(tile) + "_pad64"):
                got = row.get(key, row.get(flash_tile_name(tile)) if d >= 64 else None) or {}
                if "ms" in got:
                    totals[key] += blocks * got["ms"]
                    measured[key] += 1
        if best:
            row["speedup"] = round(row["bf16_sdpa_ms"] / row[best]["ms"], 3)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del ref, m, q16, k16, v16
        torch.cuda.empty_cache()
    # a tile that failed at some level has no per-step total (counting bf16's time there would flatter it)
    res["per_step_ms"] = {k: round(v, 4) for k, v in totals.items() if k in ("bf16_ms", "best_ms")
                          or measured[k] == len(res["rows"])}
    one = [flash_tile_name(t) for t in tiles if flash_tile_name(t) in res["per_step_ms"]]
    res["best_tile"] = min(one, key=res["per_step_ms"].get) if one else None  # one tile at every level, unpadded:
    # what build_fast(attention="fp8-triton") runs (flash_fp8.FLASH_TILE, bench_gpu_sd15 --flash-tile)
    res["per_step_saving_ms"] = (round(totals["bf16_ms"] - res["per_step_ms"][res["best_tile"]], 4)
                                 if res["best_tile"] else None)
    res["per_step_saving_best_per_level_ms"] = round(totals["bf16_ms"] - totals["best_ms"], 4)
    return res


EPI_SHAPES = (("geglu_64x64", 4096, 320, 2560), ("geglu_32x32", 1024, 640, 5120), ("linear_64x64", 4096, 1280, 320))
EPI_QUANT = ("e2m1", 0.05)  # a signed FP4 activation quantizer (scale; zero point 0) of the next GEMM


def bench_epilogue(batch: int) -> dict:
    """The pointwise kernel after an FP8 GEMM as Inductor (default mode) compiles it from the fast path's torch ops,
    replayed from a CUDA graph, on SD1.5's largest 64x64 / 32x32 shapes (rows ``M = tokens * batch``), against the
    floor of its bytes (``floor``: read the GEMM output, write the E4M3 result, no other math). Session 17's
    roofline had these kernels at ~26% of copy bandwidth; counting sm_90 SASS on the CPU put them at 40-90
    instructions per element (the per-column epilogue ~15 per input, exact GELU ~40 of which its erf ~30, the
    quantizer ~11), which the H200 issues slower than it moves the bytes. Variants: ``exact`` (the fast path today:
    the tensorwise GEMM's bf16 output times its per-column scale plus bias, rounded to bf16, then GEGLU and the next layer's
    quantizer; ``linear`` rows write the bf16 result and its E4M3 codes), ``nd`` (the same under Inductor's
    ``triton.prefer_nd_tiling``: column index from a 2-D tile, no div/mod per element; must be bit-equal),
    ``noepi`` (no per-column work: what is left when the GEMM applies scale and bias itself), ``tanh`` (GELU's tanh
    form: the share of exact erf; ``tanh_code_diff`` = fraction of E4M3 codes that differ from ``exact``), ``fast``
    (``fast.gelu_fast``: the same tanh form as a sigmoid, build_fast's default on CUDA since session 18). The
    GEMMs that ``noepi`` would need: ``torch._scaled_mm`` tensorwise (today) vs rowwise scales with a bf16 bias,
    with their max difference after the same epilogue. ``code``: Inductor's kernels of ``exact`` and ``nd``."""
    import torch._dynamo
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from msfp_compiler.export.triton.fast import gelu_fast, grid_e4m3

    fmt, s = EPI_QUANT
    f8 = torch.float8_e4m3fn
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows, code = [], {}
    for name, tokens, k, n in EPI_SHAPES:
        m = tokens * batch
        a = (torch.randn(m, k, device=DEV, generator=gen) * 2).to(f8)
        w = (torch.randn(n, k, device=DEV, generator=gen) * 2).to(f8)
        sb = torch.rand(n, device=DEV, generator=gen) * 1e-3 + 1e-3  # per-column scale of a tensorwise GEMM
        beta = torch.randn(n, device=DEV, generator=gen) * 0.1
        one = torch.ones((), device=DEV)
        y = torch._scaled_mm(a, w.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)
        row: dict = {"shape": name, "m": m, "k": k, "n": n,
                     "out_mb": round(y.numel() * 2 / 1e6, 1)}
        geglu = name.startswith("geglu")

        def epi(t: torch.Tensor) -> torch.Tensor:
            return (t.float() * sb + beta).to(torch.bfloat16)

        def tail(t: torch.Tensor, gelu: Callable = F.gelu):
            if geglu:
                h, g = t.chunk(2, dim=-1)
                return grid_e4m3(h * gelu(g), s, 0.0, fmt)
            return t, grid_e4m3(t, s, 0.0, fmt)

        variants = {
            # the same bytes as exact: geglu reads [M, N] bf16 and writes [M, N/2] E4M3; linear also writes bf16
            "floor": ((lambda t: (t[:, : n // 2] + t[:, n // 2:]).to(f8)) if geglu
                      else (lambda t: (t.clone(), t.to(f8)))),
            "exact": lambda t: tail(epi(t)), "nd": lambda t: tail(epi(t)), "noepi": lambda t: tail(t),
        }
        if geglu:
            variants["tanh"] = lambda t: tail(epi(t), lambda g: F.gelu(g, approximate="tanh"))
            variants["fast"] = lambda t: tail(epi(t), gelu_fast)  # build_fast's default on CUDA (session 18)
        outs = {}
        for v, fn in variants.items():
            torch._dynamo.reset()
            with inductor_config.patch({"triton.prefer_nd_tiling": v == "nd"}):
                cf = torch.compile(fn, fullgraph=True, dynamic=False)
                if v in ("exact", "nd") and name not in ("geglu_32x32",):
                    out, src = run_and_get_code(cf, y)
                    code[f"{name}_{v}"] = "\n".join(src)[-20000:]
                else:
                    out = cf(y)
                outs[v] = out
                row[f"{v}_ms"] = round(graphed_ms(lambda: cf(y)), 5)  # noqa: B023
        last = (lambda o: o if geglu else o[1])
        codes = {v: last(o).view(torch.uint8) for v, o in outs.items()}
        row["nd_bit_equal"] = bool(torch.equal(codes["nd"], codes["exact"]))
        if geglu:
            for v in ("tanh", "fast"):
                row[f"{v}_code_diff"] = float((codes[v] != codes["exact"]).float().mean())
        floor_mb = (m * n * 2 + (m * n // 2 if geglu else m * n * 3)) / 1e6  # read bf16; write E4M3 (+ bf16)
        row["floor_gbs"] = round(floor_mb / row["floor_ms"] / 1e3, 1)
        for v in variants:
            row[f"{v}_vs_floor"] = round(row[f"{v}_ms"] / row["floor_ms"], 3)
        # the GEMM itself: tensorwise (today) vs rowwise scales + bf16 bias (what noepi needs)
        def tw():
            return torch._scaled_mm(a, w.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: B023

        row["gemm_tensorwise_ms"] = round(graphed_ms(tw), 5)
        ones_m = torch.ones(m, 1, device=DEV)
        b16 = beta.to(torch.bfloat16)
        for fast in (True, False):
            key = f"gemm_rowwise_bias{'_fastacc' if fast else ''}"
            try:
                def rw(fast=fast):
                    return torch._scaled_mm(a, w.t(), ones_m, sb.view(1, n), bias=b16,  # noqa: B023
                                            out_dtype=torch.bfloat16, use_fast_accum=fast)
                got = rw()
                row[f"{key}_ms"] = round(graphed_ms(rw), 5)
                row[f"{key}_max_diff"] = float((got.float() - epi(y).float()).abs().max())
            except Exception as e:  # noqa: BLE001
                row[f"{key}_error"] = repr(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"timing": "graphed_ms (do_bench_cudagraph)", "quantizer": list(EPI_QUANT), "rows": rows, "code": code}


SECTIONS = ("layers", "conv", "decode", "im2col", "fp8attn", "gnstats", "flashfp8", "epilogue")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_sd15_kernels.json"))
    ap.add_argument("--sections", default="layers", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--attn-levels", default=",".join(lv[0] for lv in ATTN_LEVELS),
                    help="fp8attn and flashfp8: the SD1.5 levels to time (64x64, 32x32, 16x16, 8x8; flashfp8 only "
                    "the first two, the self-attentions build_fast admits)")
    ap.add_argument("--attn-pads", default="16", help="fp8attn: head dims also padded to multiples of these")
    ap.add_argument("--gpu-lock", default=None, metavar="FILE", help="conv: hold an flock on FILE for the timings "
                    "(the one bench_gpu_sd15 --gpu-lock takes), so they never share the GPU with another bench")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:  # before any GPU work: a typo (or a removed section) must not time nothing and exit 0
        ap.error(f"--sections: unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)})")
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    res: dict = {"device": torch.cuda.get_device_name(0), "batch": args.batch}
    levels = tuple(lv for lv in ATTN_LEVELS if lv[0] in args.attn_levels.split(","))
    standalone = {  # the sections that need no SD1.5 layer list (no diffusers UNet), in this order
        "gnstats": lambda: bench_gnstats(args.batch),
        "epilogue": lambda: bench_epilogue(args.batch),
        "fp8attn": lambda: bench_fp8_attention(args.batch, levels,
                                               pads=tuple(int(p) for p in args.attn_pads.split(","))),
        "flashfp8": lambda: bench_flash_fp8(args.batch, tuple(lv for lv in levels if lv[0] in ("64x64", "32x32"))),
    }
    for name, run in standalone.items():
        if name in sections:
            res[name] = run()
            res["seconds"] = round(time.perf_counter() - t0, 1)
            Path(args.out).write_text(json.dumps(res, indent=1))  # after every section: a later failure keeps it
    if not set(sections) & {"conv", "decode", "im2col", "layers"}:  # e.g. gnstats,flashfp8: no layer list
        return 0
    shapes = layer_shapes(args.batch)
    for name, fn in (("conv", bench_conv), ("decode", bench_decode), ("im2col", bench_im2col)):
        if name in sections:
            res[name] = fn(shapes, args.gpu_lock) if name == "conv" else fn(shapes)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            Path(args.out).write_text(json.dumps(res, indent=1))  # after every section
    if "layers" not in sections:
        return 0
    rows, totals = [], Counter()
    for (kind, xs, ws, stride, pad), count in sorted(shapes.items(), key=lambda kv: str(kv[0])):
        if ws[0] % 16 or ws[1] < 16:  # conv_in / conv_out (4 channels): kept 8-bit by the compiler
            continue
        r = {"kind": kind, "x": xs, "w": ws, "stride": stride, "pad": pad, "count": count, **bench_shape(kind, xs, ws,
                                                                                                       stride, pad)}
        rows.append(r)
        for key in ("cublas_fp8_ms", "decode_ms", "im2col_ms", "triton_w4_ms", "bf16_ms"):
            totals[key] += count * r.get(key, 0.0)
        print(json.dumps(r), flush=True)
    res = {**res, "timing": "triton.testing.do_bench median",
           "per_step_ms": {k: round(v, 4) for k, v in totals.items()}, "layers": sum(shapes.values()), "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["per_step_ms"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
