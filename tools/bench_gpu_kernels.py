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
im2col + cuBLAS on the SD1.5 k x k convs, outputs checked equal).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_sd15_kernels.json"))
    ap.add_argument("--sections", default="layers", help="comma list of layers, conv, decode, im2col")
    ap.add_argument("--gpu-lock", default=None, metavar="FILE", help="conv: hold an flock on FILE for the timings "
                    "(the one bench_gpu_sd15 --gpu-lock takes), so they never share the GPU with another bench")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    shapes = layer_shapes(args.batch)
    sections = args.sections.split(",")
    res: dict = {"device": torch.cuda.get_device_name(0), "batch": args.batch}
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
