"""SD1.5 UNet step on the GPU: W4A4 (the fast path of export/triton/fast.py) vs bf16 baselines, same process.

    python tools/bench_gpu_sd15.py --out results/gpu_sd15.json --batches 1,8 --log-dir OUT

The UNet2DConditionModel of the SD1.5 config (random weights, seed 0, 64x64x4 latents, 77x768 text states) is
quantized by the project's own verb (``msfp_compiler.compile``, MSFP W4A4, a small PTQ calibration: formats barely
change speed) and rewritten by ``build_fast`` for torch.compile. Baselines, measured in the same process on the same
inputs: bf16 eager replayed from a CUDA graph, and bf16 ``torch.compile`` in each ``--baseline-mode`` (default
"reduce-overhead,default-graph", both replay CUDA graphs; "max-autotune" does not compile within a device call on
SD1.5); attention through PyTorch SDPA in all of them. The fast path is compiled with ``--fast-mode`` (default
"graph": ``graphed.GraphedStep``). Times are medians of CUDA-event timings after warm-up. The one-graph steps (W4A4
"graph", bf16 eager + CUDA graph, bf16 "default-graph") are timed the same way since session 9: each call copies its
inputs into the captured ones and replays (``GraphedStep``), as a sampler calls it.
Accuracy: per-step rel-RMSE of the fast W4A4 eps against the float32 fake-quant reference (the same GraphModule,
unfused, registered Triton kernels, TF32 off) along the reference's DDIM trajectory.
Each phase appends to the JSON as it finishes, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpu_timing import hold_gpu_lock, kernel_ms, step_ms  # noqa: E402
from unet_configs import SD15_UNET_CONFIG  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def profile_table(fn: Callable[[], Any], mark_step: bool, rows: int = 60) -> tuple[str, list[dict]]:
    """Device time per kernel name over 5 steps (torch.profiler), as a table and as rows."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    items = sorted((k for k in ka if k.device_time_total > 0 and k.device_type.name == "CUDA"),
                   key=lambda k: -k.device_time_total)
    total = sum(k.device_time_total for k in items)
    out = [{"kernel": k.key[:160], "ms_per_step": round(k.device_time_total / 5 / 1e3, 4), "calls_per_step": k.count / 5,
            "share": round(k.device_time_total / total, 4)} for k in items]
    lines = [f"device time per step {total / 5 / 1e3:.3f} ms"] + [
        f"{r['ms_per_step']:8.3f} ms {100 * r['share']:5.1f}% x{r['calls_per_step']:6.1f}  {r['kernel']}" for r in out[:rows]]
    return "\n".join(lines), out


def kernels_per_step(rows: list[dict]) -> float:
    """Kernel launches (and memsets/copies) per step: each costs a launch gap inside the CUDA graph."""
    return round(sum(r["calls_per_step"] for r in rows), 1)


def categorize(rows: list[dict]) -> dict[str, float]:
    """Kernel time per step by kind (name patterns of cuBLAS/CUTLASS/cuDNN/flash/Inductor kernels)."""
    cats = {"gemm_fp8": 0.0, "gemm_bf16": 0.0, "conv": 0.0, "attention": 0.0, "layout": 0.0, "norm_pointwise": 0.0,
            "weight_decode": 0.0, "im2col": 0.0, "other": 0.0}
    for r in rows:
        k = r["kernel"].lower()
        if k.startswith(("_decode_kernel", "_decode_group_kernel")):  # export/triton/w4_decode.py
            c = "weight_decode"
        elif k.startswith("_im2col_kernel"):  # export/triton/im2col.py
            c = "im2col"
        elif k.startswith("triton"):  # Inductor-generated (names carry the fused ops, e.g. _scaled_mm's operands)
            c = "norm_pointwise"
        elif k.startswith("nvjet") and "_qq" in k:  # cuBLAS FP8 x FP8 (torch._scaled_mm)
            c = "gemm_fp8"
        elif "flash" in k or "fmha" in k or "attention" in k:
            c = "attention"
        elif ("e4m3" in k or "f8" in k or "fp8" in k or "scaled_mm" in k) and ("gemm" in k or "mm" in k or "cutlass" in k
                                                                             or "sm90" in k):
            c = "gemm_fp8"
        elif "nchwtonhwc" in k or "nhwctonchw" in k or "transpose" in k:
            c = "layout"
        elif "conv" in k or "implicit" in k or "xmma_fprop" in k or "fprop" in k:
            c = "conv"
        elif "gemm" in k or "cutlass" in k or "sm90_xmma" in k or "mm_" in k or "nvjet" in k:
            c = "gemm_bf16"
        elif k.startswith("triton") or "elementwise" in k or "reduce" in k or "norm" in k:
            c = "norm_pointwise"
        else:
            c = "other"
        cats[c] += r["ms_per_step"]
    return {k: round(v, 4) for k, v in cats.items()}


class Recorder:
    def __init__(self, path: Path, base: dict):
        self.path, self.data = path, base

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def section(self, key: str, fn: Callable[[], Any], log_chars: int | None = None) -> None:
        """Record ``fn()`` under ``key`` and log it (cut to ``log_chars``); an optional phase: its failure is
        recorded as ``{"error": ...}`` with the traceback printed, and the benchmark goes on."""
        try:
            self.put(key, fn())
            log(f"{key}: {json.dumps(self.data[key])[:log_chars]}")
        except Exception as e:  # noqa: BLE001
            self.put(key, {"error": repr(e)[:3000]})
            traceback.print_exc()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def bf16_inputs(x: tuple) -> tuple:
    """The baseline's inputs: what a bf16 pipeline passes (latents and text states in bf16, int timesteps)."""
    return tuple(t.bfloat16() if t.is_floating_point() else t for t in x)


def build_sd15() -> Any:
    from msfp_compiler.load import LoadedModel, model_from_config

    torch.manual_seed(0)
    with torch.no_grad():
        unet = model_from_config(dict(SD15_UNET_CONFIG), "sd15 config").eval()
    return LoadedModel(unet, Path("<sd15 config, random weights>"))


