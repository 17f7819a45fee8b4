"""Compile benchmark: per-pass time and peak memory (RSS) of ``msfp_compiler.compile`` on three UNets.

Models (random weights are built from configs in code; nothing is downloaded):
- ``demo``:  the project's trained digits UNet (examples/digits-uncond), with the CLI's default calibration
- ``cifar10``: UNet2DModel of google/ddpm-cifar10-32 size (35.7M parameters), random weights
- ``sd15``:  the Stable Diffusion 1.5 UNet2DConditionModel config (860M parameters), random weights, 64x64x4
  latents and 77x768 text states, minimal PTQ calibration (2 samples x 4 DDIM steps, 2 timestep groups)
- ``sd15-defaults``: the same UNet with what ``msfp-compile MODEL --out X --text-len 77`` does by default: the
  calibration size from ``calibration.default_calibration`` (scaled to the parameter count), 4 timestep groups, no
  hold-out (no --check), every other option at its default

Each model runs in its own subprocess, so its peak RSS is its own. Inside that process the kernel's peak-RSS
counter (VmHWM) is reset before every stage (``/proc/self/clear_refs``), so "peak_rss_mb" of a stage is the peak
*during* that stage (including the model weights resident at the time), not since process start. The load average
is recorded because the benchmark machine is shared: times are wall-clock and noisy.

    python tools/bench_compile.py                       # all three, writes results/bench_compile.json
    python tools/bench_compile.py --models demo,cifar10 # a subset (other models' entries are kept)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = ROOT / "results" / "bench_compile.json"
sys.path.insert(0, str(ROOT / "tools"))
from unet_configs import CIFAR10_DDPM_CONFIG, SD15_UNET_CONFIG  # noqa: E402

# Calibration per model: the demo and CIFAR-size runs use the CLI defaults (8 samples x 10 steps, 4 groups,
# 2 held out); SD1.5 the minimum that still has two timestep groups, no hold-out (no --check on SD1.5), and
# 77-token text states as SD pipelines always pass.
CALIB = {
    "demo": dict(num_samples=8, num_steps=10, num_groups=4, holdout_samples=2),
    "cifar10": dict(num_samples=8, num_steps=10, num_groups=4, holdout_samples=2),
    "sd15": dict(num_samples=2, num_steps=4, num_groups=2, holdout_samples=0, text_len=77),
    "sd15-defaults": None,  # the CLI's default rule, see _calib_config
}
MODELS = tuple(CALIB)
GOAL_SD15_SECONDS = 600.0
GOAL_SD15_RSS_X_FP32 = 3.0


# ---- measurement helpers (run inside the per-model subprocess) ----

def _row(run) -> dict:
    """One stage or pass of the PassManager's measurements (wall, CPU, its own peak RSS) as a JSON row."""
    row = {"name": run.name, "seconds": round(run.seconds, 3), "cpu_seconds": round(run.cpu_seconds, 2),
           "peak_rss_mb": round(run.peak_rss_mb, 1)}
    if run.nodes_before:
        row |= {"nodes_before": run.nodes_before, "nodes_after": run.nodes_after}
    return row


def _build(model: str):
    import torch

    from msfp_compiler.load import LoadedModel, load_model, model_from_config

    if model == "demo":
        return load_model(ROOT / "examples" / "digits-uncond")
    cfg = {"cifar10": CIFAR10_DDPM_CONFIG, "sd15": SD15_UNET_CONFIG, "sd15-defaults": SD15_UNET_CONFIG}[model]
    torch.manual_seed(0)
    with torch.no_grad():
        unet = model_from_config(dict(cfg), f"{model} config").eval()
    return LoadedModel(unet, Path(f"<{model} config, random weights>"))


def _calib_config(model: str, n_params: int):
    """The calibration of a benchmark row: fixed, or (sd15-defaults) what the CLI picks without options."""
    from msfp_compiler.calibration import default_calibration
    from msfp_compiler.config import CalibConfig

    if CALIB[model] is not None:
        return CalibConfig(**CALIB[model])
    samples, steps, groups, rule = default_calibration(n_params)
    return CalibConfig(num_samples=samples, num_steps=steps, num_groups=groups, holdout_samples=0, text_len=77,
                       note=rule)


def _compile_and_save(loaded, calib_cfg, work: Path, meter, ort_load: bool):
    """compile() as msfp-compile runs it, then save (and optionally open an ORT session), the last two measured by
    ``meter``; returns (CompiledModel, compile seconds, the written ONNX files)."""
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CompileConfig

    t0 = time.perf_counter()
    # compile() calibrates itself, as msfp-compile does: through the captured graph, so the same forwards give the
    # activation statistics (a calibration set passed in would cost annotate_sign a forward per batch again).
    cm = msfp_compile(loaded, CompileConfig(calib=calib_cfg), log_dir=work / "logs", progress=False)
    compile_s = time.perf_counter() - t0
    out = work / "model.onnx"
    with meter.stage("save"):
        cm.save(out)
    files = sorted(p for p in work.iterdir() if p.name.startswith("model.onnx"))
    if ort_load:
        with meter.stage("ort_session"):
            from msfp_compiler.export.ort import open_session

            sess = open_session(out)
            del sess
    return cm, compile_s, files


