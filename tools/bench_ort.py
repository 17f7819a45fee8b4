"""ORT CPU latency of the compiled (quantized) ONNX vs the FP32 ONNX of the same UNet, with an op-level profile.

For each example model (examples/digits-uncond, examples/digits-cond):
- FP32 ONNX: ``capture`` + ``lower_to_onnx`` of the unquantized graph (same exporter, same opset);
- quantized ONNX: ``msfp_compiler.compile`` with the default config (MSFP, packed 4-bit weights);
- optionally the same quantized graph with the msfp function bodies of an older revision of export/onnx.py
  (``--baseline-rev``), so old and new bodies are timed in the same process, interleaved, on the same inputs.
Latency is the median of interleaved single runs (variants alternate, so a change in machine load hits all of
them alike) at batch 1 and 16, for a few session-option settings. One profiled session per quantized variant
(``SessionOptions.enable_profiling``) attributes kernel time to op types and to the msfp functions (inlined body
nodes carry the function's name, see export/onnx.py). The machine is shared: every run records os.getloadavg().

    python tools/bench_ort.py                                   # writes results/bench_ort.json
    python tools/bench_ort.py --baseline-rev 3a1dc93 --iters 60 # also time the bodies of that commit
    python tools/bench_ort.py --verify                          # dense bit-exactness sweep of the bodies first
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "results" / "bench_ort.json"
MODELS = {"digits-uncond": ROOT / "examples" / "digits-uncond", "digits-cond": ROOT / "examples" / "digits-cond",
          "sd15": None}  # sd15: the Stable Diffusion 1.5 UNet config with random weights (tools/unet_configs.py)
GOAL_RATIO = 1.3
OPT_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
SWEEP_FORMATS = ["e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]


# ---- models ----

def build_sd15(work: Path) -> dict[str, Path]:
    """FP32 and quantized ONNX (external data, > 2 GB) of the SD1.5 UNet with random weights, quantized with the
    calibration of tools/bench_compile.py (2 samples x 4 DDIM steps, 77-token text states); cached in `work`."""
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CalibConfig, CompileConfig
    from msfp_compiler.export.onnx import lower_fp32, save_atomic
    from msfp_compiler.load import LoadedModel, model_from_config

    sys.path.insert(0, str(ROOT / "tools"))
    from unet_configs import SD15_UNET_CONFIG

    fp32, quant = work / "sd15.fp32.onnx", work / "sd15.msfp.onnx"
    if fp32.is_file() and quant.is_file():
        return {"fp32": fp32, "msfp": quant}
    torch.manual_seed(0)
    with torch.no_grad():
        unet = model_from_config(dict(SD15_UNET_CONFIG), "sd15 config").eval()
    if not quant.is_file():
        calib = CalibConfig(num_samples=2, num_steps=4, num_groups=2, holdout_samples=0, text_len=77)
        cm = msfp_compile(LoadedModel(unet, Path("<sd15 config>")), CompileConfig(calib=calib), progress=False)
        cm.save(quant)
        del cm
    if not fp32.is_file():
        save_atomic(lower_fp32(unet, cond_len=77), fp32)
    return {"fp32": fp32, "msfp": quant}


def build_models(name: str, work: Path, seed: int = 0) -> dict[str, Path]:
    """FP32, quantized (default config) and quantized without zero-point folding ONNX files (cached in `work`)."""
    if name == "sd15":
        return build_sd15(work)
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CompileConfig
    from msfp_compiler.export.onnx import lower_fp32, save_atomic
    from msfp_compiler.load import load_model

    fp32, quant, nofold = (work / f"{name}.{k}.onnx" for k in ("fp32", "msfp", "msfp_nofold"))
    loaded = load_model(MODELS[name])
    if not quant.is_file():
        msfp_compile(loaded, CompileConfig(), progress=False).save(quant)
    if not nofold.is_file():
        # zero points kept in the quantizers: no explicit Pad in front of padded convs (see the profile)
        msfp_compile(loaded, CompileConfig(fold_zero_point=False), progress=False).save(nofold)
    if not fp32.is_file():
        save_atomic(lower_fp32(loaded.unet), fp32)
    return {"fp32": fp32, "msfp": quant, "msfp_nofold": nofold}


def _load_module_at_rev(rev: str, relpath: str, name: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{relpath}"], check=True, capture_output=True,
                         text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / f"{name}.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location(name, tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # onnxscript.script looks its defining module up
    spec.loader.exec_module(mod)
    return mod


def with_bodies_of(rev: str, quant: Path, out: Path) -> Path:
    """The same quantized graph with the msfp function bodies (and node tables) of export/onnx.py at `rev`."""
    old = _load_module_at_rev(rev, "export/onnx.py", f"msfp_onnx_{rev}")
    m = onnx.load(str(quant))
    keep = {"format", "shape", "keep_zero_point"}
    known = {f.name for f in old.msfp_functions(20)}
    for n in m.graph.node:
        if n.domain != old.MSFP_DOMAIN:
            continue
        if n.op_type not in known:  # an op type the old lowering did not have: map to its old spelling
            n.op_type = old.quantize_op_type(next(a.s.decode() for a in n.attribute if a.name == "format"))
        n.overload = ""  # the old lowering had one body per op type
        attrs = [a for a in n.attribute if a.name in keep]
        del n.attribute[:]
        n.attribute.extend(attrs)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    del m.functions[:]
    old.annotate_msfp_nodes(m)
    funcs = old.msfp_functions(opset)
    for f in funcs:  # name the body nodes as the current lowering does, so the profile can attribute them
        for i, n in enumerate(f.node):
            n.name = n.name or f"{f.name}.{i}.{n.op_type}"
    m.functions.extend(funcs)
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


# ---- timing ----

def session(path: Path, threads: int, opt: str, profile_prefix: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Sessions are timed interleaved; a pool that spin-waits after its run would steal the cores from the next
    # session's run (2 threads on 2 cores: FP32 itself ran 2.6x slower than with 1 thread).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    from msfp_compiler.export.ort import open_session

    # as msfp-sample opens a model: packed weights decoded before ORT sees them (the same graph after ORT's own
    # constant folding, without its memory peak)
    return open_session(path, options=so)


def feeds_for(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [batch] + [int(d) for d in i.shape[1:]]
        if i.type == "tensor(int64)":
            out[i.name] = rng.integers(0, 1000, size=shape, dtype=np.int64)
        else:
            out[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def interleaved_latency(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], iters: int,
                        warmup: int = 3) -> dict[str, dict]:
    """Median/min/p90 of single runs, variants alternating run by run (load changes hit all alike)."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feeds)
    order = list(sessions)
    for i in range(iters):
        for k in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": round(1e3 * float(np.median(v)), 3), "min_ms": round(1e3 * float(np.min(v)), 3),
                "p90_ms": round(1e3 * float(np.percentile(v, 90)), 3), "runs": len(v)} for k, v in times.items()}


