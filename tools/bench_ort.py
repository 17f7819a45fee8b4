"""ORT CPU memory and latency of the compiled (quantized) ONNX vs the FP32 ONNX of the same UNet, with an op profile.

Models: examples/digits-uncond, examples/digits-cond, ``cifar`` (the google/ddpm-cifar10-32 UNet2DModel config) and
``sd15`` (the Stable Diffusion 1.5 UNet config), the last two with random weights. Variants:
- fp32: ``lower_fp32`` (the FP32 model through the same lowering, what ``msfp-compile --scheme fp32`` writes);
- msfp: ``msfp_compiler.compile`` with the default config (int8 weights + DequantizeLinear, MatMulInteger linears
  and "same" convs);
- msfp_fp32conv: the same with FP32 conv weights (``CompileConfig(conv_weights="float32")``: prepacked convs);
- msfp_fp32convF (F a number, e.g. msfp_fp32conv0.1): FP32 weights for the share F of the conv weights, the convs
  with the most output positions first (``CompileConfig(conv_weights="float32:F")``), the others int8;
- msfp_packed: the same graph with 4-bit packed weights (``CompileConfig(integer_kernels=False)``), opened with
  ``open_session`` (weights decoded to FP32 before ORT sees them);
- msfp_nofold (digits only): without zero-point folding;
- optionally the same quantized graph with the msfp function bodies of an older revision (``--baseline-rev``).
The JSON is rewritten after every measurement (an interrupted SD1.5 run keeps what it measured).
Memory: peak RSS (VmHWM) and time of open + first run of each file in a fresh process, as a plain
``onnxruntime.InferenceSession(path)`` (and the packed file through open_session), batch 1, 1 thread.
Latency is the median of interleaved single runs (variants alternate, so a change in machine load hits all of
them alike), for the given batches, threads and session-option settings. One profiled session per variant
(``SessionOptions.enable_profiling``) attributes kernel time to op types and to the msfp functions. The machine is
shared: every run records os.getloadavg().

    python tools/bench_ort.py --models cifar --batches 4 --threads 1 --opt-levels all --iters 12 --warmup 2 \
        --variants fp32,msfp,msfp_fp32conv --cached --work WORK --out results/bench_ort_cifar.json
    flock /work/coord/sd15.lock python tools/bench_ort.py --models sd15 --batches 1 --threads 1,2 --opt-levels all \
        --iters 3 --warmup 1 --no-profile --no-memory --variants fp32,msfp --work WORK --out OUT
    flock /work/coord/sd15.lock python tools/bench_ort.py --models sd15 --batches 1 --threads 1 --opt-levels all \
        --no-latency --no-profile --variants fp32,msfp --work WORK --out OUT      # peak RSS / open time
    python tools/bench_ort.py --verify-only                     # dense bit-exactness sweep of the bodies
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
          "cifar": None, "sd15": None}  # cifar, sd15: public UNet configs with random weights (tools/unet_configs.py)
GOAL_RATIO = 1.3
SHARE_VARIANT = "msfp_fp32conv"  # msfp_fp32convF (F a number): CompileConfig(conv_weights=f"float32:{F}")
OPT_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
SWEEP_FORMATS = ["e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]


# ---- models ----

def _quantized_pair(loaded, config, work: Path, name: str, only: set[str] | None = None) -> dict[str, Path]:
    """The default (integer-kernel) ONNX, the same with FP32 conv weights (``conv_weights="float32"``) and with
    4-bit packed weights, from one compile (the integer files are lowered from the packed one, as lower_to_onnx does
    after the export). ``only``: the integer variants to build (default: both)."""
    from dataclasses import replace

    import onnx

    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.export.onnx import save_atomic, to_integer

    variants = {k: v for k, v in {"msfp": "int8", "msfp_fp32conv": "float32"}.items() if only is None or k in only}
    variants.update({k: f"float32:{k[len(SHARE_VARIANT):]}" for k in only or ()
                     if k.startswith(SHARE_VARIANT) and k != SHARE_VARIANT})  # msfp_fp32conv itself is "float32"
    paths = {k: work / f"{name}.{k}.onnx" for k in [*variants, "msfp_packed"]}
    if not paths["msfp_packed"].is_file():
        cm = msfp_compile(loaded, replace(config, integer_kernels=False), progress=False)
        save_atomic(cm.onnx_model, paths["msfp_packed"])
        del cm
    for k, conv in variants.items():
        if not paths[k].is_file():
            model = onnx.load(str(paths["msfp_packed"]))
            to_integer(model, conv)
            save_atomic(model, paths[k])
            del model
    return paths


def build_sd15(work: Path, only: set[str] | None = None) -> dict[str, Path]:
    """FP32 and quantized ONNX (external data, > 2 GB) of the SD1.5 UNet with random weights, quantized with the
    calibration of tools/bench_compile.py (2 samples x 4 DDIM steps, 77-token text states); cached in `work`."""
    from msfp_compiler.config import CalibConfig, CompileConfig
    from msfp_compiler.export.onnx import lower_fp32, save_atomic
    from msfp_compiler.load import LoadedModel, model_from_config

    sys.path.insert(0, str(ROOT / "tools"))
    from unet_configs import SD15_UNET_CONFIG

    cached = {k: work / f"sd15.{k}.onnx" for k in ["fp32", "msfp_packed", *(only or ["msfp", "msfp_fp32conv"])]}
    if all(p.is_file() for p in cached.values()):  # no 3.4 GB model to build
        return cached
    torch.manual_seed(0)
    with torch.no_grad():
        unet = model_from_config(dict(SD15_UNET_CONFIG), "sd15 config").eval()
    calib = CalibConfig(num_samples=2, num_steps=4, num_groups=2, holdout_samples=0, text_len=77)
    paths = _quantized_pair(LoadedModel(unet, Path("<sd15 config>")), CompileConfig(calib=calib), work, "sd15", only)
    fp32 = work / "sd15.fp32.onnx"
    if not fp32.is_file():
        save_atomic(lower_fp32(unet, cond_len=77), fp32)
    return {"fp32": fp32, **paths}


def build_cifar(work: Path, only: set[str] | None = None) -> dict[str, Path]:
    """The google/ddpm-cifar10-32 UNet2DModel config (35.7M parameters) with random weights: FP32, quantized
    (default config, 4 samples x 10 DDIM steps of calibration) and its packed 4-bit variant; cached in `work`."""
    from msfp_compiler.config import CalibConfig, CompileConfig
    from msfp_compiler.export.onnx import lower_fp32, save_atomic
    from msfp_compiler.load import LoadedModel, model_from_config

    sys.path.insert(0, str(ROOT / "tools"))
    from unet_configs import CIFAR10_DDPM_CONFIG

    torch.manual_seed(0)
    with torch.no_grad():
        unet = model_from_config(dict(CIFAR10_DDPM_CONFIG), "cifar10 config").eval()
    calib = CalibConfig(num_samples=4, num_steps=10, num_groups=4, holdout_samples=0)
    loaded = LoadedModel(unet, Path("<cifar10 config>"))
    paths = _quantized_pair(loaded, CompileConfig(calib=calib), work, "cifar", only)
    fp32 = work / "cifar.fp32.onnx"
    if not fp32.is_file():
        save_atomic(lower_fp32(unet), fp32)
    return {"fp32": fp32, **paths}


def build_models(name: str, work: Path, only: set[str] | None = None) -> dict[str, Path]:
    """FP32, quantized (default config: integer kernels), the same with 4-bit packed weights and quantized without
    zero-point folding ONNX files (cached in `work`)."""
    if name == "sd15":
        return build_sd15(work, only)
    if name == "cifar":
        return build_cifar(work, only)
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CompileConfig
    from msfp_compiler.export.onnx import lower_fp32, save_atomic
    from msfp_compiler.load import load_model

    fp32, nofold = (work / f"{name}.{k}.onnx" for k in ("fp32", "msfp_nofold"))
    loaded = load_model(MODELS[name])
    paths = _quantized_pair(loaded, CompileConfig(), work, name, only)
    if not nofold.is_file():
        # zero points kept in the quantizers: no explicit Pad in front of padded convs (see the profile)
        msfp_compile(loaded, CompileConfig(fold_zero_point=False), progress=False).save(nofold)
    if not fp32.is_file():
        save_atomic(lower_fp32(loaded.unet), fp32)
    return {"fp32": fp32, **paths, "msfp_nofold": nofold}


_MEMORY_PROBE = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
def hwm_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) // 1024
path, threads, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rss0 = hwm_mb()
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
t0 = time.perf_counter()
if sys.argv[4] == "open_session":
    from msfp_compiler.export.ort import open_session
    sess = open_session(path, options=so)
elif sys.argv[4] == "no_mem_pattern":  # open_session's options on a file without packed weights, torch not imported
    so.enable_mem_pattern = False
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
elif sys.argv[4] == "cached":  # an optimized model saved by an earlier session: no graph optimizations at open
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
else:
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
t_open = time.perf_counter() - t0
rss_open = hwm_mb()
rng = np.random.default_rng(0)
feeds = {}
for i in sess.get_inputs():
    shape = [batch] + [int(d) if isinstance(d, int) else 77 for d in i.shape[1:]]
    feeds[i.name] = (rng.integers(0, 1000, size=shape, dtype=np.int64) if i.type == "tensor(int64)"
                     else rng.standard_normal(shape, dtype=np.float32))
t0 = time.perf_counter()
sess.run(None, feeds)
t_run = time.perf_counter() - t0
rss_run = hwm_mb()
t0 = time.perf_counter()
sess.run(None, feeds)  # the second run allocates the memory pattern's block, where enabled
t_run2 = time.perf_counter() - t0
print(json.dumps({"open_s": round(t_open, 2), "first_run_s": round(t_run, 2), "peak_rss_open_mb": rss_open,
                  "peak_rss_mb": rss_run, "second_run_s": round(t_run2, 2), "peak_rss_2runs_mb": hwm_mb(),
                  "python_baseline_rss_mb": rss0}))
"""