def inputs(batch: int, example: tuple, device: str = "cuda", seed: int = 0) -> tuple:
    """(sample, timestep, text states) of the compiled signature at this batch size."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, *example[0].shape[1:], generator=g)
    t = example[1]
    tt = torch.full((batch,) if t.dim() else (), 500, dtype=t.dtype)
    cond = torch.randn(batch, *example[2].shape[1:], generator=g)
    return sample.to(device), tt.to(device), cond.to(device)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_sd15.json"))
    ap.add_argument("--log-dir", default=None, help="profiles and tables go here")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calib", default="1x2", help="calibration samples x DDIM steps (default 1x2)")
    ap.add_argument("--calib-device", default="cuda", help="CompileConfig.device: calibration, statistics and format "
                    "search (capture stays on the CPU)")
    ap.add_argument("--baseline-mode", default="reduce-overhead,default-graph", help="comma list of torch.compile "
                    "modes for the bf16 baseline, or default-graph (default mode captured as one CUDA graph by hand); "
                    "bf16_compile_ms is the fastest")
    ap.add_argument("--fast-mode", default="graph", help="graph (Inductor default mode, the step captured as one "
                    "CUDA graph by graphed.GraphedStep; also timed with the weight decode prefetched on a side "
                    "stream) or a torch.compile mode (reduce-overhead: its own CUDA graphs)")
    ap.add_argument("--weights", default="packed", help="comma list of packed,mixed,fp8 (build_fast's weights "
                    "modes; the first is the headline)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--flash-tile", default=None, metavar="TILE", help="msfp_fast::flash_fp8's tile for builds with "
                    "attention='fp8-triton' (variant tfp8attn), as bench_gpu_kernels --sections flashfp8 names them, "
                    "e.g. 128x64w4s3e16 (default: flash_fp8.FLASH_TILE)")
    ap.add_argument("--captures", type=int, default=1, help="graph mode: time the W4A4 step and the bf16 "
                    "default-graph step from this many CUDA-graph captures each (the same compiled code captured "
                    "again, no recompile; session 9 measured ~1%% between two captures of one step); recorded as "
                    "*_capture_medians and speedup_over_captures (median over captures), the headline fields stay "
                    "the first capture's")
    ap.add_argument("--accuracy-steps", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-bf16-profile", action="store_true", help="with --profile: profile the W4A4 steps only (the "
                    "bf16 baselines' profiles do not change with our code; saves device time)")
    ap.add_argument("--warm-baseline", action="store_true", help="compile the bf16 baseline in a subprocess while "
                    "our compiler runs (fills the Inductor caches; the timed compile in this process then hits them)")
    ap.add_argument("--warm-timeout", type=float, default=600.0, help="seconds the timings wait for the warm-up "
                    "process; baseline compiles it has not finished by then are skipped (recorded as such)")
    ap.add_argument("--variant", default=None, metavar="NAME[/NAME...]:BATCH[,BATCH...][+...]", help="after the main "
                    "rows: one more W4A4 compile, timing and profile at each BATCH with each option (A/B: "
                    "gnauto/gntriton:8,1,4 alternates them per batch size in one process; groups joined by '+' "
                    "run in order, e.g. gnauto/gntriton/splitcat:8+gnauto/gntriton:1): combo (Inductor "
                    "config.combo_kernels, "
                    "independent kernels launched as one) or qkv (build_fast(quantize_parts=True): the Q/K/V "
                    "fake quantizers in their merged GEMM's epilogue) or conv (build_fast(implicit_conv=True): the "
                    "implicit-GEMM FP8 conv, tiles tuned per shape against im2col + cuBLAS; the default on CUDA "
                    "since session 8) or im2col (implicit_conv=False: the convs as im2col + cuBLAS) or fp8attn "
                    "(build_fast(attention='fp8'): cuDNN's FP8 attention where admitted; needs nvidia-cudnn-frontend) "
                    "or gnaten (build_fast(group_norm='aten'): the captured GroupNorm, Inductor's NCHW-order "
                    "reduction) or gnauto / gnchannels / gntriton (group_norm='auto' / 'channels' / 'triton': "
                    "the statistics from our Triton kernels) or splitcat (build_fast(split_concat=True): the 1x1 "
                    "convs on per-part quantized concatenations as one FP8 GEMM per part) or gntriton_splitcat "
                    "(both) or catnhwc (build_fast(cat_nhwc=True), the default since session 16: the skip "
                    "concatenations in NHWC memory) or catnchw (cat_nhwc=False: aten.cat, the graph before) or cdt "
                    "(Inductor coordinate_descent_tuning; did not compile SD1.5 within a call in session 17) or "
                    "tfp8attn (build_fast(attention='fp8-triton'): our Triton FP8 flash kernel, tile --flash-tile) "
                    "or ndtile (Inductor triton.prefer_nd_tiling: pointwise kernels index broadcast columns from 2-D "
                    "tiles; did not compile SD1.5 within a call in session 18) or exactgelu (build_fast(gelu='exact'): "
                    "the captured erf GELU, the default on CUDA before session 18) or gnaffine "
                    "(build_fast(gn_affine=True): each GroupNorm's per-channel scale and shift written by the "
                    "statistics' combine kernel, not recomputed per element) or fastq (build_fast(quant_math="
                    "'fast'): the quantizers multiply by p / s and round M = 2 / 3 formats by one FP8 conversion) "
                    "or silusig (build_fast(silu='sigmoid'): the Triton GroupNorms' SiLUs as x * sigmoid(x)) "
                    "(those three and splitcat the default on CUDA since session 19) or nopersist (Inductor "
                    "triton.persistent_reductions=False: looped reductions, no padded LayerNorm rows) or nosplitcat "
                    "(split_concat=False) or s18 (the default build of session 18: gn_affine=False, "
                    "quant_math='exact', silu='exact', split_concat=False)); "
                    "names joined by ',' are one build with all their options (gnauto/catnhwc,splitcat:8); each "
                    "starts from build_fast's defaults, not from --attention / --group-norm; "
                    "recorded under 'variants' (with output_vs: its output against the headline step's at that "
                    "batch size, same inputs, or with --skip main the first variant's), then its accuracy unless "
                    "skipped")
    ap.add_argument("--attention", default="bf16", choices=["bf16", "fp8", "fp8-triton"], help="build_fast's "
                    "attention for the headline rows (fp8-triton: our Triton FP8 flash kernel on the quantized Q/K/V "
                    "where admitted, tile --flash-tile; fp8: cuDNN's)")
    ap.add_argument("--group-norm", default="auto", choices=["auto", "channels", "aten", "triton"], help="build_fast's "
                    "group_norm for the headline rows (channels: per-channel statistics in NHWC order; aten: the "
                    "captured op; auto, the default: triton from batch 4 on (session 14; channels in session 13), "
                    "aten below; triton: the statistics from our Triton kernels, export/triton/gn_stats.py)")
    ap.add_argument("--time-each", action="store_true", help="compile each batch size's W4A4 step just before its "
                    "timings (the first before the warm-up wait) instead of all first: a run cut short keeps the "
                    "rows of the batch sizes it timed")
    ap.add_argument("--conv-sets", default="", help="comma list of conv-candidate sets to time the headline W4A4 "
                    "step with as well, after its own timing: the same compiled step re-captured with each conv's "
                    "choice from the set, taken from the tuner's record (no recompile, no second tuning). Sets: "
                    "new (conv_fp8.CONFIGS + NEW_CONFIGS), nosplit (the same without split-K), session8 (session 8's "
                    "three tiles), im2col (no tile: im2col + cuBLAS everywhere); recorded as w4a4_conv_<set>, timed "
                    "after the row's bf16 baselines")
    ap.add_argument("--skip", default="", help="comma list of phases to leave out: accuracy, bandwidth, "
                    "prefetch (graph mode's side-stream decode timing), main (the headline rows: with --variant, "
                    "only the variant is compiled and timed), roundcheck (compiled vs eager quantizer on the GPU)")
    ap.add_argument("--gpu-lock", default=None, metavar="FILE", help="hold an exclusive lock on FILE from the first "
                    "timing to the end (benchmarks of other batch sizes compiling in parallel processes time one "
                    "at a time)")
    ap.add_argument("--only-warm-baseline", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save-pt2", default=None, help="also write the compiled program here and sample it through "
                    "msfp-sample --backend triton")
    ap.add_argument("--digits-only", default=None, metavar="DEVICE", help="only the digits models' sample accuracy "
                    "(fast path on DEVICE, cpu or cuda, vs onnxruntime); writes --out")
    ap.add_argument("--digits-gpu-build", action="store_true", help="with --digits-only cpu: build the fast path "
                    "with the options it defaults to on CUDA (build_fast's CUDA_BF16_DEFAULTS: GELU tanh form, "
                    "grid_fast quantizers, the GroupNorms' SiLUs as x * sigmoid(x), per-part concatenation GEMMs), so "
                    "the CPU run has the GPU build's roundings but for the FP8 accumulation and the kernels' own")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.digits_only:
        from msfp_compiler.export.triton.fast import CUDA_BF16_DEFAULTS

        res = digits_accuracy(args.digits_only, compiled=args.digits_only == "cuda",
                              options=dict(CUDA_BF16_DEFAULTS) if args.digits_gpu_build else None)
        res["loadavg"] = os.getloadavg()
        Recorder(Path(args.out), res).save()
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    batches = [int(b) for b in args.batches.split(",")]
    variant_names: set[str] = set()
    if args.variant:
        try:  # a typo fails here (one line, exit 2), not after the SD1.5 compile
            variant_names = {part for names, _ in parse_variants(args.variant) for name in names
                             for part in name.split(",")}
        except ValueError as e:
            ap.error(str(e))
    if args.flash_tile:
        try:
            tile = parse_flash_tile(args.flash_tile)
        except ValueError as e:
            ap.error(str(e))
        if args.attention != "fp8-triton" and "tfp8attn" not in variant_names:
            ap.error("--flash-tile: no build runs the FP8 flash kernel (give --attention fp8-triton or a tfp8attn "
                     "variant)")
        from msfp_compiler.export.triton import flash_fp8

        flash_fp8.FLASH_TILE = tile
    if args.only_warm_baseline:
        return warm_baseline(batches, args.baseline_mode, Path(args.only_warm_baseline))
    warm = start_warm(args) if args.warm_baseline else None
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    rec = Recorder(Path(args.out), {
        "device": torch.cuda.get_device_name(0), "model": "sd15", "rows": [],
        "env": {"torch": torch.__version__, "cuda": torch.version.cuda, "sms": props.multi_processor_count,
                "python": platform.python_version(), "cpu_threads": torch.get_num_threads()},
        "config": vars(args), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    cm, bf16_bytes = msfp_sd15(args, rec)
    with torch.no_grad():
        # --skip main: only the variant (a follow-up call that re-measures one option, compared across calls)
        rows = measure(args, rec, cm, bf16_bytes, batches, warm) if "main" not in args.skip.split(",") else []
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        if args.variant:
            variant(args, rec, cm)
    if "roundcheck" not in args.skip.split(","):
        rec.section("compiled_quantizer_check", compiled_quantizer_check)
    log(json.dumps([{k: v for k, v in r.items() if not isinstance(v, dict) or k == "weights_gib"}
                    for r in rows], indent=1))
    if "bandwidth" in args.skip.split(","):
        rec.put("finished", time.strftime("%Y-%m-%dT%H:%M:%S"))
        return 0
    rec.section("fake_quant_bandwidth", fake_quant_bandwidth, log_chars=1500)
    if args.save_pt2:
        try:
            sample_cli(cm, args.save_pt2, rec)
        except Exception as e:  # noqa: BLE001
            rec.put("msfp_sample_triton", {"error": repr(e)[:3000]})
            traceback.print_exc()
    rec.put("finished", time.strftime("%Y-%m-%dT%H:%M:%S"))
    return 0


def start_warm(args: argparse.Namespace) -> tuple[Any, Path]:
    """The bf16 baseline compiles in a subprocess (fills the Inductor caches while our compiler runs)."""
    import subprocess
    import tempfile

    done = Path(tempfile.mkdtemp()) / "warm_done.txt"
    proc = subprocess.Popen([sys.executable, __file__, "--only-warm-baseline", str(done), "--batches", args.batches,
                             "--baseline-mode", args.baseline_mode])
    return proc, done


def msfp_sd15(args: argparse.Namespace, rec: Recorder) -> tuple[Any, int]:
    """The SD1.5 UNet quantized by our own compiler (build + calibrate + passes, no ONNX), and bf16's weight bytes."""
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CalibConfig, CompileConfig

    t0 = time.perf_counter()
    loaded = build_sd15()
    n_samples, n_steps = (int(v) for v in args.calib.split("x"))
    calib = CalibConfig(num_samples=n_samples, num_steps=n_steps, num_groups=min(2, n_steps), holdout_samples=0,
                        text_len=77)
    cfg = CompileConfig(calib=calib, device=args.calib_device)
    cm = msfp_compile(loaded, cfg, progress=False, lower=False)  # the GPU path needs the quantized graph, not ONNX
    compile_s = time.perf_counter() - t0
    log(f"msfp compile (build + calibrate {args.calib} + passes, {args.calib_device}): {compile_s:.1f} s")
    rec.put("msfp_compile_seconds", round(compile_s, 1))
    bf16_bytes = sum(t.numel() * 2 for t in loaded.unet.state_dict().values() if t.is_floating_point())
    return cm, bf16_bytes


