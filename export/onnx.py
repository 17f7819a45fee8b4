"""Lowering of the quantized fx graph to ONNX with custom ``msfp`` ops that stock onnxruntime runs.

torch.onnx.export(dynamo=True) translates ``torch.ops.msfp.*`` through a custom translation table into nodes of
domain ``msfp`` that carry only the format name. A post-processing step then (1) adds the format's tables as node
attributes, (2) appends one model-local FunctionProto per msfp op whose body uses standard ops and reads those
attributes by reference, and (3) imports the msfp opset. ORT inlines the functions, so no plugin is needed; a native
kernel library can still claim the nodes by (domain, op_type) and use the attributes.

Custom ops:
- ``msfp.QuantizeFP(x, scale, zero_point)``: minifloat rounding by arithmetic (Veltkamp split) for M >= 1;
  overload ``unsigned`` skips the sign handling.
- ``msfp.QuantizeLUT(x, scale, zero_point)``: any grid by table: index = #(thresholds < |v|), value = levels[index];
  overload ``pow2`` for M = 0 (power-of-two grids) by arithmetic.
- ``msfp.QuantizeInt(x, scale, zero_point)``: uniform grid via Round (half to even, as the torch reference).
  All take ``keep_zero_point`` (0.0 when the zero point was folded into the consumer's bias).
- ``msfp.DequantizeFP4Packed(packed, scale)``: two 4-bit codes per byte -> table lookup -> reshape -> * scale.
Every body is bit-exact with ``torch.ops.msfp.quantize`` (tools/bench_ort.py --verify sweeps every float32 at
scale 1). The default body of each op is valid for every format it takes; ``annotate_msfp_nodes`` picks the faster
overload per node (ONNX IR 10 function overloads, ``NodeProto.overload``). Models over 2 GB are checked and saved
with external data (``save_atomic``).
"""

from __future__ import annotations

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
from msfp_compiler.formats import FPFormat, IntFormat
from msfp_compiler.ops import get_format

