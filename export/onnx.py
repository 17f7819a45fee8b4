"""Lowering of the quantized fx graph to ONNX with custom ``msfp`` ops that stock onnxruntime runs.

torch.onnx.export(dynamo=True) translates ``torch.ops.msfp.*`` through a custom translation table into nodes of
domain ``msfp`` that carry only the format name. A post-processing step then (1) adds the format's tables as node
attributes, (2) appends one model-local FunctionProto per msfp op whose body uses standard ops and reads those
attributes by reference, and (3) imports the msfp opset. ORT inlines the functions, so no plugin is needed; a native
kernel library can still claim the nodes by (domain, op_type) and use the attributes.

Custom ops:
- ``msfp.QuantizeFP(x, scale, zero_point)``: minifloat rounding by arithmetic (exponent, step, Round) for M >= 1.
- ``msfp.QuantizeLUT(x, scale, zero_point)``: any grid by table: index = #(thresholds < |v|), value = levels[index].
- ``msfp.QuantizeInt(x, scale, zero_point)``: uniform grid via Round (half to even, as the torch reference).
  Both take ``keep_zero_point`` (0.0 when the zero point was folded into the consumer's bias).
- ``msfp.DequantizeFP4Packed(packed, scale)``: two 4-bit codes per byte -> table lookup -> reshape -> * scale.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
import onnxscript
import torch
import torch.fx as fx
from onnx import TensorProto, helper
from onnxscript import FLOAT, UINT8

from msfp_compiler.errors import MsfpError
from msfp_compiler.formats import IntFormat
from msfp_compiler.ops import get_format

__all__ = ["MSFP_DOMAIN", "lower_to_onnx", "msfp_functions", "annotate_msfp_nodes", "save_atomic"]

MSFP_DOMAIN = "msfp"
MSFP_VERSION = 1

_msfp = onnxscript.values.Opset(MSFP_DOMAIN, MSFP_VERSION)
# The translation functions live in their own opset: the exporter inlines them and leaves the msfp node inside.
_wrap = onnxscript.values.Opset("msfp.translation", 1)


@onnxscript.script(_wrap)
def _quantize_fp(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeFP(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _quantize_int(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeInt(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _dequantize_packed(packed: UINT8, scale: FLOAT, fmt: str, shape: Sequence[int]) -> FLOAT:
    return _msfp.DequantizeFP4Packed(packed, scale, format=fmt, shape=shape)


@onnxscript.script(_wrap)
def _quantize_lut(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeLUT(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _quantize_lut_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeLUT(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


@onnxscript.script(_wrap)
def _quantize_fp_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeFP(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


@onnxscript.script(_wrap)
def _quantize_int_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeInt(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


def quantize_op_type(fmt: str) -> str:
    """Which msfp op implements a format: QuantizeInt, QuantizeFP (arithmetic, M >= 1) or QuantizeLUT (M = 0)."""
    f = get_format(fmt)
    if isinstance(f, IntFormat):
        return "QuantizeInt"
    # Round() ties to even *mantissa*, which is the even code only when there is a mantissa bit; E3M0/UE4M0
    # (powers of two) take the table path, whose thresholds encode ties-to-even-code exactly.
    return "QuantizeFP" if f.man_bits >= 1 else "QuantizeLUT"


_PLAIN = {"QuantizeInt": _quantize_int, "QuantizeFP": _quantize_fp, "QuantizeLUT": _quantize_lut}
_FOLDED = {"QuantizeInt": _quantize_int_folded, "QuantizeFP": _quantize_fp_folded, "QuantizeLUT": _quantize_lut_folded}


def _translate_quantize(x, scale, zero_point, fmt: str):
    return _PLAIN[quantize_op_type(fmt)](x, scale, zero_point, fmt=fmt)


def _translate_quantize_folded(x, scale, zero_point, fmt: str):
    return _FOLDED[quantize_op_type(fmt)](x, scale, zero_point, fmt=fmt)


def _translate_dequantize_packed(packed, scale, fmt: str, shape: Sequence[int]):
    return _dequantize_packed(packed, scale, fmt=fmt, shape=list(shape))


def _ref(name: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = "value_" + {onnx.AttributeProto.FLOAT: "float",
                                                  onnx.AttributeProto.FLOATS: "floats",
                                                  onnx.AttributeProto.INTS: "ints"}[kind], name, kind
    return a


def _const(out: str, attr: str, kind: int) -> onnx.NodeProto:
    n = helper.make_node("Constant", [], [out])
    n.attribute.append(_ref(attr, kind))
    return n


def _ints(out: str, vals: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, TensorProto.INT64, [len(vals)], vals))


def msfp_functions(opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos (standard-op bodies) for every msfp op; attributes are read by reference."""
    F, FS, IS = onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS
    imports = [helper.make_opsetid("", opset)]
    clip_head = [
        helper.make_node("Sub", ["x", "zero_point"], ["d"]),
        helper.make_node("Div", ["d", "scale"], ["v"]),
        _const("lo", "lo", F),
        _const("hi", "hi", F),
        helper.make_node("Clip", ["v", "lo", "hi"], ["c"]),
    ]
    # keep_zero_point is 1.0, or 0.0 where fold_zero_point moved z into the consumer's bias (z * 0 + qs is exact).
    dequant_tail = [
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        _const("keep", "keep_zero_point", F),
        helper.make_node("Mul", ["zero_point", "keep"], ["zk"]),
        helper.make_node("Add", ["qs", "zk"], ["y"]),
    ]
    f32 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))
    quantize_fp = helper.make_function(
        MSFP_DOMAIN, "QuantizeFP", ["x", "scale", "zero_point"], ["y"],
        clip_head + [
            helper.make_node("Abs", ["c"], ["a"]),
            helper.make_node("Sign", ["c"], ["sg"]),
            f32("two", 2.0),
            f32("inv_ln2", 1.0 / math.log(2.0)),
            _const("emin", "emin", F),
            _const("mbits", "mantissa_bits", F),
            # e = floor(log2 a), clamped to the subnormal exponent; Log is within an ulp, so fix +-1 at powers of 2.
            helper.make_node("Log", ["a"], ["ln"]),
            helper.make_node("Mul", ["ln", "inv_ln2"], ["l2"]),
            helper.make_node("Floor", ["l2"], ["e0"]),
            helper.make_node("Max", ["e0", "emin"], ["e1"]),
            helper.make_node("Pow", ["two", "e1"], ["p"]),
            helper.make_node("Mul", ["p", "two"], ["p2"]),
            helper.make_node("GreaterOrEqual", ["a", "p2"], ["too_low"]),
            helper.make_node("Less", ["a", "p"], ["below"]),
            helper.make_node("Greater", ["e1", "emin"], ["above_min"]),
            helper.make_node("And", ["below", "above_min"], ["too_high"]),
            helper.make_node("Cast", ["too_low"], ["inc"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["too_high"], ["dec"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["e1", "inc"], ["e2"]),
            helper.make_node("Sub", ["e2", "dec"], ["e"]),
            # step = 2^(e - M); a / step is exact, Round is half-to-even = even mantissa = even code.
            helper.make_node("Sub", ["e", "mbits"], ["es"]),
            helper.make_node("Pow", ["two", "es"], ["step"]),
            helper.make_node("Div", ["a", "step"], ["r"]),
            helper.make_node("Round", ["r"], ["rr"]),
            helper.make_node("Mul", ["rr", "step"], ["qa"]),
            helper.make_node("Mul", ["qa", "sg"], ["q"]),
        ] + dequant_tail,
        imports, attributes=["format", "mantissa_bits", "emin", "lo", "hi", "keep_zero_point"],
        doc_string="Fake minifloat quantization (M >= 1): v = clip((x - zp) / scale, lo, hi); "
                   "q = sign(v) * round_half_even(|v| / 2^(e - M)) * 2^(e - M), e = max(floor(log2 |v|), emin); "
                   "y = q * scale + zp * keep_zero_point.",
    )
    quantize_lut = helper.make_function(
        MSFP_DOMAIN, "QuantizeLUT", ["x", "scale", "zero_point"], ["y"],
        clip_head + [
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
        ] + dequant_tail,
        imports, attributes=["format", "levels", "thresholds", "lo", "hi", "keep_zero_point"],
        doc_string="Fake quantization onto any grid: zero_point + scale * levels[#(thresholds < |v|)] * sign(v), "
                   "v = clip((x - zero_point) / scale, lo, hi); round to nearest, ties to even code.",
    )
    quantize_int = helper.make_function(
        MSFP_DOMAIN, "QuantizeInt", ["x", "scale", "zero_point"], ["y"],
        clip_head + [helper.make_node("Round", ["c"], ["q"])] + dequant_tail,
        imports, attributes=["format", "lo", "hi", "keep_zero_point"],
        doc_string="Fake integer quantization: zero_point + scale * round_half_even(clip((x - zp) / scale, lo, hi)).",
    )
    dequant_packed = helper.make_function(
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
            helper.make_node("Cast", ["codes8"], ["codes"], to=TensorProto.INT64),
            _const("table", "table", FS),
            helper.make_node("Gather", ["table", "codes"], ["vals"]),
            helper.make_node("Reshape", ["vals", "shape"], ["wq"]),
            helper.make_node("Mul", ["wq", "scale"], ["w"]),
        ],
        imports, attributes=["format", "table", "shape"],
        doc_string="Packed 4-bit weights: code 2i in the low nibble of byte i, value = table[code] * scale.",
    )
    return [quantize_fp, quantize_lut, quantize_int, dequant_packed]


def annotate_msfp_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Add the format tables (levels, thresholds, clip bounds, decode table) to every msfp node; count them."""
    counts: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        if node.domain != MSFP_DOMAIN:
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        fmt = get_format(next(a.s.decode() for a in node.attribute if a.name == "format"))
        extra: dict = {}
        if node.op_type in ("QuantizeFP", "QuantizeLUT", "QuantizeInt"):
            extra = {"lo": fmt.min, "hi": fmt.max, "keep_zero_point": 1.0}
            if node.op_type == "QuantizeLUT":
                extra |= {"levels": fmt.levels.tolist(), "thresholds": fmt.thresholds.tolist()}
            if node.op_type == "QuantizeFP":
                extra |= {"mantissa_bits": float(fmt.man_bits), "emin": float(1 - fmt.bias)}
        elif node.op_type == "DequantizeFP4Packed":
            extra = {"table": fmt.code_table.tolist()}
        present = {a.name for a in node.attribute}
        node.attribute.extend(helper.make_attribute(k, v) for k, v in extra.items() if k not in present)
    return counts


def _all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scope names (~2 KB a node: more than packed 4-bit weights)."""
    for n in _all_nodes(model.graph):
        del n.metadata_props[:]
        n.doc_string = ""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    for t in model.graph.initializer:
        del t.metadata_props[:]
    del model.metadata_props[:]


def _finalize(model: onnx.ModelProto) -> dict[str, int]:
    _strip_debug_info(model)
    counts = annotate_msfp_nodes(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [o for o in model.opset_import if o.domain not in (MSFP_DOMAIN, "msfp.translation")]
    del model.opset_import[:]
    model.opset_import.extend(keep + [helper.make_opsetid(MSFP_DOMAIN, MSFP_VERSION)])
    existing = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in msfp_functions(opset) if (f.domain, f.name) not in existing)
    model.producer_name, model.producer_version = "msfp-compiler", "0.1.0"
    return counts


def lower_to_onnx(gm: fx.GraphModule, example_args: tuple, input_names: list[str], *,
                  output_name: str = "noise_pred") -> tuple[onnx.ModelProto, dict[str, int]]:
    """Export the (quantized) GraphModule to an ONNX ModelProto with msfp custom ops and a dynamic batch."""
    table = {
        torch.ops.msfp.quantize.default: _translate_quantize,
        torch.ops.msfp.quantize_folded.default: _translate_quantize_folded,
        torch.ops.msfp.dequantize_packed.default: _translate_dequantize_packed,
    }
    batch = torch.export.Dim.AUTO
    dyn = tuple({0: batch} for _ in example_args)
    with torch.no_grad():
        prog = torch.onnx.export(gm, example_args, dynamo=True, custom_translation_table=table,
                                 input_names=input_names, output_names=[output_name], dynamic_shapes=dyn,
                                 optimize=True, verbose=False, report=False, external_data=False)
    if prog is None:
        raise MsfpError("torch.onnx.export returned no program")
    model = prog.model_proto
    counts = _finalize(model)
    # Rename the symbolic batch dim so every input and the output share one readable name.
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.checker.check_model(model, full_check=False)
    return model, counts


def save_atomic(model: onnx.ModelProto, path: Path, external_data_threshold: int = 2**31 - 2**26) -> None:
    """Write model to path via a temp file + rename; models over ~2 GB go to '<name>.data' external data."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MsfpError(f"{path}: output folder does not exist")
    big = model.ByteSize() > external_data_threshold if _can_size(model) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if big:
            data_name = path.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            # onnx writes the data file next to tmp under its final name; only the .onnx needs the rename.
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except PermissionError as e:
        raise MsfpError(f"{path}: cannot write ({e.strerror})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False
