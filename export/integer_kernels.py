"""Integer weights and integer matmuls in the lowered ONNX, so a plain onnxruntime session holds 1 byte a weight.

Every 4-bit weight grid we use is an integer grid after a power-of-two rescale (E1M2 x2 = INT4, E2M1 x2 -> +-12,
E3M0 x4 -> +-64), and so are most activation grids (UE2M2 x4 -> 0..28, UE3M1 x8 -> 0..192; not UE4M0). Two rewrites
of the ONNX graph use that:

1. ``DequantizeFP4Packed(packed, scale)`` on initializers becomes an int8 initializer (the codes' integer values)
   and a standard ``DequantizeLinear`` with the per-channel scale / 2^k. onnxruntime's constant folding leaves
   DequantizeLinear alone while QDQ optimizations are on (the default), so the session keeps the int8 tensor and
   dequantizes at run time; the msfp function body on initializers was folded to FP32 at session start (4 bytes a
   weight, and a fold peak of 16.7 GB on SD1.5). ``int * (scale / 2^k)`` equals ``(int / 2^k) * scale`` bit for bit
   (both are the exact product rounded once), so the weights are unchanged. A weight transposed by the exporter
   (``Transpose(perm=[1, 0])``, linears on 3-D inputs) is stored transposed instead.
2. A linear whose input quantizer is integer-representable (scalar scale, zero point 0 or folded into the bias) and
   whose weight came from 1. becomes ``MatMulInteger(codes_u8, w_i8) -> Cast -> Mul(s_a * s_w) [-> Add bias]``,
   where ``codes = QuantizeLinear(y, s_a / 2^ka, offset)`` recovers the integer grid value from the quantizer's
   output y (offset 128 for signed grids, given to MatMulInteger as the activation zero point). The int32
   accumulation is exact; torch's FP32 matmul of the fake-quantized operands rounds after every partial sum, so the
   two differ by that rounding only (~1e-7 relative), and the integer result is the more accurate one. Weights are
   limited to |w| <= 64 so that the u8 x s8 pair sums of AVX2 kernels without VNNI (vpmaddubsw, int16 saturating)
   cannot saturate: 2 * 255 * 64 < 2^15.

Convolutions: a "same" conv (odd square-ish kernel, k // 2 zero padding, stride 1, no groups; 1x1 and 3x3 in our UNets)
on an integer-grid activation runs as the integer GEMM it is: uint8 im2col of the codes (NHWC Transpose, Pad, one Slice
per tap, Concat) -> MatMulInteger with the int8 weight stored [(kh, kw, C), C_out] (``_integer_conv``). Activations that
carry a zero point (unsigned grids after SiLU, where the FP32 conv pads with zeros, not with z) get z times the weight
sums of the taps inside the image added back, by a tiny MatMul of a uint8 tap mask. On this host (ORT 1.32, AVX2 without
VNNI) the 3x3 convs run 0.49-0.62x (1 thread) and 0.44-0.76x (2 threads) the prepacked FP32 Conv, and 1x1 convs
0.55-0.61x (tools/bench_ort_conv.py); on the previous host (slower memory) the same forms were 0.99-1.12x and 0.97-1.06x
and were dropped. A 1x1 conv on a Concat of quantizer outputs (the up blocks' shortcuts) runs one integer GEMM per part.
Other convs (strided, 8-bit first/last layers, inputs that are not quantizer outputs) keep FP32 kernels on the
dequantized weight: onnxruntime's ConvInteger runs 3-4x slower than its FP32 Conv on this class of CPU, and QLinearConv
requantizes its output (inexact). A weight that comes out of a DequantizeLinear at run time is not a constant to ORT, so
its Conv loses the weight prepacking (NCHWc layout, fused activation) that FP32 models get. ``conv_weights="float32"``
(CompileConfig.conv_weights) trades memory for that speed on those convs: their weights are decoded here into FP32
initializers (the same values, 4 bytes a weight); convs that run as integer GEMMs keep int8 (the faster kernel).
``conv_weights="float32:F"`` is the middle ground: FP32 kernels for the share F of those conv weight elements, the convs
with the most output positions (multiply-adds per weight) first. A session holds ~7 bytes more per FP32 conv weight than
per int8 one (the initializer and its NCHWc copy) until the model is saved with external data (~5 bytes). An FP16
initializer + Cast would halve the file but not the session: ORT folds the Cast at session start (checked on an
optimized-model dump).
Measured on the previous host (ORT 1.32, AVX2 without VNNI, 1 thread): MatMulInteger on the linears: 0.84-1.0x FP32
MatMul (a DequantizeLinear weight + FP32 MatMul, which loses prepacking, is 2.3-2.6x). Dropped: onnxruntime's contrib
MatMulNBits (com.microsoft, 4- or 8-bit block-quantized weights; E1M2 = INT4 exactly, E2M1 x2 in 8 bits): with
accuracy_level 0 (FP32 compute, the only exact-in-FP32 one; level 4 quantizes the activations again per block, 3.5e-3
relative error) 1.14-1.19x FP32 MatMul on [4096, 320] x [320, 1280] and 1.04-1.07x on [4096, 256] x [256, 256], where
MatMulInteger is 0.84x and 1.03x: not used. Attention scores of quantized q and k as MatMulInteger -> Cast -> Mul: 1.5x
(1 thread) and 1.9x (2 threads) the FP32 MatMul on an SD1.5 chunk [8, 512, 40] x [8, 40, 4096] (head dim 40 is too short
a sum for the integer GEMM to pay, and the int32 scores take two more passes): not used. ORT's DequantizeLinear is a
single-threaded loop (0.5 ns a weight at 1 and 2 threads); a per-tensor DequantizeLinear by 2^-k followed by a Mul by
the channel scale (bit-identical) is 2.2-2.5x slower, so the per-channel form stays. A linear's Cast -> Mul as one
DequantizeLinear of the int32 sums (axis -1, bit-identical): 1.5x slower (a per-element scale lookup).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from msfp_compiler.config import parse_conv_weights
from msfp_compiler.formats import Format
from msfp_compiler.ops import get_format

from .msfp_ops import MSFP_DOMAIN, QUANTIZE_OPS

__all__ = ["integer_shift", "int8_name", "TRANSPOSED", "lower_integer", "IntegerLoweringInfo", "im2col_nodes"]

MAX_WEIGHT_FOR_U8S8 = 64  # 2 * 255 * 64 = 32640 < 32767: no int16 saturation in vpmaddubsw pair sums


TRANSPOSED = "int8 weight stored transposed"  # doc_string of such a DequantizeLinear (read by --check)


def int8_name(packed: str) -> str:
    """The int8 initializer made from the packed initializer ``packed``: --check (msfp_compiler/check.py) finds a
    weight's integer codes by this name, whether a DequantizeLinear or an integer kernel reads them."""
    return f"{packed}_int8"