__all__ = ["MSFP_DOMAIN", "lower_to_onnx", "msfp_functions", "annotate_msfp_nodes", "save_atomic", "check_model"]

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
    f32 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [v]))
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
    # Minifloat rounding without exponent extraction (12 kernels; the Log/Floor/Pow body it replaces had 27):
    # Veltkamp splitting. With C = 2^(23-M) + 1 and float32 round-to-nearest-even, g = C*a, q = g + (a - g) is a
    # rounded to M+1 significant bits, ties to even (even mantissa = even code). Flooring g at
    # K = 1.5 * 2^(emin+23-M) makes the rounding step at least 2^(emin-M), the step of the subnormal range (and of
    # the first normal binade), so subnormals need no separate branch. Checked against torch.ops.msfp.quantize on
    # every float32 in [0, max] for e2m1/ue3m1/e1m2/ue2m2 (tools/bench_ort.py --verify).
    def veltkamp(a: str) -> list[onnx.NodeProto]:
        return [
            _const("split", "split_factor", F),
            _const("split_floor", "split_floor", F),
            helper.make_node("Mul", [a, "split"], ["g0"]),
            helper.make_node("Max", ["g0", "split_floor"], ["g"]),
            helper.make_node("Sub", [a, "g"], ["ag"]),
            helper.make_node("Add", ["g", "ag"], ["r"]),
        ]

    # |c| and its sign: c / max(|c|, tiny) is exactly +-1 (0 for c = 0, where r = 0 anyway); ORT's Sign kernel is
    # not vectorized (~10x an Abs), the Max + Div pair is cheaper.
    magnitude = [
        helper.make_node("Abs", ["c"], ["a"]),
        f32("tiny", float(torch.finfo(torch.float32).tiny)),
        helper.make_node("Max", ["a", "tiny"], ["a_nz"]),
        helper.make_node("Div", ["c", "a_nz"], ["sg"]),
    ]
    quantize_fp = helper.make_function(
        MSFP_DOMAIN, "QuantizeFP", ["x", "scale", "zero_point"], ["y"],
        clip_head + magnitude + veltkamp("a") + [helper.make_node("Mul", ["r", "sg"], ["q"])] + dequant_tail,
        imports, attributes=["format", "split_factor", "split_floor", "lo", "hi", "keep_zero_point"],
        doc_string="Fake minifloat quantization (M >= 1): v = clip((x - zp) / scale, lo, hi); a = |v|; "
                   "g = max(a * split_factor, split_floor); q = sign(v) * (g + (a - g)) (a rounded to M mantissa "
                   "bits, ties to even; split_factor = 2^(23-M) + 1, split_floor = 1.5 * 2^(emin+23-M)); "
                   "y = q * scale + zp * keep_zero_point.",
    )
    # Overload for unsigned formats: after the clip at lo = 0, v >= 0, so no magnitude / sign round trip.
    quantize_fp_unsigned = helper.make_function(
        MSFP_DOMAIN, "QuantizeFP", ["x", "scale", "zero_point"], ["y"],
        clip_head + veltkamp("c") + [helper.make_node("Identity", ["r"], ["q"])] + dequant_tail,
        imports, attributes=["format", "split_factor", "split_floor", "lo", "hi", "keep_zero_point"],
        doc_string="QuantizeFP for unsigned formats (lo = 0): q = g + (v - g), g = max(v * split_factor, "
                   "split_floor).",
    )
    quantize_fp_unsigned.overload = "unsigned"
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
    # Overload for M = 0 formats (powers of two; e3m0, ue4m0): the table body materializes [..., levels] int64
    # compares. Here: Veltkamp at 1 significant bit (floored as above), which sends every tie 1.5 * 2^e up; a tie
    # must go down when the lower level has the even code, i.e. r = 2^k * 2^emin with k >= 2 even, which is
    # exactly 2^k mod 6 == 4 (k = 0 gives 1, odd k gives 2); t mod 6 = t - 6 * floor(t / 6) is exact here (t/6 is
    # never an integer, and ORT's Mod kernel is ~40x slower than Floor). ~3x faster than the table in ORT.
    quantize_pow2 = helper.make_function(
        MSFP_DOMAIN, "QuantizeLUT", ["x", "scale", "zero_point"], ["y"],
        clip_head + magnitude + veltkamp("a") + [
            f32("four", 4.0),
            f32("three", 3.0),
            helper.make_node("Mul", ["a", "four"], ["a4"]),
            helper.make_node("Mul", ["r", "three"], ["r3"]),
            helper.make_node("Equal", ["a4", "r3"], ["is_tie"]),
            _const("inv_min", "inv_min_normal", F),
            f32("sixth", 1.0 / 6.0),
            f32("six", 6.0),
            helper.make_node("Mul", ["r", "inv_min"], ["rk"]),
            helper.make_node("Mul", ["rk", "sixth"], ["rk6"]),
            helper.make_node("Floor", ["rk6"], ["fl6"]),
            helper.make_node("Mul", ["fl6", "six"], ["m6"]),
            helper.make_node("Sub", ["rk", "m6"], ["rm"]),
            helper.make_node("Equal", ["rm", "four"], ["low_even"]),
            helper.make_node("And", ["is_tie", "low_even"], ["down"]),
            helper.make_node("Cast", ["down"], ["down_f"], to=TensorProto.FLOAT),
            f32("half", 0.5),
            helper.make_node("Mul", ["r", "half"], ["rh"]),
            helper.make_node("Mul", ["rh", "down_f"], ["fix"]),
            helper.make_node("Sub", ["r", "fix"], ["qa"]),
            helper.make_node("Mul", ["qa", "sg"], ["q"]),
        ] + dequant_tail,
        imports, attributes=["format", "split_factor", "split_floor", "inv_min_normal", "lo", "hi", "keep_zero_point"],
        doc_string="QuantizeLUT for power-of-two grids (M = 0): Veltkamp rounding to 1 significant bit, ties moved "
                   "down where the lower level has the even code.",
    )
    quantize_pow2.overload = "pow2"
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
    funcs = [quantize_fp, quantize_fp_unsigned, quantize_lut, quantize_pow2, quantize_int, dequant_packed]
    # Named body nodes: ORT names inlined nodes '_inlfunc_<function>_..._<body node name>', so a profile
    # (SessionOptions.enable_profiling) attributes kernel time to the msfp op (tools/bench_ort.py reads it).
    for f in funcs:
        for i, n in enumerate(f.node):
            n.name = f"{f.name}{'.' + f.overload if f.overload else ''}.{i}.{n.op_type}"
    return funcs


def _choose_overload(node: onnx.NodeProto, fmt, ir_version: int) -> str:
    """The fastest function body valid for this node (function overloads need IR version 10)."""
    if ir_version < 10 or not isinstance(fmt, FPFormat):
        return ""
    if node.op_type == "QuantizeFP" and not fmt.signed:
        return "unsigned"
    if node.op_type == "QuantizeLUT" and fmt.man_bits == 0:
        return "pow2"
    return ""


def annotate_msfp_nodes(model: onnx.ModelProto, choose_overloads: bool = True) -> dict[str, int]:
    """Pick each msfp node's function body (overload) and add the attributes it reads (clip bounds, tables, split
    constants, decode table); count the nodes. An overload already set on a node is kept; with
    ``choose_overloads=False`` every node keeps the body it names (tests pin one body that way)."""
    counts: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        if node.domain != MSFP_DOMAIN:
            continue
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        fmt = get_format(next(a.s.decode() for a in node.attribute if a.name == "format"))
        extra: dict = {}
        if node.op_type in ("QuantizeFP", "QuantizeLUT", "QuantizeInt"):
            if choose_overloads and not node.overload:
                node.overload = _choose_overload(node, fmt, model.ir_version)
            extra = {"lo": fmt.min, "hi": fmt.max, "keep_zero_point": 1.0}
            if isinstance(fmt, FPFormat):
                m, emin = fmt.man_bits, 1 - fmt.bias
                split = {"split_factor": 2.0 ** (23 - m) + 1.0, "split_floor": 1.5 * 2.0 ** (emin + 23 - m)}
            if node.op_type == "QuantizeLUT" and node.overload == "pow2":
                extra |= split | {"inv_min_normal": 2.0 ** -emin}
            elif node.op_type == "QuantizeLUT":
                extra |= {"levels": fmt.levels.tolist(), "thresholds": fmt.thresholds.tolist()}
            elif node.op_type == "QuantizeFP":
                extra |= split
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
    check_model(model)
    return model, counts


