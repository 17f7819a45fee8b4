"""fuse_talora: resolve the trained router into a t -> LoRA table and fuse the LoRAs into quantized weights.

After training the router depends on the timestep only, so it becomes an int64 table over all training timesteps.
Every TALoRA layer becomes K quantized weights Q(W + B_k A_k) (same scale as W's quantizer, as in training), chosen
at run time by one ``msfp::select_weight(table, timestep, [Q(W_0), ...])`` node (talora.py), so one graph / one ONNX
serves every timestep and the lowering and the Triton runner find the choice by its op. Only the LoRAs the table
selects for some timestep are kept (the table is renumbered over them): a router that ends up using one LoRA
everywhere gives plain quantized layers with that LoRA merged into W, as K = 1 (plain LoRA) does. pack_weights then
packs every kept 4-bit W_k; the ONNX grows by at most K x the packed weights, plus K x each 8-bit layer's weight
(stored as int8 or float, --conv-weights) for the LoRAs on 8-bit layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

from msfp_compiler.ops import QUANTIZE
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.record import META_KEY, record_of
from msfp_compiler.talora import SELECT_WEIGHT, TALoRAWeight, router_table

from .insert_qdq import attr_name

__all__ = ["FuseTALoRA", "table_segments", "TABLE_ATTR"]

TABLE_ATTR = "msfp_talora_table"


def table_segments(table: torch.Tensor) -> list[tuple[int, int, int]]:
    """Contiguous runs (t_lo, t_hi, k) of a t -> k table."""
    out = []
    start = 0
    for t in range(1, len(table) + 1):
        if t == len(table) or table[t] != table[start]:
            out.append((start, t - 1, int(table[start])))
            start = t
    return out


def _lora_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TALoRAWeight)]


@dataclass
class FuseTALoRA(Pass):
    """Pass: TALoRAWeight modules -> merged, quantized weight sets selected by ``msfp::select_weight``."""

    # None: the router's own timestep count (the scheduler it was trained on), not a fixed 1000.
    num_train_timesteps: int | None = None
    name: str = "fuse_talora"

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n for n, _ in gm.named_children() if n.startswith("talora_")]
        assert not left, f"fuse_talora left LoRA modules behind: {left}"

    def call(self, gm: fx.GraphModule) -> PassResult:
        lora_nodes = _lora_nodes(gm)
        if not lora_nodes:
            return PassResult(gm, False, {"talora_layers": 0})
        table = router_table(gm, self.num_train_timesteps)
        num_loras = gm.get_submodule(lora_nodes[0].target).lora_A.shape[0]
        kept = sorted({int(k) for k in table.tolist()})  # LoRAs some timestep selects
        table = torch.searchsorted(torch.tensor(kept, device=table.device), table)  # renumbered over the kept ones
        tab = self._table_node(gm, table) if len(kept) > 1 else None
        for lw in lora_nodes:
            self._fuse_one(gm, lw, tab, kept)
        # Dead router / LoRA nodes (and the K = 1 gate's get_attr) go before the modules they reference.
        g = gm.graph
        for n in [n for n in g.nodes if n.op == "call_module"]:
            if not n.users:
                g.erase_node(n)
        g.eliminate_dead_code()
        for name in [n for n, _ in gm.named_children() if n.startswith("talora_")]:
            delattr(gm, name)
        gm.recompile()  # the router's submodule is gone: the old forward code must not be called again
        segs = [(lo, hi, kept[k]) for lo, hi, k in table_segments(table)]  # numbered as in training
        report = [f"t {lo:4d}..{hi:4d} -> LoRA {k}" for lo, hi, k in segs]
        if len(kept) < num_loras:
            report.append(f"dropped LoRA {', '.join(str(k) for k in range(num_loras) if k not in kept)}: "
                          "no timestep selects it")
        info = {"talora_layers": len(lora_nodes), "num_loras": num_loras, "kept_loras": len(kept),
                "segments": len(segs),
                "table": ";".join(f"{lo}-{hi}:{k}" for lo, hi, k in segs)}
        return PassResult(gm, True, info, report)

    @staticmethod
    def _table_node(gm: fx.GraphModule, table: torch.Tensor) -> fx.Node:
        gm.register_buffer(TABLE_ATTR, table.clone())
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_after(placeholders[-1]):
            return gm.graph.get_attr(TABLE_ATTR)

    @staticmethod
    def _fuse_one(gm: fx.GraphModule, lw: fx.Node, tab: fx.Node | None, kept: list[int]) -> None:
        """One layer: the kept LoRAs merged into W, each behind a copy of W's quantizer, then the set choice (when
        more than one is kept)."""
        g = gm.graph
        mod: TALoRAWeight = gm.get_submodule(lw.target)
        w_node = lw.args[0]
        rec = record_of(w_node)
        weight = _tensor(gm, w_node.target)
        merged = []
        for k in kept:
            name = attr_name(w_node, f"lora{k}")
            gm.register_buffer(name, (weight + mod.delta(k)).detach().contiguous())
            with g.inserting_before(lw):
                node = g.get_attr(name)
            node.meta[META_KEY] = copy.copy(rec)
            merged.append(node)
        (q,) = [u for u in lw.users if u.op == "call_function" and u.target == QUANTIZE]
        if tab is None:
            q.args = (merged[0],) + tuple(q.args[1:])
        else:
            timestep = [n for n in g.nodes if n.op == "placeholder"][1]
            with g.inserting_before(q):
                qs = [g.call_function(QUANTIZE, (m,) + tuple(q.args[1:])) for m in merged]
                sel = g.call_function(SELECT_WEIGHT, (tab, timestep, qs))
            q.replace_all_uses_with(sel)
            g.erase_node(q)
        g.erase_node(lw)


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf).detach()
