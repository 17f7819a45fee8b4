"""export/msfp_ops.py: the fast function bodies (unsigned and power-of-two variants, each its own op name) are
bit-exact with torch.ops.msfp.quantize on every grid level, tie and their float32 neighbours (tools/bench_ort.py
--verify runs the dense sweep), the lowering picks them, and onnx's ReferenceEvaluator runs each body bit for bit as
onnxruntime does."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from msfp_compiler.export.msfp_ops import MSFP_DOMAIN, single_op_model, valid_bodies
from msfp_compiler.ops import get_format
from tests.conftest import ort_session


def _one_node(op_type: str, fmt: str, scale: float, zp: float, keep: float) -> ort.InferenceSession:
    """One msfp node with the given body; scale and zero point are initializers as in compiled models, so ORT's
    constant folding and fusions (which once rejected an FP8 zero point) run on it."""
    m = single_op_model(op_type, fmt, {"x": (TensorProto.FLOAT, ["n"]), "scale": np.array(scale, np.float32),
                                       "zero_point": np.array(zp, np.float32)}, ["n"], keep_zero_point=keep)
    assert m.graph.node[0].op_type == op_type and [f.name for f in m.functions] == [op_type]
    return ort_session(m)


def _tie_heavy(fmt: str) -> np.ndarray:
    """Every level, midpoint (tie) and threshold +- 3 float32 ulps, a strided sweep, huge and tiny values."""
    f = get_format(fmt)
    lv = f.levels.double().numpy()
    pts = np.concatenate([lv, (lv[1:] + lv[:-1]) / 2, f.thresholds.double().numpy(), 2.0 ** np.arange(-12, 12)])
    bits = pts.astype(np.float32).view(np.int32)[:, None] + np.arange(-3, 4)[None]
    sweep = np.arange(0, int(np.float32(f.max * 1.25).view(np.int32)), 4099, dtype=np.int64).astype(np.int32)
    x = np.concatenate([bits.ravel(), sweep]).view(np.float32)
    x = np.concatenate([x, -x, np.array([1e30, 3e38, 1e-40, 0.0], np.float32)])
    return x[~np.isnan(x)]  # (bit patterns below +0 are NaNs; NaN in, NaN out is not specified)


_BODIES = [
    ("e1m2", "QuantizeFP"), ("e2m1", "QuantizeFP"), ("ue3m1", "QuantizeFP"), ("ue2m2", "QuantizeFP"),
    ("ue2m2", "QuantizeFPUnsigned"), ("ue3m1", "QuantizeFPUnsigned"),
    ("e2m1", "QuantizeFPSymmetric"), ("e1m2", "QuantizeFPSymmetric"),
    ("e1m2", "QuantizeFPUniform"), ("ue1m3", "QuantizeFPUniform"),
    ("e3m0", "QuantizeLUTPow2"), ("ue4m0", "QuantizeLUTPow2"), ("e3m0", "QuantizeLUT"),
    ("int4", "QuantizeInt"),
]
_SCALES = [(1.0, 0.0, 1.0), (0.0371, 0.0, 1.0), (0.0371, -0.4125, 1.0), (0.0371, -0.4125, 0.0), (3.3, 1.7, 1.0)]
# the NoZeroPoint bodies are picked only for a constant zero point of 0: checked there
_NO_ZP = [("e2m1", "QuantizeFPSymmetricNoZeroPoint"), ("e2m1", "QuantizeFPNoZeroPoint"),
          ("e1m2", "QuantizeFPUniformNoZeroPoint"), ("e3m0", "QuantizeLUTPow2NoZeroPoint"),
          ("int4", "QuantizeIntNoZeroPoint"), ("ue2m2", "QuantizeFPUnsignedNoZeroPoint")]


@pytest.mark.parametrize("fmt,op_type,scale,zp,keep",
                         [b + c for b in _BODIES for c in _SCALES]
                         + [b + c for b in _NO_ZP for c in _SCALES if c[1] == 0.0])
def test_fast_quantize_bodies_are_bit_exact(fmt, op_type, scale, zp, keep) -> None:
    v = _tie_heavy(fmt)
    with np.errstate(over="ignore"):  # 3e38 * 3.3 -> inf, on purpose
        x = v if (scale, zp) == (1.0, 0.0) else (np.float32(zp) + v * np.float32(scale)).astype(np.float32)
    sess = _one_node(op_type, fmt, scale, zp, keep)
    (y,) = sess.run(None, {"x": x})
    op = torch.ops.msfp.quantize if keep else torch.ops.msfp.quantize_folded
    ref = op(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zp), fmt).numpy()
    y, ref = y + np.float32(0), ref + np.float32(0)  # -0 == +0
    bad = y.view(np.int32) != ref.view(np.int32)
    assert not bad.any(), f"{bad.sum()} differ: x={x[bad][:5]} onnx={y[bad][:5]} torch={ref[bad][:5]}"


def test_valid_bodies_admit_the_checked_bodies_and_no_others() -> None:
    """msfp_ops.valid_bodies (the lowering's choice and tools/bench_ort.py's sweep) admits every body checked above
    for its format, and not the ones that would be wrong there."""
    for fmt, op in _BODIES:
        assert op in valid_bodies(get_format(fmt), scalar_scale=True), (fmt, op)
    for fmt, op in _NO_ZP:
        assert op in valid_bodies(get_format(fmt), scalar_scale=True, zero_point=False), (fmt, op)
    assert valid_bodies(get_format("e2m1")) == ["QuantizeFP", "QuantizeLUT"]  # per-channel scale: no Clip by scale
    assert valid_bodies(get_format("e1m2"), scalar_scale=True)[0] == "QuantizeFPUniform"
    assert valid_bodies(get_format("ue2m2"))[0] == "QuantizeFPUnsigned"
    assert valid_bodies(get_format("e3m0"), scalar_scale=True) == ["QuantizeLUTPow2", "QuantizeLUT"]  # M = 0
    assert valid_bodies(get_format("int4"), zero_point=False) == ["QuantizeIntNoZeroPoint"]


def test_lowering_picks_the_fast_bodies(compiled_unet2d) -> None:
    m = compiled_unet2d.onnx_model
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.domain != MSFP_DOMAIN or not n.op_type.startswith(("QuantizeFP", "QuantizeLUT")):
            continue
        f = get_format(next(a.s.decode() for a in n.attribute if a.name == "format"))
        zp = numpy_helper.to_array(inits[n.input[2]])
        body = n.op_type.removesuffix("NoZeroPoint")
        assert (body != n.op_type) == (not zp.any())  # a constant zero point of 0 is left out
        if body.startswith("QuantizeLUT"):
            assert body == ("QuantizeLUTPow2" if f.man_bits == 0 else "QuantizeLUT")
        elif f.name in ("e1m2", "ue1m3"):  # uniform grids (scalar activation scales): QuantizeLinear and friends
            assert body == "QuantizeFPUniform"
        elif f.signed:  # e2m1 with scalar activation scales: the sign as a clipped scale
            assert body == ("QuantizeFPSymmetric" if np.prod(inits[n.input[1]].dims) == 1 else "QuantizeFP")
        else:
            assert body == "QuantizeFPUnsigned"
        assert not n.overload  # onnx's ReferenceEvaluator ignores overloads: one op name per body
    names = [(f.name, f.overload) for f in m.functions]
    assert len(names) == len(set(n for n, _ in names)) and all(not o for _, o in names)
    assert {n.op_type for n in m.graph.node if n.domain == MSFP_DOMAIN} == {n for n, _ in names}  # only those used


@pytest.mark.parametrize("fmt,op_type", [
    ("e1m2", "QuantizeFP"), ("ue3m1", "QuantizeFPUnsigned"), ("e3m0", "QuantizeLUTPow2"), ("ue4m0", "QuantizeLUTPow2"),
    ("e2m1", "QuantizeLUT"), ("uint4", "QuantizeInt"), ("e1m2", "QuantizeFPUniform"), ("ue1m3", "QuantizeFPUniform"),
    ("e2m1", "QuantizeFPSymmetric"), ("e2m1", "QuantizeFPSymmetricNoZeroPoint"), ("e1m2", "QuantizeFPUniformNoZeroPoint"),
])
def test_reference_evaluator_runs_each_body_bit_for_bit_as_onnxruntime(fmt, op_type) -> None:
    """onnx.reference gives the same bits as onnxruntime for every quantize body (each has its own op name)."""
    from onnx.reference import ReferenceEvaluator

    zp = 0.0 if get_format(fmt).signed else -0.4125
    m = single_op_model(op_type, fmt, {"x": (TensorProto.FLOAT, ["n"]), "scale": np.array(0.0371, np.float32),
                                       "zero_point": np.array(zp, np.float32)}, ["n"])
    x = (np.float32(zp) + _tie_heavy(fmt)[:20000] * np.float32(0.0371)).astype(np.float32)
    (y,) = ort_session(m).run(None, {"x": x})
    (r,) = ReferenceEvaluator(m).run(None, {"x": x})
    y, r = y + np.float32(0), r.astype(np.float32) + np.float32(0)
    assert np.array_equal(y.view(np.int32), r.view(np.int32))
