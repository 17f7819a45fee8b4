"""--check (msfp_compiler/check.py): a correct lowering passes; bugs planted in the lowering are caught and named.

Each planted bug is one edit of a copy of a compiled model's ONNX, the way a lowering bug would show: a wrong
scale in one layer, a wrong format in one quantizer, a quantizer body off by one level, an int8 weight
off by one level, a wrong bias in one float layer. The check must fail AT the node that was changed (or, for the
float layer, at the first quantizer its output reaches).
"""

from __future__ import annotations

import dataclasses

import onnx
import pytest
import torch
from onnx import numpy_helper

from msfp_compiler.check import _judge, _match, check_onnx, quantizer_nodes
from msfp_compiler.export.integer_kernels import int8_name, integer_shift
from msfp_compiler.export.msfp_ops import MSFP_DOMAIN, annotate_msfp_nodes, base_op, msfp_functions
from msfp_compiler.ops import get_format


def _copy(cm) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(cm.onnx_model)
    return m


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: a for a in n.attribute}


def _fx_of(cm, model: onnx.ModelProto, onnx_node: onnx.NodeProto) -> str:
    """The torch quantize node the check maps an ONNX node to (computed on the unmodified model)."""
    gm = cm.graph_module
    matched = _match(gm, quantizer_nodes(gm), cm.onnx_model)
    out = onnx_node.output[0]
    (name,) = {q.name for q, nd in matched.items() if nd.output[0] == out}
    return name


def _check(cm, model):
    return dataclasses.replace(cm, onnx_model=model).check()


def _act_nodes(model, op_type="QuantizeFP", fmt=None):
    return [n for n in model.graph.node if n.domain == MSFP_DOMAIN and base_op(n.op_type) == op_type
            and (fmt is None or _attrs(n)["format"].s.decode() == fmt)]


def test_correct_model_passes(compiled) -> None:
    res = compiled.check()
    assert res.ok, str(res)
    assert str(res).startswith("check PASS")
    n_q = len(quantizer_nodes(compiled.graph_module))
    assert res.compared == n_q > 0 and not res.unobserved  # every torch quantizer found in the ONNX
    assert res.samples == sum(b.sample.shape[0] for b in compiled.calibration.holdout)
    assert all(c.elements > 0 for c in res.nodes)


def test_wrong_scale_in_one_layer(compiled_unet2d) -> None:
    cm = compiled_unet2d
    m = _copy(cm)
    nd = _act_nodes(m, fmt="e2m1")[4]
    (init,) = [t for t in m.graph.initializer if t.name == nd.input[1]]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    res = _check(cm, m)
    assert not res.ok and res.first_failure.node == _fx_of(cm, m, nd), str(res)
    assert "not on this quantizer's" in res.first_failure.problem
    assert str(res).startswith(f"check FAIL at {res.first_failure.name}")


def test_wrong_format_in_one_quantizer(compiled_unet2d) -> None:
    cm = compiled_unet2d
    m = _copy(cm)
    nd = _act_nodes(m, fmt="e2m1")[2]
    fmt = [a for a in nd.attribute if a.name == "format"]
    fmt[0].s = b"e1m2"  # lowered with another format's constants
    del nd.attribute[:]
    nd.attribute.extend(fmt)
    annotate_msfp_nodes(m)
    res = _check(cm, m)
    assert not res.ok and res.first_failure.node == _fx_of(cm, m, nd), str(res)


def test_body_off_by_one_level(compiled) -> None:
    cm = compiled
    m = _copy(cm)
    nd = _act_nodes(m, fmt="e2m1")[3]
    f = get_format("e2m1")
    levels = f.levels.tolist()
    levels[2] = levels[3]  # values that round to level 2 come out one level up
    keep = [a for a in nd.attribute if a.name in ("format", "lo", "hi", "keep_zero_point")]
    del nd.attribute[:]
    nd.attribute.extend(keep + [onnx.helper.make_attribute("levels", levels),
                                onnx.helper.make_attribute("thresholds", f.thresholds.tolist())])
    nd.op_type = "QuantizeLUT"
    have = {x.name for x in m.functions}
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    m.functions.extend(x for x in msfp_functions(opset, ["QuantizeLUT"]) if x.name not in have)
    res = _check(cm, m)
    assert not res.ok and res.first_failure.node == _fx_of(cm, m, nd), str(res)
    assert "not at a rounding threshold" in res.first_failure.problem