# ---- profiling ----

def _function_of(node_name: str) -> str | None:
    """Inlined function body nodes are named '_inlfunc_<Function>_..._<Function>/<step>' by ORT."""
    if not node_name.startswith("_inlfunc_"):
        return None
    rest = node_name[len("_inlfunc_"):]
    return rest.split("_", 1)[0]


def profile(path: Path, feeds: dict[str, np.ndarray], threads: int, opt: str, runs: int, work: Path) -> dict:
    sess = session(path, threads, opt, profile_prefix=str(work / f"prof_{path.stem}"))
    for _ in range(runs + 2):
        sess.run(None, feeds)
    prof_file = sess.end_profiling()
    events = json.loads(Path(prof_file).read_text())
    Path(prof_file).unlink()
    runs_ev = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    node_ev = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total_runs = max(len(runs_ev), 1)
    by_op: collections.Counter = collections.Counter()
    by_fn: collections.Counter = collections.Counter()
    by_fn_op: collections.Counter = collections.Counter()
    nodes_per_run = len(node_ev) / total_runs
    for e in node_ev:
        op = e["args"].get("op_name", "?")
        fn = _function_of(e["name"][: -len("_kernel_time")])
        by_op[op] += e["dur"]
        by_fn[fn or "(model ops)"] += e["dur"]
        if fn:
            by_fn_op[f"{fn}/{op}"] += e["dur"]
    kernel_us = sum(by_op.values())
    per_run = lambda us: round(us / total_runs / 1e3, 3)  # noqa: E731  (microseconds summed -> ms per run)
    return {
        "runs": total_runs,
        "model_run_ms_median": round(float(np.median([e["dur"] for e in runs_ev])) / 1e3, 3) if runs_ev else None,
        "kernel_ms_per_run": per_run(kernel_us),
        "kernels_per_run": round(nodes_per_run),
        "by_op_type_ms": {k: per_run(v) for k, v in by_op.most_common(15)},
        "by_function_ms": {k: per_run(v) for k, v in by_fn.most_common()},
        "msfp_share_of_kernel_time": round(sum(v for k, v in by_fn.items() if k != "(model ops)") / kernel_us, 4),
        "top_function_ops_ms": {k: per_run(v) for k, v in by_fn_op.most_common(12)},
    }


def optimized_node_counts(path: Path, threads: int, opt: str, work: Path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.log_severity_level = 3
    out = work / f"{path.stem}.{opt}.optimized.onnx"
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(out))
    out.unlink()
    c = collections.Counter(n.op_type for n in m.graph.node)
    return {"nodes": sum(c.values()), **dict(c.most_common(8))}


