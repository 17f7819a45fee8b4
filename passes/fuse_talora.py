"""fuse_talora: resolve the trained router into a t -> LoRA table and fuse the LoRAs into quantized weights.

After training the router depends on the timestep only, so it becomes an int64 table over all training timesteps.
Every TALoRA layer becomes K quantized weights Q(W + B_k A_k) (same scale as W's quantizer, as in training),
stacked and selected at run time with ``table[timestep[0]]`` (samplers give a batch one timestep), so one graph /
one ONNX serves every timestep. With K = 1 (plain LoRA) the merged weight simply replaces W. pack_weights then
packs every W_k; the ONNX grows by at most K x the packed weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

from msfp_compiler.ops import QUANTIZE
from msfp_compiler.pass_manager import PassResult
from msfp_compiler.talora import TALoRAWeight, router_table
from msfp_compiler.record import META_KEY, record_of

from .insert_qdq import attr_name

__all__ = ["FuseTALoRA", "table_segments"]

aten = torch.ops.aten
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


@dataclass
class FuseTALoRA:
    # None: the router's own timestep count (the scheduler it was trained on), not a fixed 1000.
    num_train_timesteps: int | None = None
    name: str = "fuse_talora"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        g = gm.graph
        lora_nodes = [n for n in g.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), TALoRAWeight)]
        if not lora_nodes:
            return PassResult(gm, False, {"talora_layers": 0})
        table = router_table(gm, self.num_train_timesteps)
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        timestep = placeholders[1]
        k_idx = None
        fused = 0
        num_loras = 1
        for lw in lora_nodes:
            mod: TALoRAWeight = gm.get_submodule(lw.target)
            w_node = lw.args[0]
            rec = record_of(w_node)
            weight = _tensor(gm, w_node.target)
            num_loras = mod.lora_A.shape[0]
            merged = []
            for k in range(num_loras):
                name = attr_name(w_node, f"lora{k}")
                gm.register_buffer(name, (weight + mod.delta(k)).detach().contiguous())
                with g.inserting_before(lw):
                    node = g.get_attr(name)
                node.meta[META_KEY] = copy.copy(rec)
                merged.append(node)
            (q,) = [u for u in lw.users if u.op == "call_function" and u.target == QUANTIZE]
            if num_loras == 1:
                q.args = (merged[0],) + tuple(q.args[1:])
            else:
                if k_idx is None:
                    gm.register_buffer(TABLE_ATTR, table.clone())
                    with g.inserting_after(placeholders[-1]):
                        tab = g.get_attr(TABLE_ATTR)
                    with g.inserting_after(tab):
                        t0 = g.call_function(aten.slice.Tensor, (timestep, 0, 0, 1))
                    with g.inserting_after(t0):
                        k_idx = g.call_function(aten.index.Tensor, (tab, [t0]))
                with g.inserting_before(q):
                    qs = [g.call_function(QUANTIZE, (m,) + tuple(q.args[1:])) for m in merged]
                    stacked = g.call_function(aten.stack.default, (qs, 0))
                    sel = g.call_function(aten.index_select.default, (stacked, 0, k_idx))
                    w_sel = g.call_function(aten.squeeze.dim, (sel, 0))
                q.replace_all_uses_with(w_sel)
                g.erase_node(q)
            g.erase_node(lw)
            fused += 1
        # Dead router / LoRA nodes (and the K = 1 gate's get_attr) go before the modules they reference.
        for n in [n for n in g.nodes if n.op == "call_module"]:
            if not n.users:
                g.erase_node(n)
        g.eliminate_dead_code()
        for name in [n for n, _ in gm.named_children() if n.startswith("talora_")]:
            delattr(gm, name)
        gm.recompile()  # the router's submodule is gone: the old forward code must not be called again
        segs = table_segments(table) if num_loras > 1 else [(0, len(table) - 1, 0)]
        report = [f"t {lo:4d}..{hi:4d} -> LoRA {k}" for lo, hi, k in segs]
        info = {"talora_layers": fused, "num_loras": num_loras, "segments": len(segs),
                "table": ";".join(f"{lo}-{hi}:{k}" for lo, hi, k in segs)}
        return PassResult(gm, True, info, report)


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf).detach()
