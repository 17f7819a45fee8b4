"""The ``msfp`` ONNX op set: standard-op function bodies for the custom FP4 ops, and the node attributes they read.

Ops (all quantizers take ``x, scale, zero_point`` and ``keep_zero_point``, 0.0 where fold_zero_point moved the zero
point into the consumer's bias):
- ``QuantizeFP``: minifloat rounding by arithmetic (Veltkamp split), M >= 1.
- ``QuantizeLUT``: any grid by table: index = #(thresholds < |v|), value = levels[index].
- ``QuantizeInt``: uniform grid via Round (half to even, as the torch reference).
- ``DequantizeFP4Packed(packed, scale)``: two 4-bit codes per byte -> table lookup -> reshape -> * scale.

Each op has one default body, valid for every format it takes, and faster *variants* that ``annotate_msfp_nodes``
picks per node: ``QuantizeFPUnsigned`` (QuantizeFP for unsigned formats: no sign round trip), ``QuantizeFPSymmetric``
(QuantizeFP for signed grids with lo = -hi and a scalar scale, i.e. E2M1: the sign as a clipped scale, no
tensor-by-tensor Div), ``QuantizeFPUniform`` (QuantizeFP for the formats whose grid
is uniform, E1M2 and UE1M3, with a scalar scale: standard QuantizeLinear -> Clip -> DequantizeLinear, which
onnxruntime runs as vectorized kernels, ~25x faster than the arithmetic body) and ``QuantizeLUTPow2`` (QuantizeLUT
for M = 0: arithmetic instead of the table). Every body also comes without a zero point (op name + ``NoZeroPoint``:
no Sub in front, no Add behind), picked where the zero point is a constant 0 (every signed activation quantizer):
onnxruntime does not drop x - 0 or y + 0 (checked on its optimized graph), and those two passes over the activation
were ~20% of a QuantizeFP body. Measured and dropped: the same for piecewise-uniform grids (E2M1, UE2M2: one
QuantizeLinear -> Clip -> DequantizeLinear chain per binade and sign, summed, then one Mul by the scale): bit-exact
on every float32, but no faster than the arithmetic body (33.5 vs 31.0 ms for E2M1, 21.8 vs 21.0 ms for UE2M2 on
1x320x64x64): five or three chains cost what the eleven or nine elementwise passes do; Cast to FLOAT8E5M2 / E4M3FN
and back as a 2- or 3-mantissa-bit rounder: a scalar loop in ORT 1.32 (14 ms on 4x128x32x32, the whole E2M1 body
takes 3); Cast to FLOAT4E2M1 (which is E2M1 rounding): no CPU kernel in ORT 1.32. Every body has an op name of its
own: ONNX function *overloads* (IR 10) would be the natural fit, but onnx's ReferenceEvaluator ignores them (it ran
the first function of a name for every node), so the same model meant different things in different runtimes.
Every body is bit-exact with ``torch.ops.msfp.quantize`` / ``quantize_folded`` up to the sign of zero
(tests/export/test_msfp_ops.py; tools/bench_ort.py --verify sweeps every float32 at scale 1).
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from msfp_compiler.formats import FPFormat, IntFormat
from msfp_compiler.ops import get_format

__all__ = ["MSFP_DOMAIN", "MSFP_VERSION", "quantize_op_type", "msfp_functions", "annotate_msfp_nodes", "uniform_codes",
           "single_op_model", "used_ops", "refresh_bodies", "base_op", "all_ops", "all_nodes", "BODY_OPS",
           "QUANTIZE_OPS", "op_bodies", "valid_bodies"]

MSFP_DOMAIN = "msfp"
MSFP_VERSION = 1

F, FS, I, IS = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS, onnx.AttributeProto.INT,
                onnx.AttributeProto.INTS)
# (op, variant) -> the op name of that body; the variants are picked per node by annotate_msfp_nodes
_VARIANT_OPS = {("QuantizeFP", ""): "QuantizeFP", ("QuantizeFP", "unsigned"): "QuantizeFPUnsigned",
                ("QuantizeFP", "uniform"): "QuantizeFPUniform", ("QuantizeFP", "symmetric"): "QuantizeFPSymmetric",
                ("QuantizeLUT", ""): "QuantizeLUT", ("QuantizeLUT", "pow2"): "QuantizeLUTPow2",
                ("QuantizeInt", ""): "QuantizeInt"}
NO_ZERO_POINT = "NoZeroPoint"  # op name suffix of a body for a constant zero point of 0: no Sub, no Add
# (op, variant, reads the zero point) -> op name
BODY_OPS = {(op, v, zp): name + ("" if zp else NO_ZERO_POINT) for (op, v), name in _VARIANT_OPS.items()
            for zp in (True, False)}
BODY_OF = {name: key for key, name in BODY_OPS.items()}
QUANTIZE_OPS = tuple(BODY_OPS.values())


def base_op(op_type: str) -> str:
    """The msfp op a body implements (QuantizeFP for QuantizeFPSymmetricNoZeroPoint); other names unchanged."""
    return BODY_OF[op_type][0] if op_type in BODY_OF else op_type


def quantize_op_type(fmt: str) -> str:
    """Which msfp op implements a format: QuantizeInt, QuantizeFP (arithmetic, M >= 1) or QuantizeLUT (M = 0)."""
    f = get_format(fmt)
    if isinstance(f, IntFormat):
        return "QuantizeInt"
    # Round() ties to even *mantissa*, which is the even code only when there is a mantissa bit; E3M0/UE4M0
    # (powers of two) take the table path, whose thresholds encode ties-to-even-code exactly.
    return "QuantizeFP" if f.man_bits >= 1 else "QuantizeLUT"


def _ref(name: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = "value_" + {F: "float", FS: "floats", I: "int", IS: "ints"}[kind], name, kind
    return a


def _const(out: str, attr: str, kind: int) -> onnx.NodeProto:
    n = helper.make_node("Constant", [], [out])
    n.attribute.append(_ref(attr, kind))
    return n


def _ints(out: str, vals: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64, [len(vals)], vals))


def _f32(name: str, v: float) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))


def _shifted(zero_point: bool) -> tuple[list[onnx.NodeProto], str]:
    """The body's input less the zero point: (the Sub that makes "d", "d"), or ([], "x") without a zero point."""
    if not zero_point:
        return [], "x"
    return [helper.make_node("Sub", ["x", "zero_point"], ["d"])], "d"