def integer_shift(fmt: Format, limit: int) -> int | None:
    """The smallest k with every grid value * 2^k an integer of magnitude <= limit, or None."""
    lv = fmt.levels.double().numpy()
    for k in range(0, 16):
        v = lv * 2.0 ** k
        if np.all(v == np.round(v)):
            return k if v.max() <= limit else None
    return None


@dataclass
class IntegerLoweringInfo:
    int8_weights: int = 0
    int8_weight_bytes: int = 0
    integer_matmuls: int = 0
    integer_convs: int = 0
    float32_conv_weights: int = 0
    float_matmuls_on_int8_weights: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Weight:
    """An int8 weight made by rewrite 1: its initializer name and per-output-channel (or scalar) scale / 2^k."""

    init: str
    scale: np.ndarray  # float32, the DequantizeLinear scale (1 value or one per channel of `axis`)
    axis: int
    max_abs: int


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Rewrite:
    """The graph being rewritten: initializers (read lazily as arrays), producers and consumers, and the
    initializers the rewrites add."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.taken: set[str] = set(self.inits)
        self.outputs = {o.name for o in self.graph.output}
        self.value_info = {v.name: v for v in self.graph.value_info}
        self._arrays: dict[str, np.ndarray] = {}
        self._const_id = 0
        self.index(list(self.graph.node))

    def index(self, nodes: list[onnx.NodeProto]) -> None:
        self.producer = {o: n for n in nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in nodes:
            for i in n.input:
                self.consumers[i].append(n)

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def const(self, value: np.ndarray, hint: str) -> str:
        name = f"{hint}_c{self._const_id}"
        self._const_id += 1
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def initializer(self, name: str) -> onnx.TensorProto:
        return self.inits[name] if name in self.inits else next(t for t in self.new_inits if t.name == name)

    def finish(self, nodes: list[onnx.NodeProto]) -> None:
        """Install ``nodes`` (dead ones dropped, weights dequantized just in time) and the initializers they read."""
        g = self.graph
        while True:  # drop what the rewrites left dead (a Gemm's transposed weight leaves its DequantizeLinear unread)
            read = {i for n in nodes for i in n.input} | self.outputs
            live = [n for n in nodes if any(o in read for o in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        del g.node[:]
        g.node.extend(_just_in_time(nodes, {t.name for t in list(g.initializer) + self.new_inits}))
        used = {i for n in g.node for i in n.input} | self.outputs
        keep = [t for t in list(g.initializer) + self.new_inits if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)


def lower_integer(model: onnx.ModelProto, conv_weights: str = "int8") -> IntegerLoweringInfo:
    """Rewrite ``model`` in place (see the module docstring); returns what was rewritten. ``conv_weights``: a
    ``CompileConfig.conv_weights`` value (``config.parse_conv_weights``: "int8", "float32" or "float32:F")."""
    share = parse_conv_weights(conv_weights)
    rw = _Rewrite(model)
    info = IntegerLoweringInfo()
    float_convs = _float_conv_weights(rw, share)
    weights, dropped = _int8_weights(rw, float_convs, info)
    nodes = [n for n in rw.graph.node if n.output[0] not in dropped]
    rw.index(nodes)
    rw.finish(_integer_matmuls(rw, nodes, weights, info))
    return info


def _packed_weights(rw: _Rewrite) -> list[tuple[onnx.NodeProto, int]]:
    """The DequantizeFP4Packed nodes on initializers whose grid is an integer grid after a 2^k rescale, with k."""
    out = []
    for n in rw.graph.node:
        if n.domain != MSFP_DOMAIN or n.op_type != "DequantizeFP4Packed" or not all(i in rw.inits for i in n.input):
            continue
        k = integer_shift(get_format(_attrs(n)["format"].decode()), 127)
        if k is not None:
            out.append((n, k))
    return out


def _conv_positions(rw: _Rewrite, weight: str) -> int | None:
    """Output positions (H_out * W_out) of the convs reading ``weight`` (their fewest), None if it is not only a conv
    weight; 0 where the graph's shapes do not say."""
    users = rw.consumers[weight]
    if not users or not all(u.op_type == "Conv" and list(u.input).index(weight) == 1 for u in users):
        return None
    pos = []
    for u in users:
        v = rw.value_info.get(u.output[0])
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim] if v else []
        pos.append(int(np.prod(dims[2:])) if len(dims) > 2 else 0)
    return min(pos)


