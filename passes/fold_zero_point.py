"""fold_zero_point: move an unsigned activation's zero point into the consumer's bias.

For an activation quantized as x_q = z + s * q feeding y = W x_q + b:  y = W (s q) + (b + z * W 1).  The quantize
node is replaced by ``msfp::quantize_folded`` (which outputs s * q) and every consumer gets the bias
b' = b + z * sum(W_q over its input dims), with W_q the *quantized* weight, so the fold is exact up to float
rounding. A record is folded only when every reader of its quantizer is a conv or linear (attention operands have no
bias to absorb the term; a part of a concatenation quantized per part is read by the concatenation and keeps its
zero point in the quantizer, equally exact).

A zero-padded conv is not exact as is: the padded border would contribute 0 in the original but z * W in the folded
bias. With ``pad_convs=True`` such convs get an explicit constant pad with value -z (then padding 0), so the border
contributes W (-z) + z W = 0, exactly as before. That is off by default: in onnxruntime the Pad copy costs more than
the Add of z it saves (uncond digits UNet, batch 16: 1.50x FP32 latency with padded folds vs 1.31x without,
results/bench_ort.json), so records feeding a padded conv keep their zero point in the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from msfp_compiler.layer_graph import layer_kind
from msfp_compiler.names import layer_names, tensor_names
from msfp_compiler.ops import QUANTIZE, QUANTIZE_FOLDED, get_format
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.record import record_of

from .insert_qdq import attr_name
from .select_format import get_weight

__all__ = ["FoldZeroPoint", "padded_conv"]

aten = torch.ops.aten


def _plain_weight(node: fx.Node) -> bool:
    return node.op == "get_attr" or (node.op == "call_function" and node.target == QUANTIZE
                                     and node.args[0].op == "get_attr")


def _quantized_weight(gm: fx.GraphModule, wq_node: fx.Node) -> torch.Tensor:
    """Value of the layer's weight operand: the quantize node on a get_attr weight (or the raw weight)."""
    if wq_node.op == "call_function" and wq_node.target == QUANTIZE:
        w_node = wq_node.args[0]
        rec = record_of(w_node)
        return get_format(rec.choice.fmt).quantize(get_weight(gm, w_node), rec.choice.scale, rec.choice.zero_point)
    return get_weight(gm, wq_node)


@dataclass
class FoldZeroPoint(Pass):
    """Pass: fold unsigned zero points into consumer biases (see module docstring)."""

    pad_convs: bool = False
    name: str = "fold_zero_point"

    def ensures(self, gm: fx.GraphModule) -> None:
        for q in gm.graph.nodes:
            if q.op == "call_function" and q.target == QUANTIZE_FOLDED:
                # every reader carries the zero point in its bias: a conv/linear, or the explicit pad of a conv
                readers = [v for u in q.users for v in (u.users if u.target == aten.constant_pad_nd.default else [u])]
                assert all(layer_kind(r) in ("conv", "linear") for r in readers), f"{q.name} folded into a non-layer"

    def call(self, gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        folded = padded = 0
        report = []
        names, layers = tensor_names(gm), layer_names(gm)
        quantizers = [n for n in g.nodes if n.op == "call_function" and n.target == QUANTIZE]
        for q in quantizers:
            src = q.args[0]
            rec = record_of(src)
            if rec is None or rec.role != "act" or rec.choice is None or rec.choice.signed:
                continue
            z = float(rec.choice.zero_point)
            if z == 0.0:
                continue
            users = list(q.users)
            if not users or any(layer_kind(u) not in ("conv", "linear") or u.args[0] is not q for u in users):
                continue
            # A timestep-selected (TALoRA) weight would need one folded bias per LoRA; such layers keep z in the
            # activation quantizer, which is equally exact.
            if any(not _plain_weight(u.args[1]) for u in users):
                continue
            if not self.pad_convs and any(padded_conv(u) for u in users):
                continue
            for u in users:
                padded += self._fold_into(gm, u, z)
            q.target = QUANTIZE_FOLDED
            folded += 1
            report.append(f"{names.get(src.name, src.name):<56} zp {z:+.4f} folded into "
                          f"{', '.join(layers.get(u.name, u.name) for u in users)}")
        return PassResult(gm, folded > 0, {"folded": folded, "explicit_pads": padded}, report)

    def _fold_into(self, gm: fx.GraphModule, layer: fx.Node, z: float) -> int:
        g = gm.graph
        w = _quantized_weight(gm, layer.args[1])
        args = list(layer.args)
        args += [None] * (3 - len(args))  # (input, weight, bias): exported conv2d / linear may omit a None bias
        bias_node = args[2]
        bias = get_weight(gm, bias_node) if bias_node is not None else torch.zeros(w.shape[0], device=w.device)
        new_bias = bias + z * w.reshape(w.shape[0], -1).double().sum(dim=1).float()
        name = attr_name(layer, "folded_bias")
        gm.register_buffer(name, new_bias.contiguous())
        with g.inserting_before(layer):
            args[2] = g.get_attr(name)
        pads = 0
        if padded_conv(layer):
            ph, pw = layer.args[4]
            with g.inserting_before(layer):
                args[0] = g.call_function(aten.constant_pad_nd.default, (args[0], [pw, pw, ph, ph], -z))
            args[4] = [0, 0]
            pads = 1
        layer.args = tuple(args)
        return pads


def padded_conv(layer: fx.Node) -> bool:
    return layer_kind(layer) == "conv" and len(layer.args) > 4 and any(layer.args[4])