def _head(zero_point: bool) -> list[onnx.NodeProto]:
    """v = clip((x - zero_point) / scale, lo, hi) -> "c" (x / scale without a zero point)."""
    sub, d = _shifted(zero_point)
    return sub + [
        helper.make_node("Div", [d, "scale"], ["v"]),
        _const("lo", "lo", F),
        _const("hi", "hi", F),
        helper.make_node("Clip", ["v", "lo", "hi"], ["c"]),
    ]


def _tail(zero_point: bool, scaled: bool = False) -> list[onnx.NodeProto]:
    """"qs" = q * scale (unless the body ``scaled`` already), y = qs + zero_point * keep_zero_point.

    keep_zero_point is 1.0, or 0.0 where fold_zero_point moved z into the consumer's bias (z * 0 + qs is exact).
    Bodies without a zero point end at "qs", which ``msfp_functions`` renames "y"."""
    mul = [] if scaled else [helper.make_node("Mul", ["q", "scale"], ["qs"])]
    if not zero_point:
        return mul
    return mul + [
        _const("keep", "keep_zero_point", F),
        helper.make_node("Mul", ["zero_point", "keep"], ["zk"]),
        helper.make_node("Add", ["qs", "zk"], ["y"]),
    ]


# Minifloat rounding without exponent extraction (the Log/Floor/Pow body it replaced had 27 kernels): Veltkamp
# splitting. With C = 2^(23-M) + 1 and float32 round-to-nearest-even, g = C*a, r = g + (a - g) is a rounded to M+1
# significant bits, ties to even (even mantissa = even code). Flooring g at K = 1.5 * 2^(emin+23-M) makes the
# rounding step at least 2^(emin-M), the step of the subnormal range (and of the first normal binade), so subnormals
# need no separate branch. Checked against torch.ops.msfp.quantize on every float32 in [0, max] for
# e2m1/ue3m1/e1m2/ue2m2 (tools/bench_ort.py --verify).
def _veltkamp(a: str, out: str) -> list[onnx.NodeProto]:
    return [
        _const("split", "split_factor", F),
        _const("split_floor", "split_floor", F),
        helper.make_node("Mul", [a, "split"], ["g0"]),
        helper.make_node("Clip", ["g0", "split_floor"], ["g"]),  # max(g0, K): Clip is ~25% faster in ORT
        helper.make_node("Sub", [a, "g"], ["ag"]),
        helper.make_node("Add", ["g", "ag"], [out]),
    ]