def _float_conv_weights(rw: _Rewrite, share: float) -> set[str]:
    """The conv weights (DequantizeFP4Packed outputs read only as Conv weights) to decode into FP32 initializers:
    all for share 1, none for 0, else the convs with the most output positions first, up to ``share`` of the conv
    weight elements.

    A conv loses ORT's weight prepacking in proportion to its multiply-adds, H_out * W_out per weight, while its FP32
    weight costs 3 bytes a weight more than int8: per byte, the 64x64 convs of SD1.5 gain 16x what a 16x16 conv
    gains (op profile of SD1.5, 1 thread: the 64x64 and 32x32 convs run 1.2-1.5x their prepacked FP32 time)."""
    if share == 0.0:
        return set()
    convs = [(pos, n.output[0], int(np.prod(_attrs(n)["shape"]))) for n, _ in _packed_weights(rw)
             if (pos := _conv_positions(rw, n.output[0])) is not None
             and not all(_integer_conv_input(rw, u) for u in rw.consumers[n.output[0]])]
    budget = share * sum(numel for _, _, numel in convs)
    chosen, used = set(), 0
    for pos, out, numel in sorted(convs, key=lambda c: -c[0]):  # stable: graph order among equals
        if used + numel <= budget:
            chosen.add(out)
            used += numel
    return chosen


def _integer_conv_input(rw: _Rewrite, u: onnx.NodeProto) -> bool:
    """Whether conv ``u``'s input is made of integer-grid quantizer outputs (a candidate for ``_integer_conv``)."""
    return bool(_same_conv(u)) and all(
        _activation_grid(rw, p, True) for p, _ in _conv_input_parts(rw, u, _channels(rw, u.input[0])))


