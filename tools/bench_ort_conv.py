"""One conv layer in onnxruntime, the lowerings export/integer_kernels.py chooses between, on SD1.5 / CIFAR shapes.

Variants (batch 1, stride 1, "same" padding, random int8 weights on the E2M1 x2 grid, activation codes on UE2M2 x4):
- conv: FP32 Conv on an FP32 initializer (prepacked by ORT: what the FP32 model runs);
- dq_conv: DequantizeLinear(int8 weight) + Conv (weights dequantized each run: no prepacking);
- conv_integer: ConvInteger on the uint8 codes + Cast + Mul + Add;
- integer_gemm: the lowering's form (its own uint8 im2col chain, ``integer_kernels.im2col_nodes``: Transpose / Pad /
  Slice / Concat for 3x3; MatMulInteger with the weight stored [(kh, kw, C), C_out], Cast, Mul, Add, Transpose back
  to NCHW).
Each variant's median of ``--iters`` runs (after one warm-up), per thread count, with the CPU the rest of the machine
used meanwhile (cores). Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ort import _busy_s  # noqa: E402

from msfp_compiler.export.integer_kernels import im2col_nodes  # noqa: E402

# (C_in, C_out, H = W, kernel): SD1.5 resnet convs at 64/32/16/8, an up-block conv on a concatenation, its 1x1
# shortcut, CIFAR's 32x32 and 16x16 convs
SHAPES = [(320, 320, 64, 3), (640, 640, 32, 3), (1280, 1280, 16, 3), (1280, 1280, 8, 3), (640, 320, 64, 3),
          (640, 320, 64, 1), (128, 128, 32, 3), (256, 256, 16, 3)]


def _session(model, threads: int) -> ort.InferenceSession:
    from msfp_compiler.export.ort import session_options

    so = session_options(threads)  # open_session's defaults (memory pattern off), no spinning between timed runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, inits):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def variants(c_in: int, c_out: int, h: int, k: int, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """The four models of one shape, their feeds, and the exact result (float64) for the error column."""
    p = k // 2
    wq = rng.integers(-12, 13, size=(c_out, c_in, k, k)).astype(np.int8)
    sw = (rng.random(c_out) * 0.01 + 1e-3).astype(np.float32)
    xq = rng.integers(0, 29, size=(1, c_in, h, h)).astype(np.uint8)
    sa = np.float32(0.02)
    b = rng.standard_normal(c_out).astype(np.float32)
    w = wq.astype(np.float32) * sw[:, None, None, None]
    x = xq.astype(np.float32) * sa
    fin = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, h])]
    qin = [helper.make_tensor_value_info("xq", TensorProto.UINT8, [1, c_in, h, h])]
    pads = [p] * 4
    rescale = [helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
               helper.make_node("Mul", ["accf", "sc"], ["m"])]
    models = {
        "conv": _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=pads)], fin,
                       [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]),
        "dq_conv": _model([helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=0),
                           helper.make_node("Conv", ["x", "wd", "b"], ["y"], pads=pads)], fin,
                          [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(sw, "sw"),
                           numpy_helper.from_array(b, "b")]),
        "conv_integer": _model([helper.make_node("ConvInteger", ["xq", "wq"], ["acc"], pads=pads), *rescale,
                                helper.make_node("Add", ["m", "b"], ["y"])], qin,
                               [numpy_helper.from_array(wq, "wq"),
                                numpy_helper.from_array((sw * sa).reshape(c_out, 1, 1), "sc"),
                                numpy_helper.from_array(b.reshape(c_out, 1, 1), "b")]),
    }
    inits = [numpy_helper.from_array(wq.transpose(2, 3, 1, 0).reshape(-1, c_out).copy(), "wt"),
             numpy_helper.from_array(sw * sa, "sc"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array(0, np.uint8), "zero"),
             numpy_helper.from_array(np.array([1, c_out, h, h], np.int64), "shape")]

    def const(value: np.ndarray, hint: str) -> str:
        inits.append(numpy_helper.from_array(value, hint))
        return hint

    nodes: list = []
    cols = im2col_nodes(const, "xq", k, k, h, h, c_in, "zero", nodes)  # the lowering's own chain
    nodes += [helper.make_node("MatMulInteger", [cols, "wt"], ["acc"]), *rescale,
              helper.make_node("Add", ["m", "b"], ["yb"]),
              helper.make_node("Transpose", ["yb"], ["yt"], perm=[0, 2, 1]),
              helper.make_node("Reshape", ["yt", "shape"], ["y"])]
    models["integer_gemm"] = _model(nodes, qin, inits)
    feeds = {"conv": {"x": x}, "dq_conv": {"x": x}, "conv_integer": {"xq": xq}, "integer_gemm": {"xq": xq}}
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    exact = b.astype(np.float64)[:, None, None] + sum(
        np.einsum("oc,chw->ohw", w[:, :, i, j].astype(np.float64), xp[0, :, i:i + h, j:j + h])
        for i in range(k) for j in range(k))
    return models, feeds, exact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for c_in, c_out, h, k in SHAPES:
        models, feeds, exact = variants(c_in, c_out, h, k, rng)
        for threads in (int(t) for t in args.threads.split(",")):
            row = {"c_in": c_in, "c_out": c_out, "hw": h, "kernel": k, "threads": threads, "ms": {}, "others": {}}
            for name, m in models.items():
                sess = _session(m, threads)
                y = sess.run(None, feeds[name])[0]
                ts, others = [], []
                for _ in range(args.iters):
                    t0, c0, b0 = time.perf_counter(), time.process_time(), _busy_s()
                    sess.run(None, feeds[name])
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    ts.append(wall)
                    others.append(max(0.0, (_busy_s() - b0 - cpu) / wall))
                row["ms"][name] = round(1e3 * float(np.median(ts)), 2)
                row["others"][name] = round(float(np.median(others)), 2)
                if threads == 1:
                    row.setdefault("rel_err_vs_float64", {})[name] = float(
                        np.abs(y[0] - exact).max() / np.abs(exact).max())
            row["integer_gemm_vs_conv"] = round(row["ms"]["integer_gemm"] / row["ms"]["conv"], 3)
            row["integer_gemm_vs_dq_conv"] = round(row["ms"]["integer_gemm"] / row["ms"]["dq_conv"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "iters": args.iters,
           "loadavg_end": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