# |c| and its sign: c / max(|c|, tiny) is exactly +-1 (0 for c = 0, where r = 0 anyway); ORT's Sign kernel is not
# vectorized (~10x an Abs), the Max + Div pair is cheaper.
_MAGNITUDE = [
    helper.make_node("Abs", ["c"], ["a"]),
    _f32("tiny", float(torch.finfo(torch.float32).tiny)),
    helper.make_node("Max", ["a", "tiny"], ["a_nz"]),
    helper.make_node("Div", ["c", "a_nz"], ["sg"]),
]

# Power-of-two grids (M = 0; e3m0, ue4m0): the table body materializes [..., levels] int64 compares. Here: Veltkamp
# at 1 significant bit (floored as above), which sends every tie 1.5 * 2^e up (a = 0.75 r, exact: r is a power of
# two); a tie must go down when the lower level has the even code, i.e. r = 2^k * 2^emin with k >= 2 even: bit k of
# the integer r / 2^emin (< 2^15 for every 4-bit grid) is one of the bits of 0x55555554. ~3x faster than the table.
_POW2_TIES = [
    _f32("three_quarters", 0.75),
    helper.make_node("Mul", ["r", "three_quarters"], ["r34"]),
    helper.make_node("Equal", ["a", "r34"], ["is_tie"]),
    _const("inv_min", "inv_min_normal", F),
    helper.make_node("Mul", ["r", "inv_min"], ["rk"]),
    helper.make_node("Cast", ["rk"], ["rk_int"], to=TensorProto.INT32),
    helper.make_node("Constant", [], ["even_bits"],
                     value=helper.make_tensor("even_bits", TensorProto.INT32, [], [0x55555554])),
    helper.make_node("BitwiseAnd", ["rk_int", "even_bits"], ["rk_even"]),
    helper.make_node("Cast", ["rk_even"], ["low_even"], to=TensorProto.BOOL),
    helper.make_node("And", ["is_tie", "low_even"], ["down"]),
    _f32("half", 0.5),
    helper.make_node("Mul", ["r", "half"], ["rh"]),
    helper.make_node("Where", ["down", "rh", "r"], ["qa"]),
    helper.make_node("Mul", ["qa", "sg"], ["q"]),
]

_TABLE = [
    helper.make_node("Abs", ["c"], ["a"]),
    helper.make_node("Sign", ["c"], ["sg"]),
    _ints("last", [-1]),
    helper.make_node("Unsqueeze", ["a", "last"], ["ax"]),
    _const("thr", "thresholds", FS),
    helper.make_node("Greater", ["ax", "thr"], ["gt"]),
    helper.make_node("Cast", ["gt"], ["gi"], to=TensorProto.INT64),
    helper.make_node("ReduceSum", ["gi", "last"], ["idx"], keepdims=0),
    _const("lv", "levels", FS),
    helper.make_node("Gather", ["lv", "idx"], ["g"]),
    helper.make_node("Mul", ["g", "sg"], ["q"]),
]

# Uniform grids (E1M2 x2 = -7..7, UE1M3 x4 = 0..15): the grid is step * integers, step = scale * 2^-k (exact), so
# QuantizeLinear(x - zp, step, offset) is round_half_even((x - zp) / scale * 2^k) + offset (x / (scale * 2^-k) is
# 2^k * (x / scale) exactly), saturated to uint8; Clip to the grid's codes is the reference's clip (the bounds are
# integers, so clipping before or after the rounding is the same); DequantizeLinear gives (code - offset) * step =
# the level * scale, rounded once as the reference's product. Whole body: y = that + zp * keep.
def _uniform_body(zero_point: bool) -> list[onnx.NodeProto]:
    def u8(out: str, attr: str) -> list[onnx.NodeProto]:
        return [_const(f"{out}_i", attr, I), helper.make_node("Cast", [f"{out}_i"], [out], to=TensorProto.UINT8)]

    sub, d = _shifted(zero_point)
    return sub + [
        _const("step_factor", "step_factor", F),
        helper.make_node("Mul", ["scale", "step_factor"], ["step"]),
        *u8("offset", "code_offset"), *u8("code_lo", "code_lo"), *u8("code_hi", "code_hi"),
        helper.make_node("QuantizeLinear", [d, "step", "offset"], ["codes"]),
        helper.make_node("Clip", ["codes", "code_lo", "code_hi"], ["codes_c"]),
        helper.make_node("DequantizeLinear", ["codes_c", "step", "offset"], ["qs"]),
    ] + _tail(zero_point, scaled=True)