MAX_PROTO_BYTES = 2**31 - 2**26  # protobuf cannot serialize a message over 2 GB; keep a margin for the graph
_ALIGN = 4096  # external tensors start on page boundaries, so ORT can map them


def _copy_fields(dst, src, skip: tuple[str, ...] = ()) -> None:
    """Shallow-structured copy of a protobuf message's set fields except `skip` (which stays empty in dst)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()  # typed fields (float_data, ...) -> little-endian raw bytes


def _externalized(model: onnx.ModelProto, write, min_bytes: int) -> onnx.ModelProto:
    """A copy of `model` whose top-level initializers of at least `min_bytes` are ONNX external-data references.

    ``write(data: bytes) -> (location, offset)`` stores one tensor. The caller's model is not modified, and no
    tensor is copied except the one being written: mutating the model in place (what onnx.save_model with
    save_as_external_data does: it clears raw_data) would destroy the caller's model, and protobuf arenas do not
    give cleared memory back anyway.
    """
    head = onnx.ModelProto()
    _copy_fields(head, model, skip=("graph",))
    _copy_fields(head.graph, model.graph, skip=("initializer",))
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.ByteSize() < min_bytes:
            head.graph.initializer.add().CopyFrom(t)
            continue
        data = _tensor_bytes(t)
        location, offset = write(data)
        ref = head.graph.initializer.add()
        _copy_fields(ref, t, skip=("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                                   "double_data", "uint64_data", "external_data", "data_location"))
        ref.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            e = ref.external_data.add()
            e.key, e.value = k, v
    return head


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model, also for models over 2 GB (checked with their large tensors left out)."""
    if _can_size(model) and model.ByteSize() <= MAX_PROTO_BYTES:
        onnx.checker.check_model(model, full_check=False)
        return
    # Check the graph with its large tensors as external references to an empty placeholder file: the checker
    # wants the file to exist, not the bytes, so nothing of the weights is copied or written.
    with tempfile.TemporaryDirectory(prefix="msfp_check_") as d:
        (Path(d) / "tensors.data").touch()
        head = _externalized(model, lambda data: ("tensors.data", 0), 1024)
        (Path(d) / "model.onnx").write_bytes(head.SerializeToString())
        onnx.checker.check_model(str(Path(d) / "model.onnx"), full_check=False)


def save_atomic(model: onnx.ModelProto, path: Path, external_data_threshold: int = MAX_PROTO_BYTES,
                external_min_bytes: int = 1024) -> None:
    """Write model to path atomically (temp file + rename; no partial file on error or interrupt).

    Models over `external_data_threshold` bytes (protobuf cannot serialize more than 2 GB) keep every initializer
    of at least `external_min_bytes` in ``<name>.data`` next to the .onnx (ONNX external data, page-aligned
    offsets), which onnxruntime loads from the .onnx path. The data file is written to a temp name and renamed
    before the .onnx that refers to it; a stale ``<name>.data`` from an earlier save is never appended to, and is
    removed when the new model needs none. The caller's ModelProto is left unchanged.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MsfpError(f"{path}: output folder does not exist")
    big = model.ByteSize() > external_data_threshold if _can_size(model) else True
    data_path = path.with_name(path.name + ".data")
    temps: list[str] = []

    def temp(name: str) -> tuple[int, str]:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
        temps.append(tmp)
        return fd, tmp

    try:
        fd, tmp = temp(path.name)
        with os.fdopen(fd, "wb") as f_onnx:
            if big:
                dfd, tmp_data = temp(data_path.name)
                with os.fdopen(dfd, "wb") as f_data:
                    def write(data: bytes) -> tuple[str, int]:
                        f_data.write(b"\0" * (-f_data.tell() % _ALIGN))
                        offset = f_data.tell()
                        f_data.write(data)
                        return data_path.name, offset

                    head = _externalized(model, write, external_min_bytes)
                f_onnx.write(head.SerializeToString())
            else:
                f_onnx.write(model.SerializeToString())
        if big:
            os.replace(tmp_data, data_path)
        os.replace(tmp, path)
        if not big and data_path.exists():
            data_path.unlink()  # left by an earlier, larger model at this path; the new .onnx does not use it
    except PermissionError as e:
        raise MsfpError(f"{path}: cannot write ({e.strerror})") from e
    except OSError as e:
        raise MsfpError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)


def _can_size(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False
