"""Readable layer names: the diffusers module path of each layer and quantized tensor, not the fx node name.

torch.export keeps the module each ATen node came from in ``node.meta["nn_module_stack"]`` (innermost last), so a
conv node ``conv2d_6`` is the layer ``down_blocks.1.resnets.0.conv_shortcut`` a user finds in the model's
``named_modules()``. A quantized tensor is named after the layer that reads it: ``<layer>.input`` (conv / linear
activation), ``<layer>.weight`` (its weight: the parameter's own path) and ``<attention>.q`` / ``.k`` / ``.v`` (the
operands of scaled_dot_product_attention), ``<layer>.input.0`` / ``.input.1`` (the parts of a concatenation that
feeds a conv, quantized per part). These names are what passes.log, ``--summary``, the plots, ``--check``
and ``--keep-8bit`` use; ``--keep-8bit`` also takes fnmatch patterns over them (``*.conv_shortcut``) and the symbolic
names ``first`` / ``last`` (convs, resolved by select_format) and ``last_block`` (the last decoder block, resolved
here).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable

import torch
import torch.fx as fx

from .errors import MsfpError
from .layer_graph import LAYER_OPS, layer_kind

__all__ = ["WRAPPER_PREFIX", "module_path", "layer_names", "tensor_names", "display_names", "model_layer_names",
           "layer_matches", "suggest", "unknown_names_error", "unknown_keep_error", "LAST_BLOCK", "CONV_NAMES",
           "expand_keep_names"]

WRAPPER_PREFIX = "unet."  # capture wraps the UNet as UNetWrapper.unet
_ATTN_OPERANDS = ("q", "k", "v")
CONV_NAMES = ("first", "last")  # the first / last conv in graph order (select_format.high_precision_layers)
# The last up block of a diffusers UNet: the full-resolution decoder level, where strict W4A4's error sits on both
# MNIST models (results/quality_mnist.md); its index differs by model (up_blocks.3 / up_blocks.2), hence a name.
LAST_BLOCK = "last_block"
_UP_BLOCK = re.compile(r"up_blocks\.(\d+)\.")


def _strip(path: str) -> str:
    return path[len(WRAPPER_PREFIX):] if path.startswith(WRAPPER_PREFIX) else path


def module_path(node: fx.Node) -> str | None:
    """The innermost module path a node was traced in (wrapper prefix removed), or None (top-level code)."""
    if node.op == "get_attr":
        return _strip(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not isinstance(path, str) or path.startswith("_") or not path:
        return None
    return _strip(path)


def layer_names(gm: fx.GraphModule) -> dict[str, str]:
    """fx name -> readable name for every conv / linear / attention node. Attention is named by its Attention
    module; a module traced more than once gets ``#2``, ``#3`` on its later calls."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for n in gm.graph.nodes:
        if layer_kind(n) is None:
            continue
        path = module_path(n) or n.name
        seen[path] = seen.get(path, 0) + 1
        out[n.name] = path if seen[path] == 1 else f"{path}#{seen[path]}"
    return out