# Symmetric signed grids (lo = -hi: E2M1; E1M2 takes the uniform body) with a scalar scale (Clip's bounds): the sign
# costs no tensor-by-tensor op. a = min(|v|, hi) is rounded as in the unsigned body; the product's sign comes from
# s = clip(d * 2^64, -scale, scale), which is exactly +-scale wherever |v| reaches the first rounding threshold
# (|d| >= scale * 2^(emin-M-1) >> scale * 2^-64; d * 2^64 = +-inf clips to +-scale too) and a fraction of it only
# where r = 0. So r * s = copysign(r, v) * scale bit for bit (up to the sign of zero): 3 passes where
# Max(|c|, tiny) -> Div -> Mul(sign) -> Mul(scale) took 4, two of them tensor by tensor.
def _symmetric_body(zero_point: bool) -> list[onnx.NodeProto]:
    sub, d = _shifted(zero_point)
    return sub + [
        helper.make_node("Div", [d, "scale"], ["v"]),
        helper.make_node("Abs", ["v"], ["av"]),
        _const("hi", "hi", F),
        helper.make_node("Clip", ["av", "", "hi"], ["a"]),
        *_veltkamp("a", "r"),
        _f32("big", 2.0 ** 64),
        helper.make_node("Mul", [d, "big"], ["d_big"]),
        helper.make_node("Neg", ["scale"], ["neg_scale"]),
        helper.make_node("Clip", ["d_big", "neg_scale", "scale"], ["signed_scale"]),
        helper.make_node("Mul", ["r", "signed_scale"], ["qs"]),
    ] + _tail(zero_point, scaled=True)


def uniform_codes(fmt) -> dict[str, float | int] | None:
    """The QuantizeFPUniform attributes of a format whose levels are step * (every integer 0..n), n * 2^k <= 127
    (signed) or 255 (unsigned), or None: step_factor = 2^-k, code_offset (128 signed, 0 unsigned) and the clip
    codes."""
    if not isinstance(fmt, FPFormat):
        return None
    lv = fmt.levels.double().numpy()
    for k in range(0, 8):
        v = lv * 2.0 ** k
        if np.all(v == np.round(v)):
            break
    else:
        return None
    n = int(v.max())
    offset = 128 if fmt.signed else 0
    if len(v) != n + 1 or offset + n > 255:  # not every integer up to n is a level: not uniform
        return None
    return {"step_factor": 2.0 ** -k, "code_offset": offset, "code_lo": offset + round(fmt.min * 2 ** k),
            "code_hi": offset + n}