def measure(args: argparse.Namespace, rec: Recorder, cm: Any, bf16_bytes: int, batches: list[int],
            warm: tuple[Any, Path] | None) -> list[dict]:
    """Every W4A4 compile first (the warm-up compiles the baselines meanwhile; with --time-each only the first,
    each other just before its timings), then per batch size: W4A4 timings and profile, the bf16 baselines, the
    row; then the accuracy of the largest batch's compiled fast path."""
    from msfp_compiler.export.triton.fast import build_fast, weight_bytes

    gm, example = cm.graph_module, cm.calibration.batches[0].args
    if args.conv_sets:  # every candidate of the sets timed at the first warm-up, so the sets need no second tuning
        from msfp_compiler.export.triton import conv_fp8

        conv_fp8.TIME_ALSO = tuple(c for n in args.conv_sets.split(",") for c in _conv_set(n)
                                   if c not in conv_fp8.CONFIGS)
    fasts = {w: build_fast(gm, "cuda", weights=w, group_norm=args.group_norm, attention=args.attention)
             for w in args.weights.split(",")}
    head = args.weights.split(",")[0]
    rec.put("fast_report", str(fasts[head].report))
    log(str(fasts[head].report).split("\n")[0])
    w_bytes = {w: weight_bytes(f) for w, f in fasts.items()}
    rec.put("weights_bytes", {"bf16": bf16_bytes, **{f"w4a4_{w}": b for w, b in w_bytes.items()}})
    xs = {b: inputs(b, example) for b in batches}
    rows = {b: {"batch": b} for b in batches}
    compiled: dict = {}

    def compile_batch(b: int) -> None:
        for w, f in fasts.items():
            if (cf := compile_fast(f, xs[b], args.fast_mode, rows[b], w)) is not None:
                compiled[(w, b)] = cf
        if (head, b) not in compiled and args.fast_mode == "graph":  # CUDA graph trees
            if (cf := compile_fast(fasts[head], xs[b], "reduce-overhead", rows[b], head)) is not None:
                compiled[(head, b)], rows[b]["w4a4_fallback"] = cf, "reduce-overhead (the graph mode failed)"

    for b in batches[:1] if args.time_each else batches:  # --time-each: the others just before their timings
        compile_batch(b)
    rec.put("rows", list(rows.values()))
    if warm is not None:  # its autotuning must not share the GPU with the timings
        rec.put("warm_baseline", wait_warm(warm[0], args.warm_timeout))
    if args.gpu_lock:
        rec.put("gpu_lock_wait_s", round(hold_gpu_lock(args.gpu_lock), 1))
    profiles: dict[str, Any] = {}
    unet = build_sd15().unet.to("cuda", torch.bfloat16).eval()
    for i, b in enumerate(batches):  # one batch size at a time, so a run cut short keeps whole rows
        if args.time_each and i:
            compile_batch(b)
        row = rows[b]
        for w in fasts:
            if (w, b) in compiled:
                time_fast(compiled[(w, b)], xs[b], row, w, args.iters, profiles if args.profile and w == head else None)
        if (head, b) in compiled and args.fast_mode == "graph" and args.captures > 1 and f"w4a4_{head}" in row:
            row["w4a4_capture_medians"] = [row[f"w4a4_{head}"]["median_ms"], *capture_medians(
                compiled[(head, b)].fn, fasts[head], xs[b], args.captures - 1, args.iters)]
            log(f"batch {b}: W4A4 captures {row['w4a4_capture_medians']} ms")
        row["conv_tuning"] = conv_tuning(b)
        if (head, b) in compiled and args.fast_mode == "graph" and "prefetch" not in args.skip.split(","):
            time_prefetch_decode(compiled[(head, b)], fasts[head], xs[b], row, head, args.iters)
        row["w4a4_ms"] = row.get(f"w4a4_{head}", {}).get("median_ms")
        time_baselines(unet, bf16_inputs(xs[b]), row, cached_modes(args.baseline_mode, b, warm, row), args.iters,
                       profiles if args.profile and not args.no_bf16_profile else None, args.captures)
        if row.get("w4a4_capture_medians") and row.get("bf16_compile_default_graph_capture_medians"):
            row["speedup_over_captures"] = round(statistics.median(row["bf16_compile_default_graph_capture_medians"])
                                                 / statistics.median(row["w4a4_capture_medians"]), 3)
        base = [v for k, v in row.items() if k.startswith("bf16_") and k.endswith("_ms") and v is not None]
        if row["w4a4_ms"] and base:
            row["speedup_vs_best_bf16"] = round(min(base) / row["w4a4_ms"], 3)
        row["weights_gib"] = {"w4a4": round(w_bytes[head] / 2**30, 4), "bf16": round(bf16_bytes / 2**30, 4)}
        rec.put("rows", list(rows.values()))
        save_profiles(rec, profiles, args.log_dir)
        if (head, b) in compiled and args.fast_mode == "graph" and args.conv_sets:  # last: the row is saved already
            time_conv_sets(compiled[(head, b)], fasts[head], xs[b], row, args.conv_sets.split(","), args.iters)
            rec.put("rows", list(rows.values()))
    rec.put("peak_gpu_memory_gib", round(torch.cuda.max_memory_allocated() / 2**30, 2))
    del unet
    b_acc = max((b for b in batches if (head, b) in compiled), default=None)
    if b_acc is not None and "accuracy" not in args.skip.split(","):
        rec.section("accuracy", lambda: accuracy(gm, compiled[(head, b_acc)], example, args.accuracy_steps, b_acc),
                    log_chars=1500)
    return list(rows.values())