def _sd15_goal(rows: list[dict], peak: float, fp32_bytes: int) -> dict:
    """The goal is stated for the compile on a calibrated model (what `msfp-compile` does after loading):
    calibration + capture + passes + lowering + save; building random weights is not part of it."""
    goal_rows = [r for r in rows if r["name"] not in ("build", "ort_session")]
    compile_total = sum(r["seconds"] for r in goal_rows)
    return {"seconds": GOAL_SD15_SECONDS, "calibrate_compile_save_seconds": round(compile_total, 1),
            "calibrate_compile_save_cpu_seconds": round(sum(r["cpu_seconds"] for r in goal_rows), 1),
            "seconds_met": compile_total < GOAL_SD15_SECONDS,
            "peak_rss_x_fp32": GOAL_SD15_RSS_X_FP32, "peak_rss_met": peak * 2**20 < 3 * fp32_bytes}


def _entry(model: str, loaded, calib_cfg, cm, rows: list[dict], files: list[Path], compile_s: float,
           total_s: float, load0: tuple[float, ...]) -> dict:
    """The model's JSON entry: sizes, calibration, per-stage rows, totals, ONNX files and the load average."""
    import torch

    from msfp_compiler.capture import signature_of

    unet = loaded.unet
    n_params = sum(p.numel() for p in unet.parameters())
    fp32_bytes = sum(t.numel() * 4 for t in unet.state_dict().values() if t.is_floating_point())
    sig = signature_of(unet, cond_len=calib_cfg.text_len)
    calib = cm.calibration
    cond_shape = list(calib.batches[0].cond.shape) if calib.batches[0].cond is not None else None
    onnx_bytes = sum(p.stat().st_size for p in files)
    peak = max(r["peak_rss_mb"] for r in rows)
    entry = {
        "model": model,
        "source": str(loaded.source.relative_to(ROOT)) if loaded.source.is_absolute() else str(loaded.source),
        "class": type(unet).__name__,
        "params": n_params,
        "fp32_weight_bytes": fp32_bytes,
        "input": {"sample": list(calib.batches[0].sample.shape), sig.cond or "cond": cond_shape},  # one batch
        "calibration": {k: getattr(calib_cfg, k) for k in ("num_samples", "num_steps", "num_groups",
                                                           "holdout_samples", "text_len", "note")},
        "stages": rows,  # build, capture, calibrate, each pass, lower_onnx, save[, ort_session], in order
        "compile_seconds": round(compile_s, 2),  # msfp_compiler.compile() (capture, calibration, passes, lowering)
        "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 1),  # process CPU time, all threads, all stages
        "total_seconds": round(total_s, 2),  # build + calibration + compile + save (+ ORT session)
        "peak_rss_mb": round(peak, 1),
        "peak_rss_x_fp32_weights": round(peak * 2**20 / fp32_bytes, 3),
        "onnx_files": {p.name: p.stat().st_size for p in files},
        "onnx_bytes": onnx_bytes,
        "onnx_bytes_x_fp32_weights": round(onnx_bytes / fp32_bytes, 4),
        "msfp_nodes": cm.onnx_op_counts,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    if model.startswith("sd15"):
        entry["goal"] = _sd15_goal(rows, peak, fp32_bytes)
    return entry


def run_one(model: str, out_json: Path, keep_dir: Path | None, ort_load: bool) -> None:
    """Benchmark one model in this process and write its JSON entry to out_json."""
    from msfp_compiler.pass_manager import PassManager

    meter = PassManager()  # stages outside compile(), measured as compile's PassManager measures its passes
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    with meter.stage("build"):
        loaded = _build(model)
    calib_cfg = _calib_config(model, sum(p.numel() for p in loaded.unet.parameters()))
    work = Path(tempfile.mkdtemp(prefix=f"bench_{model}_", dir=keep_dir))
    cm, compile_s, files = _compile_and_save(loaded, calib_cfg, work, meter, ort_load)
    total_s = time.perf_counter() - t_all
    rows = [_row(r) for r in meter.runs[:1] + cm.pass_runs + meter.runs[1:]]
    entry = _entry(model, loaded, calib_cfg, cm, rows, files, compile_s, total_s, load0)
    if keep_dir is None:
        shutil.rmtree(work)
    else:
        entry["artifacts"] = str(work)
    out_json.write_text(json.dumps(entry, indent=1))


def external_data_check(out_json: Path, gb: float = 2.2) -> None:
    """A real > 2 GB ONNX through save_atomic: two FP32 initializers of `gb`/2 GB read by Gathers, checked, saved
    (external data), re-saved over itself, loaded by onnxruntime from the path; the gathered values must be exact."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from msfp_compiler.export.onnx import check_model, save_atomic
    from msfp_compiler.pass_manager import peak_rss_mb, reset_peak_rss

    rows = int(gb * 1e9 / 4 / 1024 / 2)  # two tensors of ~gb/2 each: over 2 GB together, each under protobuf's limit
    rng = np.random.default_rng(0)
    res: dict = {"initializer_bytes": 2 * rows * 1024 * 4, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    w = [rng.standard_normal((rows, 1024), dtype=np.float32) for _ in range(2)]
    g = helper.make_graph(
        [helper.make_node("Gather", ["w0", "idx"], ["r0"], axis=0), helper.make_node("Gather", ["w1", "idx"], ["r1"], axis=0),
         helper.make_node("Add", ["r0", "r1"], ["y"])],
        "big", [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1024])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    for i, arr in enumerate(w):  # added in place: extend() / CopyFrom of > 2 GB go through serialization (upb)
        t = model.graph.initializer.add()
        t.name, t.data_type = f"w{i}", TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.raw_data = arr.tobytes()
    t0 = time.perf_counter()
    check_model(model)
    res["check_seconds"] = round(time.perf_counter() - t0, 2)
    work = Path(tempfile.mkdtemp(prefix="bench_extdata_"))
    try:
        path = work / "big.onnx"
        for i in range(2):  # the second save goes over the first: same bytes, nothing appended
            reset_peak_rss()
            t0 = time.perf_counter()
            save_atomic(model, path)
            res[f"save{i}_seconds"] = round(time.perf_counter() - t0, 2)
            res[f"save{i}_peak_rss_mb"] = round(peak_rss_mb(), 1)
            res[f"files_after_save{i}"] = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
        res["caller_model_intact"] = model.graph.initializer[0].HasField("raw_data")
        del model, g
        t0 = time.perf_counter()
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        res["ort_session_seconds"] = round(time.perf_counter() - t0, 2)
        idx = rng.integers(0, rows, 64)
        (y,) = sess.run(None, {"idx": idx})
        res["ort_output_exact"] = bool(np.array_equal(y, w[0][idx] + w[1][idx]))
        res["head_onnx_bytes"] = path.stat().st_size
        res["external_tensors"] = sum(t.data_location == TensorProto.EXTERNAL
                                      for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    finally:
        shutil.rmtree(work)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out_json.write_text(json.dumps(res, indent=1))


# ---- driver ----

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--out", default=str(OUT_JSON))
    ap.add_argument("--keep", help="keep each model's ONNX and pass logs under this folder")
    ap.add_argument("--ort-load", action="store_true", help="also time creating an ORT session from the saved file")
    ap.add_argument("--external-data-check", action="store_true",
                    help="also save and load a real 2.2 GB ONNX (external data) and check it in onnxruntime")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: benchmark one model in this process
    ap.add_argument("--entry", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    keep = Path(args.keep).resolve() if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    if args.one == "external-data":
        external_data_check(Path(args.entry))
        return 0
    if args.one:
        run_one(args.one, Path(args.entry), keep, args.ort_load)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; expected {MODELS}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("models", {})
    results["note"] = ("seconds: wall clock on a shared 2-core CPU machine (see loadavg_*); cpu_seconds: process CPU "
                       "time over all threads (less sensitive to other jobs); peak_rss_mb of a stage: the peak during "
                       "that stage (VmHWM reset per stage), of a model: the whole run's peak")
    jobs = models + (["external-data"] if args.external_data_check else [])
    for m in jobs:
        entry = _subprocess(m, keep, args.ort_load)
        if entry is None:
            return 1
        if m == "external-data":
            results["external_data_check"] = entry
            print(f"  external data: {json.dumps(entry)}", flush=True)
        else:
            results["models"][m] = entry
            print(f"  {m}: {entry['params'] / 1e6:.1f}M params, compile {entry['compile_seconds']:.1f}s, "
                  f"total {entry['total_seconds']:.1f}s ({entry['cpu_seconds']:.0f} CPU s), peak RSS "
                  f"{entry['peak_rss_mb']:.0f} MB ({entry['peak_rss_x_fp32_weights']:.2f}x FP32 weights), ONNX "
                  f"{entry['onnx_bytes'] / 1e6:.1f} MB ({entry['onnx_bytes_x_fp32_weights']:.3f}x), "
                  f"load {entry['loadavg_start']}", flush=True)
            for r in entry["stages"]:
                print(f"    {r['name']:<18} {r['seconds']:9.2f}s  cpu {r['cpu_seconds']:9.1f}s  "
                      f"peak {r['peak_rss_mb']:8.0f} MB", flush=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out)
    return 0


def _subprocess(job: str, keep: Path | None, ort_load: bool) -> dict | None:
    """Run one benchmark job in a fresh interpreter (its own peak RSS) and return its JSON entry."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        entry_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", job, "--entry", str(entry_path)]
    cmd += ["--keep", str(keep)] if keep else []
    cmd += ["--ort-load"] if ort_load else []
    print(f"bench_compile: {job} ...", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    try:
        if rc != 0 or not entry_path.stat().st_size:
            print(f"bench_compile: {job} failed (exit {rc})", file=sys.stderr)
            return None
        entry = json.loads(entry_path.read_text())
    finally:
        entry_path.unlink(missing_ok=True)
    entry["subprocess_wall_seconds"] = round(time.perf_counter() - t0, 1)
    return entry


if __name__ == "__main__":
    sys.exit(main())