# core body (c -> q), attributes it reads, description
_CORE_BODIES: dict[tuple[str, str], tuple[list[onnx.NodeProto], list[str], str]] = {
    ("QuantizeFP", ""): (
        _MAGNITUDE + _veltkamp("a", "r") + [helper.make_node("Mul", ["r", "sg"], ["q"])],
        ["split_factor", "split_floor"],
        "Fake minifloat quantization (M >= 1): v = clip((x - zp) / scale, lo, hi); a = |v|; "
        "g = max(a * split_factor, split_floor); q = sign(v) * (g + (a - g)) (a rounded to M mantissa bits, ties to "
        "even; split_factor = 2^(23-M) + 1, split_floor = 1.5 * 2^(emin+23-M)); y = q * scale + zp * keep."),
    ("QuantizeFP", "unsigned"): (
        _veltkamp("c", "q"),
        ["split_factor", "split_floor"],
        "QuantizeFP for unsigned formats (lo = 0): q = g + (v - g), g = max(v * split_factor, split_floor)."),
    ("QuantizeFP", "uniform"): (
        None,  # a whole body of its own (_WHOLE_BODIES), no clip head or scale tail
        ["step_factor", "code_offset", "code_lo", "code_hi"],
        "QuantizeFP for uniform grids (E1M2, UE1M3) with a scalar scale: y = DequantizeLinear(Clip(QuantizeLinear("
        "x - zp, scale * step_factor, code_offset), code_lo, code_hi), scale * step_factor, code_offset) + zp * keep."),
    ("QuantizeFP", "symmetric"): (
        None,
        ["split_factor", "split_floor"],
        "QuantizeFP for symmetric signed grids (lo = -hi) with a scalar scale: a = min(|v|, hi), v = (x - zp) / "
        "scale; g = max(a * split_factor, split_floor); r = g + (a - g); y = r * clip((x - zp) * 2^64, -scale, "
        "scale) + zp * keep."),
    ("QuantizeLUT", ""): (
        _TABLE,
        ["levels", "thresholds"],
        "Fake quantization onto any grid: zero_point + scale * levels[#(thresholds < |v|)] * sign(v), "
        "v = clip((x - zero_point) / scale, lo, hi); round to nearest, ties to even code."),
    ("QuantizeLUT", "pow2"): (
        _MAGNITUDE + _veltkamp("a", "r") + _POW2_TIES,
        ["split_factor", "split_floor", "inv_min_normal"],
        "QuantizeLUT for power-of-two grids (M = 0): Veltkamp rounding to 1 significant bit, ties moved down where "
        "the lower level has the even code."),
    ("QuantizeInt", ""): (
        [helper.make_node("Round", ["c"], ["q"])],
        [],
        "Fake integer quantization: zero_point + scale * round_half_even(clip((x - zp) / scale, lo, hi))."),
}

_WHOLE_BODIES = {("QuantizeFP", "uniform"): _uniform_body, ("QuantizeFP", "symmetric"): _symmetric_body}


def _renamed(nodes: list[onnx.NodeProto], old: str, new: str) -> list[onnx.NodeProto]:
    out = []
    for n in nodes:
        n = copy.deepcopy(n)
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
        out.append(n)
    return out


def _dequantize_packed() -> onnx.FunctionProto:
    # ORT constant-folds this body at session start and keeps every intermediate of every layer until the pass ends,
    # so the bytes per weight matter: the codes stay uint8 up to their final shape and index with int32 (17 bytes a
    # weight in all; int64 indices before the reshapes took 25, 22.6 GB of RSS to open the SD1.5 UNet).
    return helper.make_function(
        MSFP_DOMAIN, "DequantizeFP4Packed", ["packed", "scale"], ["w"],
        [
            helper.make_node("Constant", [], ["mask"], value=helper.make_tensor("mask", TensorProto.UINT8, [], [15])),
            helper.make_node("Constant", [], ["four"], value=helper.make_tensor("four", TensorProto.UINT8, [], [4])),
            helper.make_node("BitwiseAnd", ["packed", "mask"], ["lo"]),
            helper.make_node("BitShift", ["packed", "four"], ["hi"], direction="RIGHT"),
            _ints("last", [-1]),
            helper.make_node("Unsqueeze", ["lo", "last"], ["lo1"]),
            helper.make_node("Unsqueeze", ["hi", "last"], ["hi1"]),
            helper.make_node("Concat", ["lo1", "hi1"], ["pairs"], axis=-1),
            helper.make_node("Reshape", ["pairs", "last"], ["flat"]),
            _const("shape", "shape", IS),
            helper.make_node("ReduceProd", ["shape"], ["numel"], keepdims=1),
            _ints("zero", [0]),
            helper.make_node("Slice", ["flat", "zero", "numel"], ["codes8"]),
            helper.make_node("Reshape", ["codes8", "shape"], ["codes_shaped"]),
            helper.make_node("Cast", ["codes_shaped"], ["codes"], to=TensorProto.INT32),
            _const("table", "table", FS),
            helper.make_node("Gather", ["table", "codes"], ["wq"]),
            helper.make_node("Mul", ["wq", "scale"], ["w"]),
        ],
        [helper.make_opsetid("", 1)],  # replaced by the caller's opset
        attributes=["format", "table", "shape"],
        doc_string="Packed 4-bit weights: code 2i in the low nibble of byte i, value = table[code] * scale.",
    )


def all_ops() -> list[str]:
    """Every msfp op name with a body (one body per name), default bodies first."""
    return sorted(BODY_OPS.values(), key=lambda o: (BODY_OF[o][1] != "", o)) + ["DequantizeFP4Packed"]


