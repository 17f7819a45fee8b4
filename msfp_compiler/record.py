"""The typed record passes keep in ``node.meta["msfp"]`` for every quantized tensor (activation or weight).

An activation quantizer belongs to the fx node that *produces* the tensor, so layers sharing an input (to_q, to_k,
to_v) share one quantizer; a weight quantizer belongs to the weight's get_attr node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

__all__ = ["GroupStats", "QuantChoice", "TensorRecord", "META_KEY", "record_of", "records"]

META_KEY = "msfp"


@dataclass
class GroupStats:
    """Statistics of one activation over the calibration inputs of one timestep group (streamed, bounded size)."""

    t_lo: int
    t_hi: int
    count: int = 0
    min: float = float("inf")
    max: float = float("-inf")
    negatives: int = 0
    sample: torch.Tensor | None = None  # a bounded random subsample of values, for the MSE search

    @property
    def neg_fraction(self) -> float:
        return self.negatives / max(self.count, 1)


@dataclass
class QuantChoice:
    """A chosen quantizer: format name, scale and zero point (tensors broadcastable to the quantized tensor)."""

    fmt: str
    scale: torch.Tensor
    zero_point: torch.Tensor
    candidates_mse: dict[str, float] = field(default_factory=dict)
    mse: float = float("nan")

    @property
    def signed(self) -> bool:
        return not self.fmt.startswith("u")


@dataclass
class TensorRecord:
    """Everything the passes know about one quantized tensor."""

    role: Literal["act", "weight"]
    consumers: list[str]  # names of the layer nodes (conv/linear/sdpa) that read it as a quantized operand
    layer_kind: str  # "conv", "linear" or "attn" (of the first consumer)
    after_silu: bool = False
    groups: list[GroupStats] = field(default_factory=list)
    bits: int = 4
    choice: QuantChoice | None = None
    channel_axis: int | None = None  # weights: per output channel along this axis

    @property
    def min(self) -> float:
        return min((g.min for g in self.groups), default=0.0)

    @property
    def max(self) -> float:
        return max((g.max for g in self.groups), default=0.0)

    @property
    def neg_fraction(self) -> float:
        n = sum(g.count for g in self.groups)
        return sum(g.negatives for g in self.groups) / max(n, 1)

    def calibration_sample(self) -> torch.Tensor:
        """Values from every timestep group (not only the last), concatenated."""
        parts = [g.sample for g in self.groups if g.sample is not None]
        return torch.cat(parts) if parts else torch.zeros(0)


def record_of(node: fx.Node) -> TensorRecord | None:
    return node.meta.get(META_KEY)


def records(gm: fx.GraphModule) -> list[tuple[fx.Node, TensorRecord]]:
    """All quantized tensors of the graph, in graph order."""
    return [(n, r) for n in gm.graph.nodes if (r := n.meta.get(META_KEY)) is not None and isinstance(r, TensorRecord)]
