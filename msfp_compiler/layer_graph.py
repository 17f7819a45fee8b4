"""The layer graph: quantizable layers (conv, linear, attention) and the operands they read, over the fx graph.

Graph questions live here: which quantized inputs come from a SiLU through value-preserving view ops (mixup-sign
candidates), which layers share an input (one quantizer, not two), and the layer order used in reports and plots.
A channel concatenation feeding a conv (a UNet decoder's skip connection: decoder state and encoder skip) is
quantized per part: each input of the cat is its own operand with its own quantizer (Q-Diffusion's "shortcut
splitting"), because the two halves have very different ranges and one per-tensor scale fits neither.
The fx graph answers them directly (``node.users``, ``all_input_nodes``, graph order); a networkx copy of it was
never needed, so there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["LAYER_OPS", "QuantOperand", "layer_kind", "quant_operands", "split_cat_parts"]

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


def split_cat_parts(node: fx.Node, consumer: fx.Node) -> list[fx.Node] | None:
    """The inputs of ``node`` when it is a channel concatenation (dim 1, two or more fx-node inputs) that the conv
    ``consumer`` reads: each gets its own quantizer. None for anything else."""
    if (layer_kind(consumer) != "conv" or not isinstance(node, fx.Node) or node.op != "call_function"
            or node.target != aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim not in (1, -3) or len(parts) < 2 or not all(isinstance(p, fx.Node) for p in parts):
        return None
    return list(parts)


def quant_operands(gm: fx.GraphModule, attention: bool = True, split_concat: bool = True) -> list[QuantOperand]:
    """Every tensor that feeds a layer as a quantized operand, deduplicated by producer, in graph order;
    ``attention=False`` leaves the q, k, v operands of scaled_dot_product_attention in float; ``split_concat``
    quantizes the parts of a channel concatenation feeding a conv separately (``split_cat_parts``)."""
    consumers: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    kinds: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        spec = LAYER_OPS.get(n.target) if n.op == "call_function" else None
        if not spec or (spec[0] == "attn" and not attention):
            continue
        kind, act_idx, w_idx = spec
        for i in act_idx:
            parts = split_cat_parts(n.args[i], n) if split_concat else None
            for src in dict.fromkeys(parts or [n.args[i]]):
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