def tensor_names(gm: fx.GraphModule) -> dict[str, str]:
    """fx name of each quantized tensor's producer (the record's node) -> readable name (see module docstring)."""
    from .record import records

    layers = layer_names(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    out: dict[str, str] = {}
    for node, rec in records(gm):
        if rec.role == "weight":
            out[node.name] = module_path(node) or node.name
            continue
        name = None
        for cname in rec.consumers:
            c = by_name.get(cname)
            if c is None or c.op != "call_function" or c.target not in LAYER_OPS:
                continue
            _, act_idx, _ = LAYER_OPS[c.target]
            idx = [i for i in act_idx if i < len(c.args) and _is_source(c.args[i], node)]
            base = layers.get(cname, cname)
            if layer_kind(c) == "attn":
                name = f"{base}.{_ATTN_OPERANDS[idx[0]] if idx else 'q'}"
            else:
                part = None if idx else _cat_part(c.args[act_idx[0]], node)
                name = f"{base}.input" if part is None else f"{base}.input.{part}"
            break
        out[node.name] = name or node.name
    return out


def _is_source(arg, node: fx.Node) -> bool:
    """The consumer's operand is the record's node itself or its quantizer (after insert_qdq)."""
    if arg is node:
        return True
    return isinstance(arg, fx.Node) and arg.op == "call_function" and bool(arg.args) and arg.args[0] is node


def _cat_part(arg, node: fx.Node) -> int | None:
    """Position of ``node`` (or its quantizer) among the parts of a concatenation quantized per part, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target == torch.ops.aten.cat.default):
        return None
    return next((k for k, p in enumerate(arg.args[0]) if _is_source(p, node)), None)


def display_names(gm: fx.GraphModule) -> dict[str, str]:
    """Readable names for every node a report mentions: layers, quantized tensors and their quantize nodes; other
    nodes map to ``<module path>/<fx name>`` or their fx name."""
    out = {}
    for n in gm.graph.nodes:
        path = module_path(n)
        out[n.name] = f"{path}/{n.name}" if path and n.op != "get_attr" else (path or n.name)
    out.update(layer_names(gm))
    tensors = tensor_names(gm)
    out.update(tensors)
    layers = layer_names(gm)
    for n in gm.graph.nodes:  # quantize / dequantize nodes: the tensor they quantize, from the layer that reads it
        if n.op != "call_function" or not str(n.target).startswith("msfp."):
            continue
        if n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in tensors:
            out[n.name] = tensors[n.args[0].name]
            continue
        for u in n.users:
            spec = LAYER_OPS.get(u.target) if u.op == "call_function" else None
            if not spec:
                continue
            _, act_idx, w_idx = spec
            pos = [i for i, a in enumerate(u.args) if a is n]
            base = layers.get(u.name, u.name)
            if w_idx in pos:
                out[n.name] = f"{base}.weight"
            elif pos:
                out[n.name] = f"{base}.{_ATTN_OPERANDS[pos[0]]}" if layer_kind(u) == "attn" else f"{base}.input"
            break
        else:
            src = n.meta.get("msfp_quantizer_of")
            if src:
                out[n.name] = _strip(src.replace("_", ".")) if src.startswith("unet_") else src
    return out


def model_layer_names(unet: torch.nn.Module) -> list[str]:
    """Module paths of the layers msfp-compile can quantize: Conv2d, Linear and attention modules (those with
    ``to_q``), from ``named_modules()``: known before anything is traced."""
    out = []
    for path, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) or hasattr(m, "to_q"):
            out.append(path)
    return out


def layer_matches(name: str, path: str) -> bool:
    """Whether a keep_8bit name selects the layer at module path ``path`` (a later call's ``#2`` suffix ignored): an
    fnmatch pattern when it holds ``*``, ``?`` or ``[`` (``*.conv_shortcut``), else the path itself or a block path
    above it (``mid_block``)."""
    path = path.split("#")[0]
    if any(c in name for c in "*?["):
        return fnmatch.fnmatchcase(path, name)
    return path == name or path.startswith(name + ".")


def expand_keep_names(keep: Iterable[str], paths: Iterable[str]) -> tuple[str, ...]:
    """keep_8bit with ``last_block`` replaced by the block path of the highest-numbered ``up_blocks.N`` among the
    layer ``paths``; MsfpError if it is asked for and no layer sits in an up block."""
    keep = tuple(keep)
    if LAST_BLOCK not in keep:
        return keep
    ups = [int(m.group(1)) for p in paths if (m := _UP_BLOCK.match(p))]
    if not ups:
        raise MsfpError(f"QuantConfig.keep_8bit: {LAST_BLOCK!r} needs a UNet with up_blocks (a diffusers "
                        "UNet2DModel / UNet2DConditionModel); name the layers or a block path instead")
    return tuple(f"up_blocks.{max(ups)}" if k == LAST_BLOCK else k for k in keep)


def unknown_keep_error(unknown: list[str], paths: Iterable[str]) -> MsfpError:
    """unknown_names_error for QuantConfig.keep_8bit: the symbolic names are valid choices too (the check before
    calibration and select_format's, one message)."""
    return unknown_names_error("QuantConfig.keep_8bit", unknown, [*CONV_NAMES, LAST_BLOCK, *paths])


def suggest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names (difflib), best first."""
    return difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)


def unknown_names_error(what: str, unknown: list[str], valid: Iterable[str]) -> MsfpError:
    """One-line error for names that are not layers, with the closest valid ones."""
    valid = list(valid)
    parts = []
    for u in unknown:
        close = suggest(u, valid)
        parts.append(f"{u!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    example = f"; layers look like {valid[len(valid) // 2]}" if valid else ""
    return MsfpError(f"{what}: unknown layer {', '.join(parts)}{example}")