@pytest.mark.parametrize("reader", ["DequantizeLinear", "MatMulInteger"])
def test_int8_weight_off_by_one_level(compiled_unet2d, reader: str) -> None:
    """One weight value one grid level off in an int8 initializer (export/integer_kernels.py), read by a
    DequantizeLinear (FP32 kernel) or only by an integer kernel."""
    cm = compiled_unet2d
    m = _copy(cm)
    inits = {t.name: t for t in m.graph.initializer}
    pos = 0 if reader == "DequantizeLinear" else 1
    nd = [n for n in m.graph.node if n.op_type == reader and n.input[pos] in inits
          and inits[n.input[pos]].data_type == onnx.TensorProto.INT8][0]
    name = nd.input[pos]
    (q,) = [q for q in quantizer_nodes(cm.graph_module)
            if str(q.target).startswith("msfp.dequantize_packed") and int8_name(q.args[0].target) == name]
    fmt = get_format(q.args[2])
    grid = sorted({round(v * 2.0 ** integer_shift(fmt, 127)) for v in fmt.code_table.tolist()})
    w = numpy_helper.to_array(inits[name]).copy()
    i = grid.index(int(w.flat[0]))
    w.flat[0] = grid[i + 1] if i + 1 < len(grid) else grid[i - 1]
    inits[name].CopyFrom(numpy_helper.from_array(w, name))
    res = _check(cm, m)
    assert not res.ok and res.first_failure.node == q.name, str(res)
    assert "decoded weight values differ from torch by one grid step" in res.first_failure.problem
    assert res.first_failure.name.endswith(".weight")  # named by the layer's parameter path


@pytest.mark.parametrize("layer, reader", [("down_blocks.1.resnets.0.conv_shortcut.bias", "Add"),
                                           ("down_blocks.1.resnets.0.conv2.bias_and_zero_point", "MatMul"),
                                           ("down_blocks.0.downsamplers.0.conv.bias", "Conv")])
def test_float_layer_bug_is_caught_at_the_next_quantizer(compiled_unet2d, layer, reader) -> None:
    """A wrong bias in a 1x1 conv (lowered to MatMulInteger, its bias an Add after the rescale), in a 3x3 conv on an
    activation with a zero point (integer GEMM; the bias is the last row of the zero-point table) and in a strided
    conv (FP32 Conv). None feeds a GroupNorm directly: a GroupNorm would remove a +0.5 on every channel exactly."""
    cm = compiled_unet2d
    m = _copy(cm)
    inits = {t.name: t for t in m.graph.initializer}
    (name,) = [k for k in inits if f".{layer}" in k]
    assert {n.op_type for n in m.graph.node if name in n.input} == {reader}
    b = inits[name]
    v = numpy_helper.to_array(b).copy()
    v[-1 if v.ndim == 2 else slice(None)] += 0.5  # the bias: every channel (a zero-point table's last row)
    b.CopyFrom(numpy_helper.from_array(v, b.name))
    res = _check(cm, m)
    assert not res.ok and "float layers before it diverge" in res.first_failure.problem, str(res)


def test_readable_names_in_the_result(compiled_cond) -> None:
    res = compiled_cond.check()
    names = [c.name for c in res.nodes if c.node != "output"]
    assert any(n.startswith("down_blocks.0.attentions.0.transformer_blocks.0.attn1") for n in names), names[:10]
    assert not any(n.startswith(("quantize", "dequantize")) for n in names)


# ---- the element rule, on synthetic tensors (cheap; covers flips, which tiny models rarely show) ----

def _q(x: torch.Tensor, fmt: str, s: float) -> torch.Tensor:
    return get_format(fmt).quantize(x, torch.tensor(s), torch.tensor(0.0))