def _decode(rw: _Rewrite, n: onnx.NodeProto, k: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(int8 grid values * 2^k in the weight's shape, DequantizeLinear scale = scale / 2^k, per channel) of a
    DequantizeFP4Packed node, or None for a scale that is neither scalar nor per output channel."""
    a = _attrs(n)
    shape = list(a["shape"])
    numel = int(np.prod(shape))
    packed = rw.array(n.input[0])
    codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(-1)[:numel]
    table = np.asarray(a["table"], np.float64) * 2.0 ** k
    w = table[codes].astype(np.int8).reshape(shape)
    scale = rw.array(n.input[1]).astype(np.float32)
    per_channel = scale.size > 1
    if per_channel and scale.size != shape[0]:
        return None
    s = (scale.reshape(-1) if per_channel else scale.reshape(())) * np.float32(2.0 ** -k)  # exact
    return w, s, per_channel


def _int8_weights(rw: _Rewrite, float_convs: set[str], info: IntegerLoweringInfo
                  ) -> tuple[dict[str, _Weight], set[str]]:
    """Rewrite 1: packed 4-bit weights -> int8 + DequantizeLinear (or FP32 initializers for ``float_convs``), the
    DequantizeFP4Packed nodes replaced in place. Returns the int8 weights by DequantizeLinear output and the
    outputs of nodes to drop (decoded conv weights, transposes folded into the stored weight)."""
    weights: dict[str, _Weight] = {}
    dropped: set[str] = set()
    for n, k in _packed_weights(rw):
        decoded = _decode(rw, n, k)
        if decoded is None:
            continue
        w, s, per_channel = decoded
        out = n.output[0]
        if out in float_convs:
            # decoded here, bit for bit as DequantizeLinear would (one rounding of int * scale / 2^k)
            wf = w.astype(np.float32) * (s.reshape([-1] + [1] * (w.ndim - 1)) if per_channel else s)
            rw.new_inits.append(numpy_helper.from_array(wf.astype(np.float32), out))
            dropped.add(out)
            info.float32_conv_weights += 1
            continue
        axis = 0
        users = rw.consumers[out]
        if (len(users) == 1 and users[0].op_type == "Transpose" and w.ndim == 2
                and list(_attrs(users[0]).get("perm", [1, 0])) == [1, 0] and users[0].output[0] not in rw.outputs):
            w, axis, out = np.ascontiguousarray(w.T), 1, users[0].output[0]
            dropped.add(out)
        base = out.replace("/", "_")
        w_name, s_name = int8_name(n.input[0]), f"{base}_scale"
        if w_name in rw.taken:  # the exporter shared one packed tensor between two weights (equal codes)
            w_name = f"{base}_int8"
        rw.taken.add(w_name)
        rw.new_inits += [numpy_helper.from_array(w, w_name), numpy_helper.from_array(s.astype(np.float32), s_name)]
        dq = helper.make_node("DequantizeLinear", [w_name, s_name], [out], name=f"{base}_dq",
                              **({"axis": axis} if per_channel else {}))
        if out != n.output[0]:
            dq.doc_string = TRANSPOSED
        n.CopyFrom(dq)
        weights[out] = _Weight(w_name, s, axis if per_channel else -1, int(np.abs(w).max(initial=0)))
        info.int8_weights += 1
        info.int8_weight_bytes += w.size
    return weights, dropped


def _integer_matmuls(rw: _Rewrite, nodes: list[onnx.NodeProto], weights: dict[str, _Weight],
                     info: IntegerLoweringInfo) -> list[onnx.NodeProto]:
    """Rewrite 2: ``nodes`` with linears and 1x1 convs on integer-representable activations as MatMulInteger chains
    (the codes of each quantizer output computed once, right where the first such layer needs them)."""
    codes_of: dict[str, str] = {}  # quantizer output -> uint8 codes tensor
    cols_of: dict[tuple[str, int, int], str] = {}  # (codes, kh, kw) -> [N, H*W, kh*kw*C] im2col of the codes
    out_nodes: list[onnx.NodeProto] = []

    def activation(name: str) -> tuple[float, int, float, str] | None:
        return _activation(rw, name, codes_of, out_nodes)

    def conv_activation(name: str) -> tuple[float, int, float, str] | None:
        return _activation(rw, name, codes_of, out_nodes, with_zero_point=True)

    for n in nodes:
        rewritten = None
        if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx"):
            rewritten = _integer_matmul(rw, n, weights, activation)
            info.integer_matmuls += rewritten is not None
            if rewritten is None and any(i in weights for i in n.input):
                info.float_matmuls_on_int8_weights += 1
        elif _same_conv(n):
            rewritten = _integer_conv(rw, n, weights, conv_activation, cols_of)
            info.integer_convs += rewritten is not None
        out_nodes.extend([n] if rewritten is None else rewritten)
    return out_nodes


def _activation_grid(rw: _Rewrite, name: str, with_zero_point: bool = False) -> tuple[float, int, float] | None:
    """(scale / 2^k, activation zero point code, z) of an integer-representable quantizer output (scalar scale, an
    integer grid after a 2^k rescale that fits uint8 with the offset), or None. z is the zero point the output still
    carries (y = z + scale * grid): 0 where it is 0 or folded into the consumer's bias; any other z only
    ``with_zero_point`` (unsigned grids; the convs add z * their weight sums back, see ``_integer_conv``)."""
    q = rw.producer.get(name)
    if q is None or q.domain != MSFP_DOMAIN or q.op_type not in QUANTIZE_OPS:
        return None
    if not all(i in rw.inits for i in q.input[1:]):
        return None
    fmt = get_format(_attrs(q)["format"].decode())
    k = integer_shift(fmt, 127 if fmt.signed else 255)
    sc, zp = rw.array(q.input[1]), rw.array(q.input[2])
    if k is None or sc.size != 1:
        return None
    z = 0.0 if _attrs(q).get("keep_zero_point", 1.0) == 0.0 else zp
    if np.any(z != 0):
        if not with_zero_point or fmt.signed or np.size(z) != 1:
            return None
        z = float(np.reshape(z, ()))
    return float(sc.reshape(())) * 2.0 ** -k, 128 if fmt.signed else 0, float(z)


def _activation(rw: _Rewrite, name: str, codes_of: dict[str, str], out_nodes: list[onnx.NodeProto],
                with_zero_point: bool = False) -> tuple[float, int, float, str] | None:
    """(scale / 2^k, activation zero point code, z, codes tensor) for an integer-representable quantizer output; the
    first call for a tensor appends the nodes computing its codes to ``out_nodes``."""
    grid = _activation_grid(rw, name, with_zero_point)
    if grid is None:
        return None
    s, offset, z = grid
    if name not in codes_of:
        # y is (scale / 2^k) * an integer of magnitude <= 255, rounded once, so y / (scale / 2^k) lies within a few
        # ulps of that integer and QuantizeLinear's round-half-even gives it back exactly (+ offset, as uint8): one
        # vectorized pass where Mul -> Round -> Add -> Cast took four (1.3 vs 5-7 ms on a [4096, 320] input). With a
        # kept zero point, y = z + (scale / 2^k) * n rounded once, and y - z is again within a few ulps of the grid
        # value (|y| * 2^-24 is far below half a step for any calibrated scale).
        base = name.replace("/", "_")
        step = rw.const(np.array(s, np.float32), f"{base}_step")  # scale * 2^-k: exact in float32
        zp = rw.const(np.array(offset, np.uint8), f"{base}_offset")
        x = name
        if z != 0.0:
            x = f"{base}_minus_z"
            out_nodes.append(helper.make_node("Sub", [name, rw.const(np.array(z, np.float32), f"{base}_z")], [x],
                                              name=f"{base}_minus_z"))
        out_nodes.append(helper.make_node("QuantizeLinear", [x, step, zp], [f"{base}_codes"], name=f"{base}_codes"))
        codes_of[name] = f"{base}_codes"
    return s, offset, z, codes_of[name]


def _integer_matmul(rw: _Rewrite, n: onnx.NodeProto, weights: dict[str, _Weight], activation
                    ) -> list[onnx.NodeProto] | None:
    """The MatMulInteger chain replacing MatMul / Gemm node ``n``, or None where it does not apply."""
    a_name, b_name = n.input[0], n.input[1]
    w = weights.get(b_name)
    if w is None or w.max_abs > MAX_WEIGHT_FOR_U8S8:
        return None
    bias = None
    w_init, w_scale = w.init, w.scale
    if n.op_type == "Gemm":
        at = _attrs(n)
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or (len(n.input) > 2 and at.get("beta", 1.0) != 1.0):
            return None
        if at.get("transB", 0):
            # stored [N, K] (channel axis 0): MatMulInteger wants [K, N]; only when no one else reads the weight
            if len(rw.consumers[b_name]) != 1 or w.axis not in (0, -1):
                return None
            t = rw.initializer(w_init)
            wt = np.ascontiguousarray(numpy_helper.to_array(t).T)
            t.CopyFrom(numpy_helper.from_array(wt, w_init))
            w.axis = 1 if w.axis == 0 else -1
        elif w.axis == 0:
            return None
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    elif w.axis == 0:
        return None  # a [K, N] weight with per-K scales is not a per-output-channel rescale
    act = activation(a_name)
    if act is None:
        return None
    s_a, a_zp, _, codes = act
    base = n.output[0].replace("/", "_")
    comb = (np.float64(s_a) * w_scale.astype(np.float64)).astype(np.float32)
    comb_name = rw.const(comb, f"{base}_scale")
    azp = rw.const(np.array(a_zp, np.uint8), f"{base}_azp")
    chain = [helper.make_node("MatMulInteger", [codes, w_init, azp], [f"{base}_acc"], name=f"{base}_mmi"),
             helper.make_node("Cast", [f"{base}_acc"], [f"{base}_accf"], to=TensorProto.FLOAT, name=f"{base}_cast")]
    if bias is None:
        chain.append(helper.make_node("Mul", [f"{base}_accf", comb_name], [n.output[0]], name=f"{base}_rescale"))
    else:
        chain += [helper.make_node("Mul", [f"{base}_accf", comb_name], [f"{base}_y"], name=f"{base}_rescale"),
                  helper.make_node("Add", [f"{base}_y", bias], [n.output[0]], name=f"{base}_bias")]
    return chain


def _same_conv(n: onnx.NodeProto) -> tuple[int, int] | None:
    """(kh, kw) of a 2-D Conv with odd kernel sides, "same" zero padding (k // 2 on each side), no stride, dilation
    or groups, or None. 1x1 convs are linears over the channels at every position."""
    if n.op_type != "Conv" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
        return None
    a = _attrs(n)
    ks = list(a.get("kernel_shape", []))
    if len(ks) != 2 or not all(k % 2 for k in ks) or a.get("group", 1) != 1:
        return None
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if (pads != [ks[0] // 2, ks[1] // 2] * 2 or any(v != 1 for v in a.get("strides", [1]))
            or any(v != 1 for v in a.get("dilations", [1])) or a.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return None
    return ks[0], ks[1]


def _integer_conv(rw: _Rewrite, n: onnx.NodeProto, weights: dict[str, _Weight], activation, cols_of: dict
                  ) -> list[onnx.NodeProto] | None:
    """A "same" conv on an integer-representable activation as an integer GEMM: codes [N, C, H, W] -> NHWC -> (for
    kh x kw > 1: Pad, kh * kw Slices, Concat: uint8 im2col) -> [N, H*W, kh*kw*C] -> MatMulInteger with the weight
    stored [kh*kw*C, C_out] -> Cast -> Mul(s_a * s_w) -> Add bias -> back to [N, C_out, H, W]; None where it does
    not apply (the conv then keeps DequantizeLinear + Conv). The int32 sums are exact, so the result differs from
    the FP32 conv of the same operands by the float summation order only (~1e-7 relative).

    Padding: the codes are padded with the activation zero point code (a zero). An activation that carries a zero
    point z (unsigned grids after SiLU: y = z + s_a * n) is padded with zeros in the FP32 conv, not with z, so the
    conv is s_a * s_w * sum(w * n) + z * s_w * (sum of w over the taps inside the image): that second term is a
    [H*W, kh*kw] 0/1 tap mask times a [kh*kw, C_out] table, added with the bias by one small MatMul (an extra column
    of ones carries the bias). The mask is a uint8 initializer read through DequantizeLinear, which onnxruntime does
    not constant-fold: folded, the [H*W, C_out] products would cost ~95 MB on SD1.5.

    Measured (ORT 1.32, AVX2 without VNNI; tools/bench_ort_conv.py, results/bench_ort_conv.json): 3x3 convs 0.44-0.76x
    the prepacked FP32 Conv and 0.36-0.66x the DequantizeLinear + Conv they replace, at 1 and 2 threads, on the SD1.5
    and CIFAR shapes; 1x1 convs 0.55-0.61x the prepacked FP32 Conv. The weight-as-A form
    (int8 [C_out, C] x uint8 [N, C, H*W], no transposes) runs 2.5-4x slower (MLAS's fast u8s8 kernels take the uint8
    operand as A); ConvInteger runs 3-4x slower than the FP32 Conv."""
    ks = _same_conv(n)
    w = weights.get(n.input[1])
    vi = rw.value_info.get(n.output[0])
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim] if vi else []
    if (ks is None or w is None or w.max_abs > MAX_WEIGHT_FOR_U8S8 or w.axis not in (0, -1) or len(dims) != 4
            or not all(dims[1:]) or len(rw.consumers[n.input[1]]) != 1):
        return None
    t = rw.initializer(w.init)
    w4 = numpy_helper.to_array(t)
    kh, kw = ks
    if w4.ndim != 4 or w4.shape[2:] != (kh, kw) or w4.shape[0] != dims[1]:
        return None
    parts = _conv_input_parts(rw, n, w4.shape[1])
    grids = [_activation_grid(rw, p, with_zero_point=True) for p, _ in parts]
    has_bias = len(n.input) > 2 and bool(n.input[2])
    if any(g is None for g in grids) or (any(g[2] for g in grids) and has_bias and n.input[2] not in rw.inits):
        return None  # (a bias computed at run time next to a zero point: none in our graphs)
    c_out, h, wd = dims[1:]
    # stored [(kh, kw, C), C_out], the im2col column order; --check reads it back (msfp_compiler/check.py)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w4.transpose(2, 3, 1, 0).reshape(-1, c_out)), w.init))
    base = n.output[0].replace("/", "_")
    s_w = w.scale.astype(np.float64) * np.ones(c_out)
    chain: list[onnx.NodeProto] = []
    ys, z_bias, first = [], np.zeros(c_out), 0
    for i, (part, c_in) in enumerate(parts):
        # a 1x1 conv on Concat(quantizer outputs) (the up blocks' shortcuts): one integer GEMM per part, each with
        # its own activation scale, on the rows of the weight for that part's channels (a Slice of the initializer,
        # which onnxruntime folds at session start)
        s_a, a_zp, z, codes = activation(part)
        sfx = f"_{i}" if len(parts) > 1 else ""
        comb = rw.const((np.float64(s_a) * s_w).astype(np.float32), f"{base}_scale{sfx}")
        azp = rw.const(np.array(a_zp, np.uint8), f"{base}_azp{sfx}")
        if (codes, kh, kw) not in cols_of:  # one im2col per (codes, kernel): the up blocks share their inputs
            cols_of[codes, kh, kw] = im2col_nodes(rw.const, codes, kh, kw, h, wd, c_in, azp, chain)
        cols = cols_of[codes, kh, kw]
        b_w = w.init
        if len(parts) > 1:
            b_w = f"{base}_w{sfx}"
            st, en = (rw.const(np.array([v], np.int64), f"{base}_{k}{sfx}") for k, v in
                      (("from", first), ("to", first + c_in)))
            chain.append(helper.make_node("Slice", [w.init, st, en], [b_w], name=f"{base}_w{sfx}"))
        chain += [
            helper.make_node("MatMulInteger", [cols, b_w, azp], [f"{base}_acc{sfx}"], name=f"{base}_mmi{sfx}"),
            helper.make_node("Cast", [f"{base}_acc{sfx}"], [f"{base}_accf{sfx}"], to=TensorProto.FLOAT,
                             name=f"{base}_cast{sfx}"),
            helper.make_node("Mul", [f"{base}_accf{sfx}", comb], [f"{base}_y{sfx}"], name=f"{base}_rescale{sfx}"),
        ]
        if z != 0.0 and (kh, kw) == (1, 1):  # no padding: z * s_w * sum(w) is a constant per channel
            z_bias += z * s_w * w4[:, first:first + c_in].astype(np.int64).sum(axis=(1, 2, 3))
        ys.append(f"{base}_y{sfx}")
        first += c_in
    y = ys[0]
    for i, other in enumerate(ys[1:]):
        chain.append(helper.make_node("Add", [y, other], [f"{base}_sum{i}"], name=f"{base}_sum{i}"))
        y = f"{base}_sum{i}"
    z = grids[0][2]
    bias = None
    if any(g[2] for g in grids):
        b = rw.array(n.input[2]).astype(np.float64) if has_bias else np.zeros(c_out)
        wsum = w4.astype(np.int64).sum(axis=1).reshape(c_out, kh * kw).T  # [taps, C_out], exact
        if (kh, kw) == (1, 1):
            bias = rw.const((b + z_bias).astype(np.float32), f"{base}_bias")
        else:
            mask = f"tap_mask_{h}x{wd}_k{kh}x{kw}"
            if mask not in rw.taken:
                rw.taken.add(mask)
                rw.new_inits += [numpy_helper.from_array(_tap_mask(h, wd, kh, kw), mask),
                                 numpy_helper.from_array(np.array(1.0, np.float32), f"{mask}_one")]
                chain.append(helper.make_node("DequantizeLinear", [mask, f"{mask}_one"], [f"{mask}_f"],
                                              name=f"{mask}_dq"))
            hint = f"{n.input[2]}_and_zero_point" if has_bias else f"{base}_zero_point"  # --check's tests find it
            table = rw.const(np.concatenate([z * s_w * wsum, b[None]]).astype(np.float32), hint)
            chain.append(helper.make_node("MatMul", [f"{mask}_f", table], [f"{base}_corr"], name=f"{base}_corr"))
            bias = f"{base}_corr"
    elif has_bias:
        bias = n.input[2]
    if bias is not None:
        chain.append(helper.make_node("Add", [y, bias], [f"{base}_yb"], name=f"{base}_bias"))
        y = f"{base}_yb"
    shape = rw.const(np.array([0, c_out, h, wd], np.int64), f"{base}_shape")
    chain += [helper.make_node("Transpose", [y], [f"{base}_nct"], perm=[0, 2, 1], name=f"{base}_to_nct"),
              helper.make_node("Reshape", [f"{base}_nct", shape], [n.output[0]], name=f"{base}_unflatten")]
    return chain


def _conv_input_parts(rw: _Rewrite, n: onnx.NodeProto, c_in: int) -> list[tuple[str, int]]:
    """The (tensor, channels) the input of conv ``n`` (``c_in`` channels) is made of: for a 1x1 conv on a Concat
    along the channels whose parts' channel counts the graph's shapes give, the Concat's inputs; else the input."""
    cat = rw.producer.get(n.input[0])
    if (_same_conv(n) == (1, 1) and cat is not None and cat.op_type == "Concat"
            and _attrs(cat).get("axis") in (1, -3)):
        chans = [_channels(rw, i) for i in cat.input]
        if all(chans) and sum(chans) == c_in:
            return list(zip(cat.input, chans))
    return [(n.input[0], c_in)]


def _channels(rw: _Rewrite, name: str) -> int:
    """dim 1 of a 4-D tensor from the graph's value_info, 0 where unknown."""
    v = rw.value_info.get(name)
    dims = v.type.tensor_type.shape.dim if v is not None else []
    return dims[1].dim_value if len(dims) == 4 and dims[1].HasField("dim_value") else 0


def im2col_nodes(const: Callable[[np.ndarray, str], str], codes: str, kh: int, kw: int, h: int, wd: int, c_in: int,
                 azp: str, chain: list[onnx.NodeProto]) -> str:
    """Append to ``chain`` the nodes that turn ``codes`` [N, C, H, W] (uint8) into [N, H*W, kh*kw*C] im2col columns
    (NHWC; "same" padding with the zero point code ``azp``, tap-major: the order the integer weights are stored in);
    returns the columns' name. ``const(value, hint)`` adds an initializer and returns its name. tools/bench_ort_conv.py
    times this very chain."""
    cb = f"{codes}_k{kh}x{kw}"
    chain.append(helper.make_node("Transpose", [codes], [f"{cb}_nhwc"], perm=[0, 2, 3, 1], name=f"{cb}_nhwc"))
    x = f"{cb}_nhwc"
    if (kh, kw) != (1, 1):
        ph, pw = kh // 2, kw // 2
        pads = const(np.array([0, ph, pw, 0, 0, ph, pw, 0], np.int64), f"{cb}_pads")
        chain.append(helper.make_node("Pad", [x, pads, azp], [f"{cb}_padded"], name=f"{cb}_pad"))
        axes = const(np.array([1, 2], np.int64), f"{cb}_axes")
        taps = []
        for i in range(kh):
            for j in range(kw):
                st = const(np.array([i, j], np.int64), f"{cb}_s{i}{j}")
                en = const(np.array([i + h, j + wd], np.int64), f"{cb}_e{i}{j}")
                chain.append(helper.make_node("Slice", [f"{cb}_padded", st, en, axes], [f"{cb}_t{i}{j}"],
                                              name=f"{cb}_t{i}{j}"))
                taps.append(f"{cb}_t{i}{j}")
        chain.append(helper.make_node("Concat", taps, [f"{cb}_cols4"], axis=3, name=f"{cb}_concat"))
        x = f"{cb}_cols4"
    flat = const(np.array([0, h * wd, kh * kw * c_in], np.int64), f"{cb}_flat")
    chain.append(helper.make_node("Reshape", [x, flat], [f"{cb}_cols"], name=f"{cb}_cols"))
    return f"{cb}_cols"


def _tap_mask(h: int, w: int, kh: int, kw: int) -> np.ndarray:
    """[h*w, kh*kw + 1] uint8: 1 where tap (i, j) of a "same" conv at that position reads inside the image; the last
    column all ones (it carries the bias)."""
    rows = [(np.arange(h) + i - kh // 2 >= 0) & (np.arange(h) + i - kh // 2 < h) for i in range(kh)]
    cols = [(np.arange(w) + j - kw // 2 >= 0) & (np.arange(w) + j - kw // 2 < w) for j in range(kw)]
    taps = [(r[:, None] & c[None, :]).reshape(-1) for r in rows for c in cols]
    return np.stack([*taps, np.ones(h * w, bool)], axis=1).astype(np.uint8)


def _just_in_time(nodes: list[onnx.NodeProto], inits: set[str]) -> list[onnx.NodeProto]:
    """Each DequantizeLinear of an initializer moved right before its first reader.

    onnxruntime runs nodes in the graph's order, and the exporter put every weight first: all weights would be
    dequantized at the start of a run and held until their layer (the FP32 weights again, in the arena). Next to
    its reader, a dequantized weight lives for one layer."""
    movable = {id(n) for n in nodes if n.op_type == "DequantizeLinear" and all(i in inits for i in n.input)}
    first_reader: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            first_reader.setdefault(x, i)
    before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for n in nodes:
        if id(n) in movable:
            before[min(first_reader.get(o, len(nodes)) for o in n.output)].append(n)
    out: list[onnx.NodeProto] = []
    for i, n in enumerate(nodes):
        out.extend(before.get(i, ()))
        if id(n) not in movable:
            out.append(n)
    out.extend(before.get(len(nodes), ()))
    return out