def variant(args: argparse.Namespace, rec: Recorder, cm: Any) -> None:
    """The headline W4A4 build compiled once more at each of the variant's batch sizes with an Inductor or
    build_fast option, timed and profiled (after the main rows, so a failure or a cut cannot cost them). An A/B
    spec ("gnauto/gntriton:8,1") runs the options one after the other at each batch size, in one process."""
    groups = parse_variants(args.variant)
    rows: list[dict] = []
    one = len(groups) == 1 and len(groups[0][1]) == 1 and len(groups[0][0]) == 1
    for names, batches in groups:  # in the order given, so a cut loses the last group's last rows first
        for b in batches:  # each (batch size, option) its own row and compile, saved as soon as it is timed
            for name in names:
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                options, build = variant_options(name)
                tag = name.replace(",", "-")  # a file-name-friendly tag: profile_catnhwc-splitcat_b8.json (the device
                # tool does not bring back names with "+")
                variant_row(args, rec, cm, name, b, options, build, rows, tag=tag if one else f"{tag}_b{b}")


VARIANTS = {"combo": ({"combo_kernels": True}, {}), "qkv": ({}, {"quantize_parts": True}),
            "conv": ({}, {"implicit_conv": True}), "im2col": ({}, {"implicit_conv": False}),
            "fp8attn": ({}, {"attention": "fp8"}), "gnaten": ({}, {"group_norm": "aten"}),
            "gnauto": ({}, {"group_norm": "auto"}), "gnchannels": ({}, {"group_norm": "channels"}),
            "gntriton": ({}, {"group_norm": "triton"}), "splitcat": ({}, {"split_concat": True}),
            "gntriton_splitcat": ({}, {"group_norm": "triton", "split_concat": True}),
            "catnhwc": ({}, {"cat_nhwc": True}),  # the default since session 16
            "catnchw": ({}, {"cat_nhwc": False}),  # aten.cat, the default build before session 16
            "cdt": ({"coordinate_descent_tuning": True}, {}),  # Inductor tunes each kernel's block sizes and warps
            "tfp8attn": ({}, {"attention": "fp8-triton"}),  # msfp_fast::flash_fp8 (session 17)
            "ndtile": ({"triton.prefer_nd_tiling": True}, {}),  # column indices from 2-D tiles, no div/mod
            "exactgelu": ({}, {"gelu": "exact"}),  # the captured erf GELU (the default on CUDA before session 18)
            "gnaffine": ({}, {"gn_affine": True}),  # GroupNorm scale / shift from msfp_fast::gn_scale_shift
            "fastq": ({}, {"quant_math": "fast"}),  # quantizers by grid_fast: multiplier, FP8-conversion rounding
            "silusig": ({}, {"silu": "sigmoid"}),  # the Triton GroupNorms' SiLUs as x * sigmoid(x)
            # the three above are the default on CUDA at bf16 since session 19; this is the build before
            "nosplitcat": ({}, {"split_concat": False}),  # splitcat is the default on CUDA since session 19
            # looped reductions: the LayerNorms' rows in power-of-two chunks instead of one padded block (SD1.5's
            # widths are 5 x 2^k: a persistent row idles 37.5% of its lanes; docs/triton.md session 19)
            "nopersist": ({"triton.persistent_reductions": False}, {}),
            "s18": ({}, {"gn_affine": False, "quant_math": "exact", "silu": "exact", "split_concat": False})}