def test_judge_counts_flips_at_a_threshold_and_fails_elsewhere() -> None:
    s = 0.5
    fmt = "e2m1"  # levels 0, .5, 1, 1.5, 2, 3, 4, 6
    x_t = torch.tensor([0.2, 1.25 * s - 1e-6, 2.0, 4.9 * s])
    x_o = x_t.clone()
    x_o[1] = 1.25 * s + 1e-6  # straddles the 1 / 1.5 threshold: a rounding flip
    t, o = _q(x_t, fmt, s), _q(x_o, fmt, s)
    flips, problem = _judge(fmt, o, t, torch.tensor(s), torch.tensor(0.0), x_t, x_o, 0.0)
    assert (flips, problem) == (1, None)
    # the same one-level difference where the input is not near a threshold is a bug
    o_bad = t.clone()
    o_bad[2] = 6.0 * s  # x_t[2] = 4 steps; the next level is 6
    flips, problem = _judge(fmt, o_bad, t, torch.tensor(s), torch.tensor(0.0), x_t, x_t, 0.0)
    assert problem and "not at a rounding threshold" in problem
    # two levels apart, or off the grid, is a bug whatever the inputs
    o_far = t.clone()
    o_far[0] = 1.0  # x_t[0] = 0.4 steps -> level 0.5; 1.0 is level 2, three steps up
    assert "2 or more grid steps" in _judge(fmt, o_far, t, torch.tensor(s), torch.tensor(0.0), x_t, x_o, 0.0)[1]
    o_off = t.clone()
    o_off[3] = 0.3
    assert "not on this quantizer" in _judge(fmt, o_off, t, torch.tensor(s), torch.tensor(0.0), x_t, x_o, 0.0)[1]


def test_one_bad_element_in_one_sample_fails() -> None:
    # a bug that hits a single value of a single sample is not averaged away
    s = 0.25
    x = torch.linspace(-1.5, 1.5, 4096).reshape(4, 1024)
    t = _q(x, "e2m1", s)
    o = t.clone()
    o[3, 700] += s * 1.0  # one value one step up, far from a threshold (or two steps: either is a failure)
    flips, problem = _judge("e2m1", o, t, torch.tensor(s), torch.tensor(0.0), x, x, 0.0)
    assert problem is not None and problem.startswith("1 of 4096")


@pytest.mark.parametrize("tol", [1e-3])
def test_check_onnx_uses_given_batches(compiled_unet2d, tol) -> None:
    cm = compiled_unet2d
    b = cm.calibration.batches[0]
    res = check_onnx(cm.graph_module, cm.onnx_model, [b], tol)
    assert res.ok and res.samples == b.sample.shape[0] and res.tolerance == tol


class _FoldedInt4(torch.nn.Module):
    """quantize_folded (uint4, nonzero zero point) feeding a linear layer: the shape fold_zero_point leaves."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor(0.25))
        self.register_buffer("zp", torch.tensor(-0.8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ops.msfp.quantize_folded(x, self.scale, self.zp, "uint4"))


def test_rounding_flip_at_a_folded_quantizer_is_a_flip() -> None:
    # A folded quantizer rounds (x - zp) / scale but outputs scale * level: its thresholds in input units include
    # the zero point. An ORT input a hair across a threshold (as summation order gives) is a flip, not a failure
    # (this failed the INT4 PTQ check of the MNIST models, whose folded zero points are several steps).
    from msfp_compiler.export.onnx import lower_to_onnx

    m = _FoldedInt4().eval()
    s, z = 0.25, -0.8
    x = torch.tensor([[z + s * (2.5 - 1e-4), z + s * 7.2, z + s * 0.3, z + s * 12.0]])
    gm = torch.export.export(m, (x,)).module()
    model, _ = lower_to_onnx(gm, (x,), ["x"])
    (q,) = [n for n in model.graph.node if n.domain == MSFP_DOMAIN]
    delta = numpy_helper.from_array(torch.tensor([[2e-4 * s, 0.0, 0.0, 0.0]]).numpy(), "planted_delta")
    model.graph.initializer.append(delta)
    add = onnx.helper.make_node("Add", [q.input[0], "planted_delta"], ["x_drifted"])
    q.input[0] = "x_drifted"
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([add, *nodes])
    res = check_onnx(gm, model, [type("B", (), {"args": (x,)})()])
    assert res.ok, str(res)
    assert res.flips == 1