# ---- bit-exactness sweep of the function bodies ----

def bodies_for(fmt: str) -> list[tuple[str, str]]:
    """(op type, overload) of every function body the lowering may pick for a format, plus the default ones."""
    from msfp_compiler.formats import FPFormat
    from msfp_compiler.ops import get_format

    f = get_format(fmt)
    if not isinstance(f, FPFormat):
        return [("QuantizeInt", "")]
    out = [("QuantizeLUT", "")]  # the table body is valid for every grid
    if f.man_bits == 0:
        out.append(("QuantizeLUT", "pow2"))
    else:
        out.append(("QuantizeFP", ""))
        if not f.signed:
            out.append(("QuantizeFP", "unsigned"))
    return out


def sweep(formats: list[str], stride: int = 7, scale1_stride: int = 1) -> dict:
    """Bit-exactness of every msfp quantize body vs torch.ops.msfp.quantize / quantize_folded, in ORT.

    At scale 1 / zero point 0: every `scale1_stride`-th float32 (default: every one) from 0 to 1.25x the format's
    max (both signs for signed formats).
    At two non-trivial (scale, zero point) pairs, plain and folded: x = zp + v * scale for every `stride`-th float32
    v in the same range, both signs. Comparison is bitwise after mapping -0.0 to +0.0.
    """
    import msfp_compiler.ops  # noqa: F401
    from onnx import TensorProto

    from msfp_compiler.export.msfp_ops import single_op_model
    from msfp_compiler.ops import get_format

    def body(op_type: str, overload: str, fmt: str, scale: float, zp: float, keep: float) -> ort.InferenceSession:
        # scale and zero point are initializers, as in a compiled model, so ORT's constant folding and fusions run
        m = single_op_model(op_type, fmt, {"x": (TensorProto.FLOAT, ["n"]), "scale": np.array(scale, np.float32),
                                           "zero_point": np.array(zp, np.float32)}, ["n"], overload=overload,
                            keep_zero_point=keep)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    out = {}
    chunk = 1 << 23
    for fmt in formats:
        f = get_format(fmt)
        top = int(np.float32(f.max * 1.25).view(np.int32))
        zp = 0.0 if f.signed else -0.4125
        cases = [(1.0, 0.0, 1.0, scale1_stride), (0.0371, zp, 1.0, stride), (0.0371, zp, 0.0, stride),
                 (3.3, 1.7, 1.0, stride)]
        bodies = bodies_for(fmt)
        res = {f"{op}{'/' + ov if ov else ''}": {"values": 0, "mismatches": 0} for op, ov in bodies}
        t0 = time.perf_counter()
        for scale, z, keep, step in cases:
            sessions = {k: body(op, ov, fmt, scale, z, keep) for k, (op, ov) in zip(res, bodies)}
            s_t, z_t = torch.tensor(scale), torch.tensor(z)
            ref_op = torch.ops.msfp.quantize if keep else torch.ops.msfp.quantize_folded
            for lo in range(0, top + 1, chunk * step):
                v = np.arange(lo, min(lo + chunk * step, top + 1), step, dtype=np.int64).astype(np.int32)
                v = v.view(np.float32)
                if f.signed or scale != 1.0:
                    v = np.concatenate([v, -v])
                x = v if scale == 1.0 and z == 0.0 else (np.float32(z) + v * np.float32(scale)).astype(np.float32)
                ref = ref_op(torch.from_numpy(x), s_t, z_t, fmt).numpy() + np.float32(0)
                for k, sess in sessions.items():
                    y = sess.run(None, {"x": x})[0] + np.float32(0)  # -0 -> +0
                    res[k]["values"] += x.size
                    res[k]["mismatches"] += int(np.count_nonzero(y.view(np.int32) != ref.view(np.int32)))
        out[fmt] = {"bodies": res, "stride_scale1": scale1_stride, "stride_nontrivial": stride,
                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  sweep {fmt:<6} " + "  ".join(f"{k}: {r['values']:,d} values {r['mismatches']} mismatches"
                                             for k, r in res.items()), flush=True)
    return out