def memory(path: Path, how: str, threads: int = 1, batch: int = 1) -> dict:
    """Peak RSS and time of opening ``path`` and running it once (and the peak after a second run), in a fresh
    process: ``how`` = "plain" (onnxruntime.InferenceSession(path), what a user writes), "no_mem_pattern" (the
    same with enable_mem_pattern off, as open_session / OrtUNet open a file), "open_session" (our helper: packed
    files) or "cached" (``path`` is an optimized model saved by ``save_optimized``, opened with graph
    optimizations off)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(threads), str(batch), how],
                         capture_output=True, text=True, check=True)
    return {"how": how, "threads": threads, "batch": batch, "loadavg": [round(x, 2) for x in os.getloadavg()],
            **json.loads(out.stdout.strip().splitlines()[-1])}


def save_optimized(path: Path, out: Path) -> Path:
    """The model as onnxruntime optimizes it at session start (ORT_ENABLE_ALL, this CPU), saved to ``out`` (weights
    over 1 KB in ``out.data``): the optimized-model cache a user can keep (SessionOptions.optimized_model_filepath)
    to skip the optimizer at later opens."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return out


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
    from msfp_compiler.export.ort import open_session, session_options

    so = session_options(threads)  # open_session's own (memory pattern off), plus what interleaved timing needs
    so.inter_op_num_threads = 1
    # Sessions are timed interleaved; a pool that spin-waits after its run would steal the cores from the next
    # session's run (2 threads on 2 cores: FP32 itself ran 2.6x slower than with 1 thread).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = OPT_LEVELS[opt]
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix

    # as msfp-sample opens a model: packed weights decoded before ORT sees them (the same graph after ORT's own
    # constant folding, without its memory peak)
    return open_session(path, options=so)


