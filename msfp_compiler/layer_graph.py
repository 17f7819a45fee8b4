"""The layer graph: quantizable layers (conv, linear, attention) and the operands they read, over the fx graph.

Graph questions live here: which quantized inputs come from a SiLU through value-preserving view ops (mixup-sign
candidates), which layers share an input (one quantizer, not two), and the layer order used in reports and plots.
The fx graph answers them directly (``node.users``, ``all_input_nodes``, graph order); a networkx copy of it was
never needed, so there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["LAYER_OPS", "QuantOperand", "layer_kind", "quant_operands"]

aten = torch.ops.aten

# layer op -> (kind, positional indices of activation operands, index of the weight operand or None)
LAYER_OPS: dict = {
    aten.conv2d.default: ("conv", (0,), 1),
    aten.linear.default: ("linear", (0,), 1),
    aten.scaled_dot_product_attention.default: ("attn", (0, 1, 2), None),
}

# Ops that do not change values, looked through when asking "does this input come from a SiLU?".
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten.clone.default, aten.contiguous.default,
             aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim}


def layer_kind(node: fx.Node) -> str | None:
    spec = LAYER_OPS.get(node.target) if node.op == "call_function" else None
    return spec[0] if spec else None


@dataclass(frozen=True)
class QuantOperand:
    """One tensor to quantize: its producer node, role and the layers that consume it as an operand."""

    producer: fx.Node
    role: str  # "act" or "weight"
    consumers: tuple[fx.Node, ...]
    layer_kind: str
    after_silu: bool


def _source_op(node: fx.Node):
    while node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node.target if node.op == "call_function" else None


def quant_operands(gm: fx.GraphModule, attention: bool = True) -> list[QuantOperand]:
    """Every tensor that feeds a layer as a quantized operand, deduplicated by producer, in graph order;
    ``attention=False`` leaves the q, k, v operands of scaled_dot_product_attention in float."""
    consumers: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    kinds: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        spec = LAYER_OPS.get(n.target) if n.op == "call_function" else None
        if not spec or (spec[0] == "attn" and not attention):
            continue
        kind, act_idx, w_idx = spec
        for i in act_idx:
            src = n.args[i]
            consumers.setdefault((src, "act"), []).append(n)
            kinds.setdefault(src, kind)
        if w_idx is not None:
            w = n.args[w_idx]
            role = "weight" if w.op == "get_attr" else "act"
            consumers.setdefault((w, role), []).append(n)
            kinds.setdefault(w, kind)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = [
        QuantOperand(p, role, tuple(cs), kinds[p], role == "act" and _source_op(p) == aten.silu.default)
        for (p, role), cs in consumers.items()
    ]
    return sorted(out, key=lambda q: (order[q.producer], q.role))