def parse_flash_tile(text: str) -> tuple:
    """"128x64w4s3e16" -> (128, 64, 4, 3, True): BLOCK_M x BLOCK_N, warps, stages, f16x2 exponentials (the names
    bench_gpu_kernels --sections flashfp8 gives its tiles); ValueError (one line) otherwise."""
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)(e16)?", text)
    if not m:
        raise ValueError(f"--flash-tile {text!r}: want BMxBNwWARPSsSTAGES[e16], e.g. 128x64w4s3e16")
    bm, bn, warps, stages = (int(g) for g in m.groups()[:4])
    if any(v & (v - 1) for v in (bm, bn, warps)) or bm < 16 or bn < 32 or not warps or not stages:
        raise ValueError(f"--flash-tile {text!r}: BM, BN and WARPS must be powers of two, BM >= 16, BN >= 32 (the FP8 "
                         "P @ V contracts over BN), STAGES >= 1")
    return bm, bn, warps, stages, m.group(5) is not None


def parse_variants(spec: str) -> list[tuple[list[str], list[int]]]:
    """"GROUP[+GROUP...]", each group as parse_variant reads it (different option sets per batch size in one call,
    e.g. "gnauto/gntriton/gntriton_splitcat:8+gnauto/gntriton:1,4"); ValueError (one line) otherwise."""
    return [parse_variant(g) for g in spec.split("+")]


def variant_options(name: str) -> tuple[dict, dict]:
    """(Inductor options, build_fast options) of a variant NAME, or of "A,B,...": the named variants' options in
    one build (so one compile measures levers together; the profile tells their kernels apart). ValueError (one
    line) for an unknown name or two names that set one option differently."""
    options: dict = {}
    build: dict = {}
    for part in name.split(","):
        if part not in VARIANTS:
            raise ValueError(f"unknown variant {part!r}")
        for have, new in zip((options, build), VARIANTS[part]):
            clash = [k for k, v in new.items() if k in have and have[k] != v]
            if clash:
                raise ValueError(f"variant {name!r}: {part!r} sets {clash[0]} differently")
            have.update(new)
    return options, build


def parse_variant(spec: str) -> tuple[list[str], list[int]]:
    """"NAME[/NAME...]:B1[,B2...]" -> (option names, batch sizes), a NAME being one variant or several joined by
    ',' (one build with all their options); ValueError (one line) otherwise."""
    names, _, bs = spec.partition(":")
    want = (f"--variant {spec!r}: want NAME[/NAME...]:BATCH[,BATCH...] with NAME one of {', '.join(VARIANTS)} or "
            "several joined by ','")
    if not bs or not names:
        raise ValueError(want)
    for name in names.split("/"):
        try:
            variant_options(name)
        except ValueError as e:
            raise ValueError(f"{want} ({e})") from None
    try:
        batches = [int(b) for b in bs.split(",")]
    except ValueError:
        raise ValueError(f"--variant {spec!r}: batch sizes must be integers") from None
    return names.split("/"), batches


def variant_row(args: argparse.Namespace, rec: Recorder, cm: Any, name: str, b: int, options: dict, build: dict,
                rows: list[dict], tag: str) -> None:
    """One variant row: compile, time (and profile) the W4A4 build at batch b, then its accuracy unless skipped."""
    from torch._inductor import config as inductor_config

    from msfp_compiler.export.triton.fast import build_fast

    head = args.weights.split(",")[0]
    row: dict = {"batch": b, "variant": name, "inductor_options": options, "build_fast_options": build}
    fast = build_fast(cm.graph_module, "cuda", weights=head, **build)
    row["fast_report"] = str(fast.report).split("\n")[0]
    x = inputs(b, cm.calibration.batches[0].args)
    profiles: dict[str, Any] = {}
    with inductor_config.patch(options):
        cf = compile_fast(fast, x, args.fast_mode, row, head)
    if cf is not None:
        time_fast(cf, x, row, head, args.iters, profiles if args.profile else None, tag=f"_{tag}")
        if args.fast_mode == "graph" and args.captures > 1 and f"w4a4_{head}" in row:  # after the profile, as main
            row["w4a4_capture_medians"] = [row[f"w4a4_{head}"]["median_ms"], *capture_medians(
                cf.fn, fast, x, args.captures - 1, args.iters)]
            log(f"batch {b} ({tag}): W4A4 captures {row['w4a4_capture_medians']} ms")
        if args.fast_mode == "graph" and "prefetch" not in args.skip.split(","):
            time_prefetch_decode(cf, fast, x, row, head, args.iters)
    row["w4a4_ms"] = row.get(f"w4a4_{head}", {}).get("median_ms")
    if cf is not None:  # same inputs as the reference step's (inputs() is seeded)
        try:
            out = cf(*x).float()
            if (b, head) in REF_OUT:
                ref, ref_name = REF_OUT[(b, head)]
                row["output_vs"] = {"ref": ref_name, **output_diff(out, ref)}
                log(f"batch {b} ({tag}): output vs {ref_name}'s {row['output_vs']}")
            else:  # --skip main: the first variant at this batch size is the others' reference
                REF_OUT[(b, head)] = (out.clone(), name)
        except Exception as e:  # noqa: BLE001
            row["output_vs_error"] = repr(e)[:3000]
            traceback.print_exc()
    if "conv" in name.split(","):
        row["conv_tuning"] = conv_tuning(b)
    row["profile"] = {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in profiles.items()}
    rows.append(row)
    rec.put("variants", rows)
    if args.log_dir and profiles:
        (Path(args.log_dir) / f"profile_{tag}.txt").write_text("\n\n".join(f"== {k}\n{v['table']}"
                                                                          for k, v in profiles.items()))
        (Path(args.log_dir) / f"profile_{tag}.json").write_text(json.dumps(profiles, indent=1))  # full kernel lists
        # (for tools/pointwise_roofline.py --key w4a4_b<B>_<tag>)
    if cf is not None and "accuracy" not in args.skip.split(","):  # last: the timed row is saved already
        rec.section(f"accuracy_{tag}", lambda: accuracy(cm.graph_module, cf, cm.calibration.batches[0].args,
                                                        args.accuracy_steps, b), log_chars=1500)


def conv_tuning(batch: int) -> list[dict]:
    """What the implicit conv's per-shape tuner chose and measured at this batch size: ms of im2col + cuBLAS and of
    each tile (or why it was rejected), and each tile's max difference from cuBLAS over max |y| (``err``)."""
    from msfp_compiler.export.triton import conv_fp8

    return [{"shape": str(k), "chosen": getattr(conv_fp8._BEST.get(k), "name", conv_fp8._BEST.get(k)), "ms": v,
             "err": conv_fp8.TUNE_ERRS.get(k, {})} for k, v in conv_fp8.TUNE_TIMES.items() if k[0][0] == batch]


def _conv_set(name: str) -> tuple:
    """The conv tuner's candidates of a --conv-sets name."""
    from msfp_compiler.export.triton import conv_fp8 as cv

    tiles = tuple(c for c in cv.NEW_CONFIGS if c.split_k == 1)
    return {"new": cv.CONFIGS + cv.NEW_CONFIGS, "nosplit": cv.CONFIGS + tiles, "session8": cv.CONFIGS[:3],
            "im2col": ()}[name]