def feeds_for(sess: ort.InferenceSession, batch: int, seed: int = 0, text_len: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in sess.get_inputs():
        shape = [batch] + [int(d) if isinstance(d, int) else text_len for d in i.shape[1:]]
        if i.type == "tensor(int64)":
            out[i.name] = rng.integers(0, 1000, size=shape, dtype=np.int64)
        else:
            out[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def _busy_s() -> float:
    """CPU seconds all processes have used since boot (/proc/stat: every state but idle and iowait)."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def interleaved_latency(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], iters: int,
                        warmup: int = 3) -> dict[str, dict]:
    """Median/min/p90 of single runs, variants alternating run by run (load changes hit all alike), and the
    median CPU time of the process per run (less sensitive to other jobs on a shared machine than wall time).
    Every run is also kept as [wall ms, CPU ms, others]: ``others`` is the CPU the rest of the machine used during
    the run, in cores (2 cores here: 1.0 = the other core busy all along), since W4A4 (memory-bound elementwise
    passes) slows down more than FP32 when the other core is busy."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    per_run: dict[str, list[list[float]]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feeds)
    order = list(sessions)
    for i in range(iters):
        for k in (order if i % 2 == 0 else order[::-1]):
            t0, c0, b0 = time.perf_counter(), time.process_time(), _busy_s()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            others = max(0.0, (_busy_s() - b0 - cpu[k][-1]) / times[k][-1])
            per_run[k].append([round(1e3 * times[k][-1], 1), round(1e3 * cpu[k][-1], 1), round(others, 2)])
    return {k: {"median_ms": round(1e3 * float(np.median(v)), 3), "min_ms": round(1e3 * float(np.min(v)), 3),
                "p90_ms": round(1e3 * float(np.percentile(v, 90)), 3), "runs": len(v),
                "cpu_median_ms": round(1e3 * float(np.median(cpu[k])), 3), "per_run": per_run[k]}
            for k, v in times.items()}


# A memory-streaming job for the other core (--contend): copies between two 256 MB arrays, what another user's
# elementwise work does to the shared L3 and memory bus.
_STREAM_JOB = "import numpy as np\na = np.ones(1 << 26, np.float32); b = np.empty_like(a)\nwhile True: np.copyto(b, a)"


def contended(fn):
    """``fn()`` with ``_STREAM_JOB`` running in another process (niced, killed afterwards)."""
    job = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", _STREAM_JOB])
    try:
        time.sleep(1.0)  # its arrays allocated and touched
        return fn()
    finally:
        job.kill()
        job.wait()


# ---- profiling ----

def _function_of(node_name: str) -> str | None:
    """Inlined function body nodes are named '_inlfunc_<Function>_..._<Function>/<step>' by ORT."""
    if not node_name.startswith("_inlfunc_"):
        return None
    rest = node_name[len("_inlfunc_"):]
    return rest.split("_", 1)[0]


def profile(path: Path, batch: int, text_len: int, threads: int, opt: str, runs: int, work: Path) -> dict:
    """Kernel time per run by op type and by msfp function over ``runs`` + 2 profiled runs (the first two included:
    a session cannot start profiling late), with the run's load average."""
    sess = session(path, threads, opt, profile_prefix=str(work / f"prof_{path.stem}"))
    feeds = feeds_for(sess, batch, text_len=text_len)
    load = os.getloadavg()
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
        "threads": threads, "loadavg": [round(x, 2) for x in load],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "runs": total_runs,
        "model_run_ms_median": round(float(np.median([e["dur"] for e in runs_ev])) / 1e3, 3) if runs_ev else None,
        "kernel_ms_per_run": per_run(kernel_us),
        "kernels_per_run": round(nodes_per_run),
        "by_op_type_ms": {k: per_run(v) for k, v in by_op.most_common(20)},
        "by_function_ms": {k: per_run(v) for k, v in by_fn.most_common()},
        "msfp_share_of_kernel_time": round(sum(v for k, v in by_fn.items() if k != "(model ops)") / kernel_us, 4),
        "top_function_ops_ms": {k: per_run(v) for k, v in by_fn_op.most_common(12)},
    }


def optimized_node_counts(path: Path, threads: int, opt: str, work: Path) -> dict[str, int]:
    """Node counts by op type of the graph onnxruntime runs (its optimized model, weights written aside: SD1.5's
    would not fit one protobuf)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.log_severity_level = 3
    out = work / f"{path.stem}.{opt}.optimized.onnx"
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{out.name}.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(out), load_external_data=False)
    out.unlink()
    Path(f"{out}.data").unlink(missing_ok=True)
    c = collections.Counter(n.op_type for n in m.graph.node)
    return {"nodes": sum(c.values()), **dict(c.most_common(8))}


# ---- bit-exactness sweep of the function bodies ----

def bodies_for(fmt: str) -> list[str]:
    """Every function body (op name) exact for a format (``msfp_ops.valid_bodies``: the ones the lowering may pick
    and the default ones), each also in its NoZeroPoint form (swept at zero point 0 only). The sweep's scales are
    one-element initializers, so the scalar-scale bodies are valid."""
    from msfp_compiler.export.msfp_ops import valid_bodies
    from msfp_compiler.ops import get_format

    f = get_format(fmt)
    return valid_bodies(f, scalar_scale=True) + valid_bodies(f, scalar_scale=True, zero_point=False)


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

    def body(op_type: str, fmt: str, scale: float, zp: float, keep: float) -> ort.InferenceSession:
        # scale and zero point are initializers, as in a compiled model, so ORT's constant folding and fusions run
        m = single_op_model(op_type, fmt, {"x": (TensorProto.FLOAT, ["n"]), "scale": np.array(scale, np.float32),
                                           "zero_point": np.array(zp, np.float32)}, ["n"], keep_zero_point=keep)
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
        res = {op: {"values": 0, "mismatches": 0} for op in bodies}
        t0 = time.perf_counter()
        for scale, z, keep, step in cases:
            sessions = {op: body(op, fmt, scale, z, keep) for op in bodies
                        if z == 0.0 or not op.endswith("NoZeroPoint")}
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

NOTE = ("latency: median of interleaved single runs (intra-op pools do not spin between runs); "
        "msfp = default compile (int8 weights, MatMulInteger linears and same convs), plain InferenceSession; "
        "msfp_packed = CompileConfig(integer_kernels=False) through open_session; "
        "msfp_nofold = CompileConfig(fold_zero_point=False); "
        "msfp@REV = the same quantized graph with the function bodies of REV; ratios vs the "
        "FP32 ONNX of the same UNet. sweep: ORT vs torch.ops.msfp.quantize, bitwise up to the sign of zero")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    ap.add_argument("--profile-runs", type=int, default=10, help="profiled runs per variant (after 2 more)")
    ap.add_argument("--variants", help="comma-separated variants to time and probe (default: all built; fp32 always)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per variant before timing")
    ap.add_argument("--no-latency", action="store_true", help="skip the latency rows (memory probes only)")
    ap.add_argument("--cached", action="store_true",
                    help="also probe open time / peak RSS of the fp32 and msfp files' saved optimized models")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the peak-RSS / open-time probes (a fresh process per variant)")
    ap.add_argument("--contend", action="store_true",
                    help="time every 1-thread row again with a memory-streaming job on the other core")
    ap.add_argument("--out", default=str(OUT_JSON))
    return ap.parse_args(argv)


def run_sweep(args: argparse.Namespace, result: dict) -> None:
    """The bit-exactness sweep into ``result``; with --verify-only merged into the existing --out JSON."""
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


def probe_memory(name: str, paths: dict[str, Path], timed: dict[str, Path], save, cached: bool = False,
                 work: Path | None = None) -> dict:
    """Peak RSS / open time of a plain onnxruntime.InferenceSession(path) of each timed variant (fp32 first, the
    reference of the ratios), and of fp32 / msfp with open_session's options (``no_mem_pattern``); the packed 4-bit
    file through open_session (predecode): SD1.5's packed file in a plain session needs 16.7 GB, not probed.
    ``cached``: also each fp32 / msfp file's optimized model (``save_optimized``, in ``work``) opened without the
    optimizer. ``save()`` is called after each probe."""
    probes = [(k, "plain") for k in timed if not (name == "sd15" and k == "msfp_packed")]
    probes += [(k, "open_session") for k in timed if k == "msfp_packed"]
    probes += [(k, "no_mem_pattern") for k in timed if k in ("fp32", "msfp")]
    if cached:
        probes += [(k, "cached") for k in timed if k in ("fp32", "msfp")]
    out: dict = {}
    for k, how in probes:
        path = save_optimized(paths[k], work / f"{paths[k].stem}.optimized.onnx") if how == "cached" else paths[k]
        out[f"{k}/{how}"] = m = memory(path, how)
        fp = out["fp32/plain"]
        m["peak_rss_vs_fp32"] = round(m["peak_rss_mb"] / fp["peak_rss_mb"], 3)
        m["open_vs_fp32"] = round(m["open_s"] / max(fp["open_s"], 1e-9), 3)
        ref = out.get(f"fp32/{how}", fp)  # after two runs: against FP32 opened the same way (or plainly)
        m["peak_rss_2runs_vs_fp32"] = round(m["peak_rss_2runs_mb"] / ref["peak_rss_2runs_mb"], 3)
        print(f"  memory {k:<12} {how:<12} open {m['open_s']:.1f}s first run {m['first_run_s']:.1f}s "
              f"peak RSS {m['peak_rss_mb']} MB ({m['peak_rss_vs_fp32']:.3f}x), "
              f"after 2 runs {m['peak_rss_2runs_mb']} MB "
              f"({m['peak_rss_2runs_vs_fp32']:.3f}x)  load {m['loadavg'][0]:.1f}", flush=True)
        save(out)
    return out


def time_latency(name: str, timed: dict[str, Path], args: argparse.Namespace, save) -> list[dict]:
    """Interleaved latency rows for every (opt level, threads, batch); ``save(rows)`` after each row."""
    rows: list[dict] = []
    for opt in [o for o in args.opt_levels.split(",") if o]:
        for th in [int(t) for t in args.threads.split(",")]:
            sessions = {k: session(p, th, opt) for k, p in timed.items()}
            for b in [int(b) for b in args.batches.split(",")]:
                feeds = feeds_for(sessions["fp32"], b, text_len=77 if name == "sd15" else 1)
                load = os.getloadavg()
                lat = interleaved_latency(sessions, feeds, args.iters, args.warmup)
                rows.append(_latency_row(opt, th, b, load, lat))
                save(rows)
                if args.contend and th == 1:
                    load = os.getloadavg()
                    lat = contended(lambda: interleaved_latency(sessions, feeds, args.iters, 1))
                    rows.append({**_latency_row(opt, th, b, load, lat, " (other core streaming memory)"),
                                 "other_core": "streaming memory (--contend)"})
                    save(rows)
            del sessions
    return rows


def _latency_row(opt: str, th: int, b: int, load, lat: dict, what: str = "") -> dict:
    """One JSON row of interleaved_latency's result (ratios vs fp32), printed as it is made."""
    row = {"opt_level": opt, "threads": th, "batch": b, "loadavg": [round(x, 2) for x in load],
           "loadavg_end": [round(x, 2) for x in os.getloadavg()],
           "ms": lat, "ratio_vs_fp32": {k: round(v["median_ms"] / lat["fp32"]["median_ms"], 3)
                                        for k, v in lat.items() if k != "fp32"},
           "cpu_ratio_vs_fp32": {k: round(v["cpu_median_ms"] / lat["fp32"]["cpu_median_ms"], 3)
                                 for k, v in lat.items() if k != "fp32"}}
    print(f"  opt={opt:<8} threads={th} batch={b:<3} " + "  ".join(
        f"{k}={v['median_ms']:.2f}ms" for k, v in lat.items()) + "  ratio " + " ".join(
        f"{k}={r:.2f}x" for k, r in row["ratio_vs_fp32"].items()) + f"  load {load[0]:.1f}{what}", flush=True)
    return row


def profile_variants(name: str, paths: dict[str, Path], timed: dict[str, Path], args: argparse.Namespace,
                     work: Path, entry: dict, save) -> None:
    """Op profiles (first opt level, every thread count and batch) and optimized-graph node counts into ``entry``;
    keys ``VARIANT@batchB`` (1 thread) and ``VARIANT@batchB@threadsT``; ``save(profiles)`` after each."""
    opt = args.opt_levels.split(",")[0]
    for th in [int(t) for t in args.threads.split(",")]:
        for b in [int(b) for b in args.batches.split(",")]:
            for k, p in timed.items():
                key = f"{k}@batch{b}" + (f"@threads{th}" if th != 1 else "")
                entry["profile"][key] = profile(p, b, 77 if name == "sd15" else 1, th, opt, args.profile_runs, work)
                save(entry["profile"])
                print(f"  profile {key}: {entry['profile'][key]['kernel_ms_per_run']:.1f} ms of kernels a run",
                      flush=True)
    for k, p in timed.items():
        entry["optimized_graph"][k] = optimized_node_counts(p, 1, opt, work)


def bench_model(name: str, args: argparse.Namespace, work: Path, result: dict) -> None:
    """Build (or reuse) one model's variants, then memory probes, latency and profiles, saved as they come."""
    print(f"bench_ort: {name}", flush=True)
    paths = build_models(name, work, set(args.variants.split(",")) if args.variants else None)
    if args.baseline_rev:
        paths["msfp@" + args.baseline_rev] = with_bodies_of(args.baseline_rev, paths["msfp"],
                                                            work / f"{name}.msfp_{args.baseline_rev}.onnx")
    entry: dict = {"files": {k: {"path": str(p), "bytes": sum(f.stat().st_size for f in (p, Path(f"{p}.data"))
                                                              if f.is_file())} for k, p in paths.items()},
                   "latency": [], "profile": {}, "optimized_graph": {}}
    result["models"][name] = entry
    timed = {k: p for k, p in paths.items() if not args.variants or k == "fp32" or k in args.variants.split(",")}

    def save(key: str):
        def put(value) -> None:
            entry[key] = value
            _write(result, Path(args.out))
        return put

    if not args.no_memory:
        probe_memory(name, paths, timed, save("memory"), args.cached, work)
    if not args.no_latency:
        time_latency(name, timed, args, save("latency"))
    if not args.no_profile:
        profile_variants(name, paths, timed, args, work, entry, save("profile"))
    # headline: opt level all at the largest thread count timed, per batch
    top = max(int(t) for t in args.threads.split(","))
    entry["headline"] = {f"batch{r['batch']}": r["ratio_vs_fp32"] for r in entry["latency"]
                         if r["opt_level"] == "all" and r["threads"] == top}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ort_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                    "goal_ratio": GOAL_RATIO, "iters": args.iters, "baseline_rev": args.baseline_rev,
                    "git_head": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip(), "models": {},
                    "note": NOTE}
    if args.verify or args.verify_only:
        run_sweep(args, result)
        if args.verify_only:
            return 0
    for name in [m for m in args.models.split(",") if m]:
        bench_model(name, args, work, result)
    result["loadavg_end"] = os.getloadavg()
    _write(result, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _write(result: dict, out: Path) -> None:
    """Write the JSON (atomically), keeping an earlier --verify-only sweep; called after every measurement, so an
    interrupted SD1.5 run still leaves what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if "sweep" not in result and out.is_file():
        old = json.loads(out.read_text())
        result.update({k: old[k] for k in ("sweep", "sweep_loadavg") if k in old})
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