def msfp_functions(opset: int, used: Iterable[str] | None = None) -> list[onnx.FunctionProto]:
    """FunctionProtos (standard-op bodies) for the msfp ops, all or the op names in ``used``.

    Attributes are read by reference; body nodes are named ``<op>.<i>.<op_type>`` because ORT names inlined nodes
    '_inlfunc_<function>_..._<body node name>', so a profile (SessionOptions.enable_profiling) attributes kernel
    time to the msfp op (tools/bench_ort.py reads it)."""
    order = all_ops()
    wanted = order if used is None else sorted(set(used), key=lambda o: order.index(o) if o in order else -1)
    funcs = []
    for op in wanted:
        if op == "DequantizeFP4Packed":
            f = _dequantize_packed()
        else:
            if op not in BODY_OF:
                raise KeyError(f"no body for msfp.{op}")
            base, variant, zero_point = BODY_OF[op]
            body, attrs, doc = _CORE_BODIES[base, variant]
            if body is None:
                nodes = _WHOLE_BODIES[base, variant](zero_point)
            else:
                nodes = _head(zero_point) + body + _tail(zero_point)
            if not zero_point:
                nodes = _renamed(nodes, "qs", "y")
                doc += " Zero point 0: its Sub and Add left out."
            f = helper.make_function(MSFP_DOMAIN, op, ["x", "scale", "zero_point"], ["y"], nodes, [],
                                     attributes=["format", *attrs, "lo", "hi", "keep_zero_point"], doc_string=doc)
        del f.opset_import[:]
        f.opset_import.append(helper.make_opsetid("", opset))
        for i, n in enumerate(f.node):
            n.name = f"{f.name}.{i}.{n.op_type}"
        funcs.append(f)
    return funcs


# each op's variants, fastest first; "" (the op's default body) is valid for every format the op takes
_PREFERENCE = {"QuantizeFP": ("uniform", "unsigned", "symmetric", ""), "QuantizeLUT": ("pow2", ""),
               "QuantizeInt": ("",)}


def _variant_fits(variant: str, fmt, scalar_scale: bool) -> bool:
    """Whether a body variant is exact for ``fmt`` (``scalar_scale``: the node's scale is a one-element
    initializer, as QuantizeLinear's per-tensor form and Clip's bounds need)."""
    if variant == "":
        return True
    if not isinstance(fmt, FPFormat):
        return False
    return {"uniform": scalar_scale and uniform_codes(fmt) is not None,
            "unsigned": not fmt.signed,
            "symmetric": scalar_scale and fmt.signed and fmt.min == -fmt.max,
            "pow2": fmt.man_bits == 0}[variant]


def op_bodies(op_type: str, fmt, scalar_scale: bool = False, zero_point: bool = True) -> list[str]:
    """The bodies (op names) of msfp op ``op_type`` that are exact for a node quantizing onto ``fmt``, fastest
    first, the default body last (``zero_point``: False where it is a constant 0)."""
    return [BODY_OPS[op_type, v, zero_point] for v in _PREFERENCE[op_type] if _variant_fits(v, fmt, scalar_scale)]


def valid_bodies(fmt, scalar_scale: bool = False, zero_point: bool = True) -> list[str]:
    """Every body exact for ``fmt``: those of the op ``quantize_op_type`` assigns, then (minifloats) the table
    body, valid for every grid. The bit-exactness sweep (tools/bench_ort.py --verify) runs them all."""
    op = quantize_op_type(fmt.name)
    out = op_bodies(op, fmt, scalar_scale, zero_point)
    return out + (op_bodies("QuantizeLUT", fmt, scalar_scale, zero_point)[-1:] if op == "QuantizeFP" else [])


def _choose_body(op_type: str, fmt, scalar_scale: bool = False, zero_point: bool = True) -> str:
    """The fastest body (op name) valid for a node of ``op_type`` quantizing onto ``fmt``."""
    return op_bodies(op_type, fmt, scalar_scale, zero_point)[0]