def time_conv_sets(step: Any, fast: Any, x: tuple, row: dict, sets: list[str], iters: int) -> None:
    """The same compiled step with each conv shape's choice taken from another candidate set and captured once more:
    the choice is the fastest of that set (and im2col + cuBLAS) in the tuner's own record of this batch size (every
    candidate was timed at the headline's warm-up, ``conv_fp8.TIME_ALSO``), and it happens inside
    msfp_fast::conv_e4m3, so there is no recompile and no second tuning. What other candidates give in the step,
    same process; the tuner's state is restored afterwards."""
    from msfp_compiler.export.triton import conv_fp8
    from msfp_compiler.export.triton.graphed import GraphedStep

    best = dict(conv_fp8._BEST)
    for name in sets:
        try:
            names = {c.name: c for c in _conv_set(name)}
            for key, times in conv_fp8.TUNE_TIMES.items():
                if key[0][0] != row["batch"]:
                    continue
                ok = {k: v for k, v in times.items() if isinstance(v, float) and (k in names or k == conv_fp8.IM2COL)}
                pick = min(ok, key=ok.get)
                conv_fp8._BEST[key] = names.get(pick, conv_fp8.IM2COL)
            alt = GraphedStep(step.fn, fast, x)
            row[f"w4a4_conv_{name}"] = {**step_ms(lambda: alt(*x), iters),
                                        "chosen": {str(k): getattr(v, "name", v) for k, v in conv_fp8._BEST.items()
                                                   if k[0][0] == row["batch"]}}
            log(f"batch {row['batch']}: W4A4 with conv set {name}: {row[f'w4a4_conv_{name}']['median_ms']} ms")
            del alt
        except Exception as e:  # noqa: BLE001
            row[f"w4a4_conv_{name}_error"] = repr(e)[:3000]
            traceback.print_exc()
        finally:
            conv_fp8._BEST.clear()
            conv_fp8._BEST.update(best)
            torch.cuda.empty_cache()


def cached_modes(modes_arg: str, b: int, warm: tuple[Any, Path] | None, row: dict) -> list[str]:
    """The baseline modes to compile in this process: with a warm-up, only those it finished (cache hits)."""
    modes = modes_arg.split(",")
    if warm is None:
        return modes
    done = set(warm[1].read_text().split("\n")) if warm[1].exists() else set()
    for m in modes:
        if f"{m} {b}" not in done:
            row[f"bf16_compile_{m.replace('-', '_')}_skipped"] = "warm-up compile did not finish in time"
    return [m for m in modes if f"{m} {b}" in done]


def save_profiles(rec: Recorder, profiles: dict, log_dir: str | None) -> None:
    rec.put("profiles", {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in profiles.items()})
    if log_dir:
        (Path(log_dir) / "profiles.json").write_text(json.dumps(profiles, indent=1))
        (Path(log_dir) / "profiles.txt").write_text("\n\n".join(f"== {k}\n{v['table']}" for k, v in profiles.items()))


def compile_fast(fast: Any, x: tuple, mode: str, row: dict, wmode: str) -> Any:
    """torch.compile the fast W4A4 module for this batch size (two calls: compile, then CUDA graph recording).
    Mode "graph": Inductor in its default mode, the step captured by ``graphed.GraphedStep`` (one CUDA graph)."""
    from msfp_compiler.export.triton.graphed import GraphedStep

    try:
        t0 = time.perf_counter()
        if mode == "graph":
            cf = GraphedStep(torch.compile(fast, dynamic=False), fast, x)
        else:
            cf = torch.compile(fast, mode=mode, dynamic=False)
            for _ in range(2):
                torch.compiler.cudagraph_mark_step_begin()
                cf(*x)
        torch.cuda.synchronize()
        row[f"w4a4_{wmode}_compile_s"] = round(time.perf_counter() - t0, 1)
        log(f"batch {row['batch']}: W4A4 ({wmode}) torch.compile({mode}): {row[f'w4a4_{wmode}_compile_s']} s")
        return cf
    except Exception as e:  # noqa: BLE001
        row[f"w4a4_{wmode}_error"] = repr(e)[:3000]
        traceback.print_exc()
        return None


# per (batch, weights mode): the step output the variants compare theirs with, and whose it is: the headline step's
# ("main"), or with --skip main the first variant's at that batch size (an A/B like gnauto/catnhwc:1)
REF_OUT: dict[tuple[int, str], tuple[torch.Tensor, str]] = {}


