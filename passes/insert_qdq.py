"""insert_qdq: put a ``torch.ops.msfp.quantize`` node on every quantized operand of conv / linear / attention.

One quantize node per record (activations are keyed by their producer, so layers sharing an input share the
quantizer); only the layer operands are rewired, other users (residual adds, norms) keep the FP tensor. Scale and
zero point become buffers of the GraphModule, so they travel as ONNX initializers.

A channel concatenation quantized per part (layer_graph.split_cat_parts) gets a copy for its conv: the copy
concatenates the parts' quantizers, the original cat keeps feeding its float users (the block's GroupNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from msfp_compiler.errors import MsfpError
from msfp_compiler.ops import QUANTIZE
from msfp_compiler.layer_graph import LAYER_OPS, split_cat_parts
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.record import records

__all__ = ["InsertQDQ", "attr_name"]



def attr_name(node: fx.Node, what: str) -> str:
    return f"msfp_{node.name}_{what}"


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    if hasattr(gm, name):
        delattr(gm, name)
    gm.register_buffer(name, value.detach().float().clone())


@dataclass
class InsertQDQ(Pass):
    """Pass: insert quantize nodes for every record with a choice."""

    name: str = "insert_qdq"

    def requires(self, gm: fx.GraphModule) -> None:
        for node, rec in records(gm):
            if rec.choice is None:
                raise MsfpError(f"node {node.name}: no format chosen (run select_format before insert_qdq)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        by_name = {n.name: n for n in g.nodes}
        inserted = {"act": 0, "weight": 0}
        for node, rec in records(gm):
            s_name, z_name = attr_name(node, "scale"), attr_name(node, "zero_point")
            _register(gm, s_name, rec.choice.scale)
            _register(gm, z_name, rec.choice.zero_point)
            anchor = node if node.op != "placeholder" else _last_placeholder(g)
            with g.inserting_after(anchor):
                s = g.get_attr(s_name)
            with g.inserting_after(s):
                z = g.get_attr(z_name)
            with g.inserting_after(z):
                q = g.call_function(QUANTIZE, (node, s, z, rec.choice.fmt))
            q.meta["val"] = node.meta.get("val")
            q.meta["msfp_quantizer_of"] = node.name
            for cname in rec.consumers:
                c = by_name[cname]
                _, act_idx, w_idx = LAYER_OPS[c.target]
                idx = (w_idx,) if rec.role == "weight" else act_idx
                args = list(c.args)
                for i in idx:
                    if args[i] is node:
                        args[i] = q
                    elif rec.role == "act" and isinstance(args[i], fx.Node):
                        args[i] = _quantized_cat(g, args[i], c, node, q)
                c.args = tuple(args)
            inserted[rec.role] += 1
        return PassResult(gm, any(inserted.values()), {"quantize_nodes": inserted["act"] + inserted["weight"],
                                     "act_quantizers": inserted["act"], "weight_quantizers": inserted["weight"]})


def _quantized_cat(g: fx.Graph, cat: fx.Node, consumer: fx.Node, part: fx.Node, q: fx.Node) -> fx.Node:
    """The consumer's concatenation with ``part`` replaced by its quantizer ``q``: the consumer's own copy of the
    cat, made at the first quantized part (other readers of the original keep the float parts)."""
    if not cat.meta.get("msfp_split_cat"):
        if split_cat_parts(cat, consumer) is None or part not in cat.args[0]:
            return cat
        with g.inserting_before(consumer):
            copy = g.call_function(cat.target, (list(cat.args[0]), *cat.args[1:]), dict(cat.kwargs))
        copy.meta.update(cat.meta)
        copy.meta["msfp_split_cat"] = True
        cat = copy
    cat.args = ([q if p is part else p for p in cat.args[0]], *cat.args[1:])
    return cat


def _last_placeholder(g: fx.Graph) -> fx.Node:
    return [n for n in g.nodes if n.op == "placeholder"][-1]
