"""pack_weights: store 4-bit weights as codes, two per byte, plus per-channel scales.

``quantize(W, s, 0, fmt)`` on a get_attr weight becomes ``dequantize_packed(codes, s, fmt, shape)``: the codes are
``fmt.encode(round_to_grid(W / s))`` packed by ``ops.pack_codes``, so the decoded tensor equals the fake-quantized
weight exactly. The FP32 weight buffer is dropped, which is what makes the ONNX file ~1/8 of FP32 size. 8-bit layers
(first/last conv by default) keep fake quantization on FP32 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from msfp_compiler.ops import DEQUANTIZE_PACKED, QUANTIZE, get_format, pack_codes
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.record import record_of

from .insert_qdq import attr_name
from .select_format import get_weight

__all__ = ["PackWeights", "drop_unused_attrs"]



def drop_unused_attrs(gm: fx.GraphModule) -> dict[str, int]:
    """Remove dead nodes and the buffers/parameters no get_attr reads any more; returns name -> bytes freed."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    freed = {}
    for name, buf in list(gm.named_buffers()) + list(gm.named_parameters()):
        if name not in used:
            owner_path, _, leaf = name.rpartition(".")
            freed[name] = buf.numel() * buf.element_size()
            delattr(gm.get_submodule(owner_path) if owner_path else gm, leaf)
    return freed


def _packable(q: fx.Node) -> bool:
    """A quantize node on a 4-bit weight held in a get_attr."""
    rec = record_of(q.args[0])
    return rec is not None and rec.role == "weight" and rec.bits == 4 and q.args[0].op == "get_attr"


@dataclass
class PackWeights(Pass):
    """Pass: 4-bit weight quantizers -> dequantize_packed of 4-bit codes; unused FP32 weights dropped."""

    name: str = "pack_weights"

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [q.name for q in gm.graph.nodes if q.op == "call_function" and q.target == QUANTIZE and _packable(q)]
        assert not left, f"pack_weights left 4-bit weights unpacked: {left[:5]}"

    def call(self, gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        packed = fp_bytes = packed_bytes = 0
        weight_targets = set()
        for q in [n for n in g.nodes if n.op == "call_function" and n.target == QUANTIZE and _packable(n)]:
            w_node = q.args[0]
            rec = record_of(w_node)
            fmt = get_format(rec.choice.fmt)
            w = get_weight(gm, w_node)
            weight_targets.add(str(w_node.target))
            codes = fmt.encode(fmt.round_to_grid(w / rec.choice.scale))
            buf = pack_codes(codes)
            name = attr_name(w_node, "packed")
            gm.register_buffer(name, buf)
            with g.inserting_before(q):
                p = g.get_attr(name)
            q.target = DEQUANTIZE_PACKED
            q.args = (p, q.args[1], rec.choice.fmt, list(w.shape))
            packed += 1
            fp_bytes += w.numel() * 4
            packed_bytes += buf.numel() + rec.choice.scale.numel() * 4
        freed = drop_unused_attrs(gm)
        # fp32_bytes: the weights packed here; other_freed_bytes: buffers earlier passes left unused (biases that
        # fold_zero_point replaced, scales of weights now packed), dropped at the same time
        info = {"packed_weights": packed, "fp32_bytes": fp_bytes, "packed_bytes": packed_bytes,
                "ratio": round(packed_bytes / fp_bytes, 4) if fp_bytes else None,
                "other_freed_bytes": sum(b for n, b in freed.items() if n not in weight_targets)}
        return PassResult(gm, packed > 0 or bool(freed), info)