def output_diff(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """A variant's step output against a reference step's on the same inputs: relative RMS difference, largest
    absolute difference, bit-equality (a rewrite that should change no rounding gives 0; on SD1.5's random weights
    one that changes any rounding already moves the output by ~0.3, as cat_nhwc did in session 16: 4-bit codes
    flip and the blocks amplify them, so only equality is a verdict there, and a wrong rewrite, order 1, is not told
    apart from a rounding change)."""
    d = out.float() - ref.float()
    return {"rel_rmse": round(float(d.norm() / ref.float().norm()), 6), "max_abs": round(float(d.abs().max()), 6),
            "equal": bool(torch.equal(out.float(), ref.float()))}


def time_fast(cf: Any, x: tuple, row: dict, wmode: str, iters: int, profiles: dict | None, tag: str = "") -> None:
    """Median step time of the compiled fast path, and its kernel profile when ``profiles`` is given; the headline
    step's output (no tag) is kept in REF_OUT for the variants' output check."""
    b = row["batch"]
    try:
        row[f"w4a4_{wmode}"] = step_ms(lambda: cf(*x), iters, mark_step=True)
        if not tag:
            REF_OUT[(b, wmode)] = (cf(*x).float().clone(), "main")  # a graphed step returns its static output buffer
        log(f"batch {b}: W4A4 ({wmode}) {row[f'w4a4_{wmode}']['median_ms']} ms")
        if profiles is not None:
            table, prow = profile_table(lambda: cf(*x), mark_step=True)
            profiles[f"w4a4_b{b}{tag}"] = {"table": table, "by_kind": categorize(prow),
                                            "kernels_per_step": kernels_per_step(prow), "rows": prow}
            log(table)
    except Exception as e:  # noqa: BLE001
        row[f"w4a4_{wmode}_error"] = repr(e)[:3000]
        traceback.print_exc()


def time_prefetch_decode(step: Any, fast: Any, x: tuple, row: dict, wmode: str, iters: int) -> None:
    """The same compiled step captured once more with the weight decode prefetched on a side stream
    (``GraphedStep(prefetch=True)``): what the overlap gains, without another compile."""
    from msfp_compiler.export.triton.graphed import GraphedStep

    try:
        ahead = GraphedStep(step.fn, fast, x, prefetch=True)
        row[f"w4a4_{wmode}_prefetch_decode"] = step_ms(lambda: ahead(*x), iters)
        log(f"batch {row['batch']}: W4A4 ({wmode}), decode on a side stream: "
            f"{row[f'w4a4_{wmode}_prefetch_decode']['median_ms']} ms")
        del ahead
    except Exception as e:  # noqa: BLE001
        row[f"w4a4_{wmode}_prefetch_decode_error"] = repr(e)[:3000]
        traceback.print_exc()


class GraphedRun:
    """A bf16 default-graph step as the timers call it (no arguments: the example inputs are fixed); ``step`` is the
    ``GraphedStep``, whose compiled function ``capture_medians`` captures again."""

    def __init__(self, step: Any, xb: tuple) -> None:
        self.step, self.xb = step, xb

    def __call__(self) -> Any:
        return self.step(*self.xb)


def compiled_baseline(unet: Any, mode: str, xb: tuple) -> Callable[[], Any]:
    """The bf16 UNet under torch.compile, compiled and warmed up: a torch.compile mode, or "default-graph"
    (Inductor's default mode captured as one CUDA graph by ``graphed.GraphedStep``, as the W4A4 step is: each call
    copies the inputs into the captured ones and replays; until session 9 the bf16 replay skipped the copies), returned
    as a ``GraphedRun``."""
    if mode == "default-graph":
        from msfp_compiler.export.triton.graphed import GraphedStep

        cb = torch.compile(unet, dynamic=False)
        return GraphedRun(GraphedStep(lambda s, t, c: cb(s, t, encoder_hidden_states=c, return_dict=False)[0], unet,
                                      xb), xb)
    cb = torch.compile(unet, mode=mode, dynamic=False)
    for _ in range(2):
        torch.compiler.cudagraph_mark_step_begin()
        cb(*xb[:2], encoder_hidden_states=xb[2], return_dict=False)
    return lambda: cb(*xb[:2], encoder_hidden_states=xb[2], return_dict=False)


def capture_medians(fn: Callable[..., Any], module: Any, example: tuple, n: int, iters: int) -> list[float]:
    """Median step times of n more CUDA-graph captures of the same compiled step (``GraphedStep``, no recompile):
    how much one capture differs from another."""
    from msfp_compiler.export.triton.graphed import GraphedStep

    out = []
    for _ in range(n):
        step = GraphedStep(fn, module, example)
        out.append(step_ms(lambda: step(*example), iters)["median_ms"])  # noqa: B023  (called before the next)
        del step
        torch.cuda.empty_cache()
    return out


def time_baselines(unet: Any, xb: tuple, row: dict, modes: list[str], iters: int, profiles: dict | None,
                   captures: int = 1) -> None:
    """bf16 eager replayed from a CUDA graph, then bf16 torch.compile in each mode (bf16_compile_<mode>_ms;
    bf16_compile_ms is the faster mode); default-graph from ``captures`` captures."""
    b = row["batch"]

    def step(s, t, c):
        return unet(s, t, encoder_hidden_states=c, return_dict=False)[0]

    try:
        from msfp_compiler.export.triton.graphed import GraphedStep

        graphed = GraphedStep(step, unet, xb)  # input copies + replay, as every one-graph step here
        replay = lambda: graphed(*xb)  # noqa: E731
        row["bf16_cudagraph"] = step_ms(replay, iters)
        row["bf16_cudagraph_ms"] = row["bf16_cudagraph"]["median_ms"]
        del replay, graphed
    except Exception as e:  # noqa: BLE001
        row["bf16_cudagraph_error"] = repr(e)[:3000]
        traceback.print_exc()
    log(f"batch {b}: bf16 eager+CUDA graph {row.get('bf16_cudagraph_ms')} ms")
    for mode in modes:
        key = f"bf16_compile_{mode.replace('-', '_')}"
        try:
            t0 = time.perf_counter()
            run = compiled_baseline(unet, mode, xb)
            row[f"{key}_s"] = round(time.perf_counter() - t0, 1)
            row[key] = {**step_ms(run, iters, mark_step=True), "mode": mode}
            row[f"{key}_ms"] = row[key]["median_ms"]
            log(f"batch {b}: bf16 torch.compile({mode}) {row[f'{key}_ms']} ms (compile {row[f'{key}_s']} s)")
            if profiles is not None:  # before the re-captures, as for W4A4: profiling the first capture after
                # them ended the session-11 process with a segfault (batch 8, three captures)
                table, prow = profile_table(run, mark_step=True)
                profiles[f"bf16_{mode}_b{b}"] = {"table": table, "by_kind": categorize(prow),
                                                 "kernels_per_step": kernels_per_step(prow), "rows": prow}
                log(table)
            if mode == "default-graph" and captures > 1:
                row[f"{key}_capture_medians"] = [row[f"{key}_ms"], *capture_medians(run.step.fn, unet, xb,
                                                                                   captures - 1, iters)]
                log(f"batch {b}: bf16 default-graph captures {row[f'{key}_capture_medians']} ms")
            del run
        except Exception as e:  # noqa: BLE001
            row[f"{key}_error"] = repr(e)[:3000]
            traceback.print_exc()
    done = {m: row[f"bf16_compile_{m.replace('-', '_')}_ms"] for m in modes
            if f"bf16_compile_{m.replace('-', '_')}_ms" in row}
    if done:  # the bf16_compile_ms: the faster torch.compile mode measured
        row["bf16_compile_mode"] = min(done, key=done.get)
        row["bf16_compile_ms"] = done[row["bf16_compile_mode"]]


def compiled_quantizer_check(n: int = 1 << 24) -> dict:
    """The fast path's activation quantizer (``fake_quant`` of bf16 inputs, as in the graph) compiled by Inductor
    for the GPU against the same ops run eagerly on the GPU and on the CPU: how many of n values land on another
    grid level. Inductor's Triton code divides with ``x / y`` (PTX div.full.f32, within 2 ulp) unless its config asks
    for IEEE division, while eager CUDA and the CPU divide exactly; grid_round itself is bit-exact (tested)."""
    from msfp_compiler.export.triton.fast import fake_quant

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=gen) * 3).bfloat16()
    res: dict = {"values": n}
    for fmt, scale, zero in (("e2m1", 0.37, 0.0), ("ue2m2", 0.113, -0.2785), ("int4", 0.0917, 0.0),
                             ("e3m0", 0.021, 0.0)):
        s, z = torch.tensor(scale, device="cuda"), torch.tensor(zero, device="cuda")
        xc = x.cuda()
        fn = torch.compile(lambda v: fake_quant(v, s, z, fmt, out_dtype=torch.float32), dynamic=False)
        got, eager = fn(xc).cpu(), fake_quant(xc, s, z, fmt, out_dtype=torch.float32).cpu()
        cpu = fake_quant(x, s.cpu(), z.cpu(), fmt, out_dtype=torch.float32)
        res[fmt] = {"scale": scale, "zero": zero, "compiled_vs_eager_cuda": int((got != eager).sum()),
                    "eager_cuda_vs_cpu": int((eager != cpu).sum())}
        torch._dynamo.reset()
    return res


def fake_quant_bandwidth() -> dict:
    """Fake quantization (export/triton/kernels.py) per tensor / per output channel vs a device copy, GB/s."""
    from msfp_compiler.export.triton import kernels as K

    out: dict[str, Any] = {}
    x = torch.randn(4096, 65536, device="cuda")
    y = torch.empty_like(x)
    copy_ms = kernel_ms(lambda: y.copy_(x))
    gb = 2 * x.numel() * 4 / 1e9
    out["copy_GBps"] = round(gb / copy_ms * 1e3, 1)
    s1, z1 = torch.tensor(0.05, device="cuda"), torch.tensor(0.0, device="cuda")
    sc = (torch.rand(4096, 1, device="cuda") * 0.05 + 0.01)
    zc = torch.zeros(4096, 1, device="cuda")
    for name, s, z in (("per_tensor_e2m1", s1, z1), ("per_channel_e2m1", sc, zc)):
        ms = kernel_ms(lambda: K.quantize(x, s, z, "e2m1"))
        out[name] = {"GBps": round(gb / ms * 1e3, 1), "of_copy": round(copy_ms / ms, 3)}
    xb = x.bfloat16()
    yb = torch.empty_like(xb)
    copy_b = kernel_ms(lambda: yb.copy_(xb))
    ms = kernel_ms(lambda: K.quantize(xb, s1, z1, "ue3m1"))
    out["bf16_per_tensor_ue3m1"] = {"of_copy": round(copy_b / ms, 3)}
    return out