def _body_attributes(op_name: str, fmt) -> dict:
    """The attributes the body ``op_name`` reads from its node (beyond format and keep_zero_point)."""
    op, variant, _ = BODY_OF[op_name]
    extra = {"lo": fmt.min, "hi": fmt.max, "keep_zero_point": 1.0}
    if variant == "uniform":
        return extra | uniform_codes(fmt)
    if isinstance(fmt, FPFormat) and variant == "pow2":
        return extra | {"split_factor": fmt.split_factor, "split_floor": fmt.split_floor,
                        "inv_min_normal": 1.0 / fmt.min_normal}
    if isinstance(fmt, FPFormat) and op == "QuantizeFP":
        return extra | {"split_factor": fmt.split_factor, "split_floor": fmt.split_floor}
    if op == "QuantizeLUT":
        return extra | {"levels": fmt.levels.tolist(), "thresholds": fmt.thresholds.tolist()}
    return extra


def annotate_msfp_nodes(model: onnx.ModelProto, choose_bodies: bool = True) -> dict[str, int]:
    """Pick each msfp node's function body (its op name) and add the attributes it reads (clip bounds, tables,
    split constants, decode table); count the nodes by op name. With ``choose_bodies=False`` every node keeps the
    body it names (tests pin one body that way)."""
    counts: dict[str, int] = {}
    inits = {t.name: t for t in model.graph.initializer}
    scalars = {k for k, t in inits.items() if int(np.prod(t.dims)) == 1}
    for node in all_nodes(model.graph):
        if node.domain != MSFP_DOMAIN:
            continue
        fmt = get_format(next(a.s.decode() for a in node.attribute if a.name == "format"))
        extra: dict = {}
        if node.op_type in QUANTIZE_OPS:
            if choose_bodies:
                zp = inits.get(node.input[2]) if len(node.input) > 2 else None
                zero = zp is not None and int(np.prod(zp.dims)) <= 4096 and not numpy_helper.to_array(zp).any()
                node.op_type = _choose_body(BODY_OF[node.op_type][0], fmt,
                                            len(node.input) > 1 and node.input[1] in scalars, zero_point=not zero)
            extra = _body_attributes(node.op_type, fmt)
        elif node.op_type == "DequantizeFP4Packed":
            extra = {"table": fmt.code_table.tolist()}
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        present = {a.name for a in node.attribute}
        node.attribute.extend(helper.make_attribute(k, v) for k, v in extra.items() if k not in present)
    return counts


def refresh_bodies(model: onnx.ModelProto) -> dict[str, int]:
    """Give an ONNX written by an earlier version the bodies this one picks (in place): each quantize node goes back
    to its op (keeping format and keep_zero_point), is annotated again, and the model's msfp functions are
    rebuilt. The graph is unchanged; returns the new op-name counts."""
    for node in all_nodes(model.graph):
        if node.domain == MSFP_DOMAIN and node.op_type in QUANTIZE_OPS:
            node.op_type = BODY_OF[node.op_type][0]
            keep = [a for a in node.attribute if a.name in ("format", "keep_zero_point")]
            del node.attribute[:]
            node.attribute.extend(keep)
    counts = annotate_msfp_nodes(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.functions[:]
    model.functions.extend(msfp_functions(opset, used_ops(model)))
    return counts


def used_ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in all_nodes(model.graph) if n.domain == MSFP_DOMAIN}


def all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


Arg = Union[np.ndarray, tuple[int, Sequence]]


def single_op_model(op_type: str, fmt: str, args: Mapping[str, Arg], out_shape: Sequence, *,
                    choose_body: bool = False, opset: int = 20, **attrs) -> onnx.ModelProto:
    """A checked one-node model of an msfp op (tests, benchmarks, the bit-exactness sweep).

    ``args`` are the op's inputs in order: a numpy array becomes an initializer (as scales and zero points are in
    compiled models, so ORT's constant folding runs on them), ``(elem_type, shape)`` a graph input. ``op_type``
    names the body; ``choose_body`` lets ``annotate_msfp_nodes`` pick the fastest one for the format instead."""
    node = helper.make_node(op_type, list(args), ["y"], domain=MSFP_DOMAIN, format=fmt, **attrs)
    inputs, inits = [], []
    for name, a in args.items():
        if isinstance(a, np.ndarray):
            inits.append(numpy_helper.from_array(a, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, a[0], list(a[1])))
    graph = helper.make_graph([node], op_type, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(MSFP_DOMAIN, MSFP_VERSION)])
    annotate_msfp_nodes(model, choose_bodies=choose_body)
    model.functions.extend(msfp_functions(opset, used_ops(model)))
    onnx.checker.check_model(model, full_check=True)
    return model