# ---- driver ----

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--iters", type=int, default=40, help="timed runs per variant and setting")
    ap.add_argument("--threads", default="2,1", help="intra-op thread counts to time")
    ap.add_argument("--opt-levels", default="all,extended,basic")
    ap.add_argument("--baseline-rev", help="also time the msfp function bodies of export/onnx.py at this git rev")
    ap.add_argument("--work", help="folder for the ONNX files (reused when present); default: a temp folder")
    ap.add_argument("--verify", action="store_true", help="run the bit-exactness sweep of the function bodies")
    ap.add_argument("--verify-only", action="store_true",
                    help="only the sweep, merged into the existing --out JSON (latency results kept)")
    ap.add_argument("--sweep-formats", default=",".join(SWEEP_FORMATS))
    ap.add_argument("--sweep-scale1-stride", type=int, default=1,
                    help="float32 bit-pattern stride at scale 1 (1 = every float32)")
    ap.add_argument("--sweep-stride", type=int, default=7,
                    help="float32 bit-pattern stride of the sweep at non-trivial scale / zero point")
    ap.add_argument("--no-profile", action="store_true", help="skip the ORT op profile (long on sd15)")
    ap.add_argument("--out", default=str(OUT_JSON))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ort_"))
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    opts = [o for o in args.opt_levels.split(",") if o]
    result: dict = {"onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                    "goal_ratio": GOAL_RATIO, "iters": args.iters, "baseline_rev": args.baseline_rev,
                    "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip(), "models": {},
                    "note": "latency: median of interleaved single runs (intra-op pools do not spin between runs); "
                            "msfp = default compile; msfp_nofold = CompileConfig(fold_zero_point=False); "
                            "msfp@REV = the same quantized graph with the function bodies of REV; ratios vs the "
                            "FP32 ONNX of the same UNet. sweep: ORT vs torch.ops.msfp.quantize, bitwise up to the "
                            "sign of zero"}
    if args.verify or args.verify_only:
        print("bit-exactness sweep of the msfp function bodies (ORT vs torch.ops.msfp.quantize)", flush=True)
        fmts = [f for f in args.sweep_formats.split(",") if f]
        result["sweep"] = sweep(fmts, args.sweep_stride, args.sweep_scale1_stride)
        result["sweep_loadavg"] = os.getloadavg()
    if args.verify_only:
        out = Path(args.out)
        merged = json.loads(out.read_text()) if out.is_file() else {}
        merged.setdefault("sweep", {}).update(result["sweep"])  # formats not swept this time keep their rows
        merged["sweep_loadavg"] = result["sweep_loadavg"]
        out.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    for name in [m for m in args.models.split(",") if m]:
        print(f"bench_ort: {name}", flush=True)
        paths = build_models(name, work)
        if args.baseline_rev:
            paths["msfp@" + args.baseline_rev] = with_bodies_of(args.baseline_rev, paths["msfp"],
                                                                work / f"{name}.msfp_{args.baseline_rev}.onnx")
        entry: dict = {"files": {k: {"path": str(p), "bytes": sum(f.stat().st_size for f in (p, Path(f"{p}.data"))
                                                                  if f.is_file())} for k, p in paths.items()},
                       "latency": [], "profile": {}, "optimized_graph": {}}
        for opt in opts:
            for th in threads:
                sessions = {k: session(p, th, opt) for k, p in paths.items()}
                for b in batches:
                    feeds = feeds_for(sessions["fp32"], b)
                    load = os.getloadavg()
                    lat = interleaved_latency(sessions, feeds, args.iters)
                    row = {"opt_level": opt, "threads": th, "batch": b, "loadavg": [round(x, 2) for x in load],
                           "ms": lat, "ratio_vs_fp32": {k: round(v["median_ms"] / lat["fp32"]["median_ms"], 3)
                                                        for k, v in lat.items() if k != "fp32"}}
                    entry["latency"].append(row)
                    print(f"  opt={opt:<8} threads={th} batch={b:<3} " + "  ".join(
                        f"{k}={v['median_ms']:.2f}ms" for k, v in lat.items()) + "  ratio " + " ".join(
                        f"{k}={r:.2f}x" for k, r in row["ratio_vs_fp32"].items()) + f"  load {load[0]:.1f}", flush=True)
                del sessions
        prof_opt, prof_threads = opts[0], threads[0]
        for b in batches if not args.no_profile else []:
            for k, p in paths.items():
                feeds = feeds_for(session(paths["fp32"], 1, "basic"), b)
                entry["profile"][f"{k}@batch{b}"] = profile(p, feeds, prof_threads, prof_opt, 10, work)
        for k, p in paths.items() if not args.no_profile else []:
            entry["optimized_graph"][k] = optimized_node_counts(p, prof_threads, prof_opt, work)
        # headline: default session options (opt level all, 2 threads) at each batch
        entry["headline"] = {f"batch{r['batch']}": r["ratio_vs_fp32"] for r in entry["latency"]
                             if r["opt_level"] == "all" and r["threads"] == max(threads)}
        result["models"][name] = entry
    result["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "sweep" not in result and out.is_file():  # keep an earlier --verify-only sweep
        old = json.loads(out.read_text())
        result.update({k: old[k] for k in ("sweep", "sweep_loadavg") if k in old})
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