def wait_warm(warm: Any, timeout: float) -> dict:
    """Wait for the warm-up process up to ``timeout`` seconds, then stop it (its unfinished compiles are skipped)."""
    import subprocess

    t0 = time.perf_counter()
    try:
        rc = warm.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        warm.kill()
        rc = f"killed after {timeout:.0f} s"
    log(f"waited {time.perf_counter() - t0:.1f} s for the baseline warm-up process (rc {rc})")
    return {"rc": rc, "waited_s": round(time.perf_counter() - t0, 1)}


def warm_baseline(batches: list[int], mode: str, done: Path) -> int:
    """Compile the bf16 baseline once per batch size and mode (fills the Inductor caches); nothing is timed. Each
    finished compile appends "mode batch" to ``done``."""
    unet = build_sd15().unet.to("cuda", torch.bfloat16).eval()
    example = (torch.zeros(1, 4, 64, 64), torch.zeros(1, dtype=torch.int64), torch.zeros(1, 77, 768))
    for m in mode.split(","):  # the cheap mode for every batch first
        for b in batches:
            x = bf16_inputs(inputs(b, example))
            t0 = time.perf_counter()
            with torch.no_grad():
                cb = torch.compile(unet, mode=None if m == "default-graph" else m, dynamic=False)
                cb(*x[:2], encoder_hidden_states=x[2], return_dict=False)
            log(f"warm-up: bf16 torch.compile({m}) batch {b}: {time.perf_counter() - t0:.1f} s")
            torch._dynamo.reset()
            with done.open("a") as f:
                f.write(f"{m} {b}\n")
    return 0


def accuracy(gm: Any, fast: Any, example: tuple, steps: int, batch: int) -> dict:
    """Per-step rel-RMSE of the compiled fast path's eps vs the float32 fake-quant reference on the reference's own
    DDIM trajectory (both see the same x_t at every step)."""
    from msfp_compiler.export.triton.runtime import TritonRunner
    from msfp_compiler.sampling import linear_alphas_cumprod

    ref = TritonRunner(gm, fuse=False)
    x, _, cond = inputs(batch, example)  # the inputs the fast path was compiled (and CUDA-graphed) for
    ac = linear_alphas_cumprod(1000, 0.00085, 0.012)
    ts = list(range(999, -1, -1000 // steps))[:steps]
    out = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((batch,), t, dtype=example[1].dtype, device="cuda")
            e_ref = ref(x, tt, cond).double()
            torch.compiler.cudagraph_mark_step_begin()
            e_fast = fast(x, tt, cond).double()
            dims = tuple(range(1, e_ref.dim()))
            err = ((e_fast - e_ref).pow(2).sum(dims).sqrt() / e_ref.pow(2).sum(dims).sqrt()).tolist()
            out.append({"t": t, "rel_rmse_per_sample": [round(v, 5) for v in err]})
            a_t = ac[t]
            a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a_t) ** 0.5 * e_ref.float()) / a_t ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e_ref.float()
    return {"steps": out, "reference": "same GraphModule, float32, unfused, registered Triton fake-quant kernels",
            "batch": batch}


def digits_accuracy(device: str, steps: int = 20, n: int = 32, compiled: bool = False,
                    options: dict | None = None) -> dict:
    """The trained digits UNets (examples/), compiled with the CLI defaults: DDIM samples of the fast path (bf16
    activations, FP8 GEMMs; ``device``; ``options``: build_fast keyword arguments) vs onnxruntime on the CPU (the
    deployment reference) vs the float32 graph, same seeds. PSNR over images in [-1, 1] (peak-to-peak 2), and the
    per-step eps rel-RMSE on ORT's trajectory."""
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CompileConfig
    from msfp_compiler.export.ort import OrtUNet, ddim_sample, session_from_model
    from msfp_compiler.export.triton.fast import build_fast
    from msfp_compiler.load import load_model

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = float((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)).pow(2).mean())
        return round(10 * math.log10(4.0 / max(mse, 1e-20)), 2)

    out: dict[str, Any] = {"steps": steps, "samples": n, "device": device, "compiled": compiled,
                           "build_fast_options": options or {}}
    for name in ("digits-uncond", "digits-cond"):
        loaded = load_model(ROOT / "examples" / name)
        cm = msfp_compile(loaded, CompileConfig(), progress=False)
        ort_unet = OrtUNet(session_from_model(cm.onnx_model))
        fast = build_fast(cm.graph_module, device, **(options or {}))
        fn = torch.compile(fast) if compiled else fast
        cond = None
        if ort_unet.cond:
            labels = torch.arange(n) % 10
            cond = loaded.class_embedding[labels].unsqueeze(1).float()

        def fast_call(x, t, c=None):
            args = (x.to(device), t.to(device)) + ((c.to(device),) if c is not None else ())
            return fn(*args).float().cpu()

        kw = dict(channels=ort_unet.channels, size=ort_unet.size, progress=False)
        s_ort = ddim_sample(ort_unet, n, steps, 0, cond, loaded.scheduler_config, **kw)
        s_fast = ddim_sample(fast_call, n, steps, 0, cond, loaded.scheduler_config, **kw)
        s_ref = ddim_sample(lambda *a: cm.graph_module(*a), n, steps, 0, cond, loaded.scheduler_config, **kw)
        # per-step eps difference of the fast path on ORT's own trajectory (both see the same x_t)
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(loaded.scheduler_config)
        sched.set_timesteps(steps)
        x = torch.randn(n, ort_unet.channels, ort_unet.size, ort_unet.size, generator=torch.Generator().manual_seed(0))
        per_step = []
        for t in sched.timesteps:
            tt = torch.full((n,), int(t), dtype=torch.int64)
            e_ort = ort_unet.eps(x, tt, cond)  # calling OrtUNet returns a diffusers output object
            e_fast = fast_call(x, tt, cond)
            per_step.append(round(float((e_fast - e_ort).norm() / e_ort.norm()), 5))
            x = sched.step(e_ort, t, x).prev_sample
        out[name] = {"psnr_fast_vs_ort_db": psnr(s_fast, s_ort), "psnr_torch_fp32_graph_vs_ort_db": psnr(s_ref, s_ort),
                     "eps_rel_rmse_fast_vs_ort_per_step": per_step, "report": str(fast.report).split("\n")[0]}
        log(f"{name}: {out[name]}")
    return out


def sample_cli(cm: Any, path: str, rec: Recorder) -> None:
    from msfp_compiler.cli import sample_main

    t0 = time.perf_counter()
    cm.save_pt2(path)
    rc = sample_main([path, "--backend", "triton", "--out", str(Path(path).with_suffix(".png")), "--steps", "2",
                      "-n", "1"])
    rec.put("msfp_sample_triton", {"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                                   "pt2_bytes": Path(path).stat().st_size})


if __name__ == "__main__":
    sys.exit(main())
