"""Where the compiler computes: ``--device cpu`` (default) or ``cuda``.

Capture and ONNX lowering always run on the CPU; calibration, activation statistics, the format search and
(TA)LoRA/DFA fine-tuning run on the chosen device. The graph moves between the two with ``move_graph``, which also
rewrites the device constants torch.export bakes into the graph (``arange(..., device=cpu)`` in the timestep
embedding) and the tensors in the nodes' msfp records.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields, is_dataclass
from typing import Iterator

import torch
import torch.fx as fx

from .errors import MsfpError
from .record import META_KEY

__all__ = ["resolve_device", "move_graph", "move_tensors", "exact_fp32"]


def resolve_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device; a clear error when CUDA is asked for but absent."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise MsfpError(f"--device {name!r}: not a device (expected cpu or cuda)") from e
    if dev.type not in ("cpu", "cuda"):
        raise MsfpError(f"--device {name!r}: unsupported (expected cpu or cuda)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MsfpError(f"--device {name}: this torch build sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MsfpError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def move_tensors(obj, device: torch.device):
    """Tensors inside (nested) dataclasses, lists, tuples and dicts moved to device; other values unchanged."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            v = getattr(obj, f.name)
            moved = move_tensors(v, device)
            if moved is not v:
                object.__setattr__(obj, f.name, moved)
        return obj
    if isinstance(obj, list):
        return [move_tensors(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(move_tensors(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    return obj


def move_graph(gm: fx.GraphModule, device: str | torch.device) -> fx.GraphModule:
    """Move a captured GraphModule (parameters, buffers, plain tensor attributes, baked-in device arguments and the
    msfp records) to device, in place."""
    device = torch.device(device)
    gm.to(device)
    changed = False
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, leaf = str(n.target).rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            val = getattr(mod, leaf, None)
            if torch.is_tensor(val) and not isinstance(val, torch.nn.Parameter) and val.device != device \
                    and leaf not in mod._buffers:
                setattr(mod, leaf, val.to(device))
        dev = n.kwargs.get("device")
        if isinstance(dev, torch.device) and dev != device:
            n.kwargs = {**n.kwargs, "device": device}
            changed = True
        if META_KEY in n.meta:
            move_tensors(n.meta[META_KEY], device)
    if changed:
        gm.recompile()
    return gm


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Plain FP32 matmuls and convolutions on CUDA (no TF32), so statistics match the CPU up to summation order."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
