"""select_format: the mixup-sign decision and per-layer format / scale / zero-point search.

For every activation record: evaluate the candidate formats of the scheme (MSFP: signed e1m2/e2m1/e3m0 and unsigned
ue2m2/ue3m1/ue4m0 with a zero point), each with its best clip and zero point by MSE on calibration values from every
timestep group, and keep the lowest MSE. With sign_rule="stats", unsigned candidates are only tried where the
negative part is small and bounded (|min| <= ratio * max), the paper's "anomalous activation" test. Weights use the
signed candidates, per output channel. Layers in ``keep_8bit`` (first / last conv by default) get INT8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from msfp_compiler.config import HIGH_PRECISION, QuantConfig
from msfp_compiler.formats import parse_format
from msfp_compiler.layer_graph import layer_kind
from msfp_compiler.names import (CONV_NAMES, expand_keep_names, layer_matches, layer_names, tensor_names,
                                 unknown_keep_error)
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.progress import Progress
from msfp_compiler.record import QuantChoice, TensorRecord, records
from msfp_compiler.search import SearchResult, SortedValues, exact_mse, search_scale

__all__ = ["SelectFormat", "high_precision_layers", "get_weight", "layer_cost"]


def get_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj.detach()


def high_precision_layers(gm: fx.GraphModule, keep: tuple[str, ...]) -> set[str]:
    """fx names of the layer nodes kept at 8 bits: 'first'/'last' conv in graph order, 'last_block' (the last
    up block), layers by module path (``down_blocks.1.attentions.0.to_q``; a block path such as ``mid_block`` keeps
    every layer in it), fnmatch pattern over module paths (``*.conv_shortcut``) or fx name. Unknown names and
    patterns matching no layer raise MsfpError with the closest layer names."""
    convs = [n.name for n in gm.graph.nodes if layer_kind(n) == "conv"]
    layers = layer_names(gm)
    out: set[str] = set()
    unknown = []
    for k in expand_keep_names(keep, layers.values()):
        if k in CONV_NAMES:
            continue
        hit = {fx_name for fx_name, path in layers.items() if fx_name == k or layer_matches(k, path)}
        if not hit:
            unknown.append(k)
        out |= hit
    if unknown:
        raise unknown_keep_error(unknown, layers.values())
    if convs and "first" in keep:
        out.add(convs[0])
    if convs and "last" in keep:
        out.add(convs[-1])
    return out


def _size(d) -> int | None:
    """A traced dim as an int: symbolic ones (the text length) at the traced example's value; None if unknown."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def _per_sample(val) -> int | None:
    """Elements per batch item of a traced tensor (its ``meta["val"]``); None when unknown."""
    dims = [_size(d) for d in getattr(val, "shape", (None,))[1:]]
    return None if None in dims else math.prod(dims)


def layer_cost(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int | None]:
    """(weight elements, multiply-accumulates per sample) of a conv, linear or attention node; the MACs are None
    when the traced shapes are unknown. Attention counts its two matmuls (Q K^T and P V) and has no weight."""
    if layer_kind(node) == "attn":
        q, k, v = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:3])
        lq, s_len = _per_sample(q), _size(k.shape[-2]) if k is not None else None
        if None in (lq, s_len) or v is None:
            return 0, None
        return 0, lq * s_len + lq // _size(q.shape[-1]) * s_len * _size(v.shape[-1])  # H L D S + H L S Dv
    w = get_weight(gm, node.args[1])
    out = _per_sample(node.meta.get("val"))
    return w.numel(), None if out is None else out * w[0].numel()  # one weight row per output element


def _high_precision_shares(gm: fx.GraphModule, hp: set[str]) -> dict[str, float]:
    """What keep_8bit costs: the 8-bit layers' share of the layers' weights and of their MACs."""
    cost = {n.name: layer_cost(gm, n) for n in gm.graph.nodes if layer_kind(n)}
    w_all = sum(w for w, _ in cost.values())
    out = {"high_precision_weight_share": round(sum(cost[n][0] for n in hp) / max(w_all, 1), 4)}
    if all(m is not None for _, m in cost.values()):
        m_all = sum(m for _, m in cost.values())
        out["high_precision_mac_share"] = round(sum(cost[n][1] for n in hp) / max(m_all, 1), 4)
    return out


def _unsigned_allowed(rec: TensorRecord, cfg: QuantConfig) -> bool:
    if cfg.sign_rule == "mse":
        return True
    return rec.min >= 0 or (rec.max > 0 and -rec.min <= cfg.unsigned_max_neg_ratio * rec.max)


@dataclass
class SelectFormat(Pass):
    """Pass: fill ``record.choice`` for every quantized tensor."""

    config: QuantConfig
    name: str = "select_format"

    def ensures(self, gm: fx.GraphModule) -> None:
        missing = [n.name for n, rec in records(gm) if rec.choice is None]
        assert not missing, f"select_format left records without a choice: {missing[:5]}"

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        hp = high_precision_layers(gm, cfg.keep_8bit)
        report: list[str] = []
        n_signed = n_unsigned = n_8bit = 0
        fmt_count: dict[str, int] = {}
        recs = records(gm)
        names, layers = tensor_names(gm), layer_names(gm)
        bar = Progress(len(recs), "format search", unit="tensors")
        for node, rec in recs:
            bar.update()
            eight = any(c in hp for c in rec.consumers)
            if rec.role == "weight":
                w = get_weight(gm, node)
                rows = w.reshape(w.shape[0], -1) if cfg.weight_granularity == "channel" else w.reshape(1, -1)
                cands = HIGH_PRECISION[1] if eight else cfg.weight_candidates
                bshape = (-1,) + (1,) * (w.dim() - 1) if cfg.weight_granularity == "channel" else ()
            else:
                rows = rec.calibration_sample().reshape(1, -1)
                cands = HIGH_PRECISION[0] if eight else cfg.act_candidates
                if not eight and not _unsigned_allowed(rec, cfg):
                    cands = tuple(c for c in cands if not c.startswith("u")) or cands
                bshape = ()
            rows = rows.float().reshape(rows.shape[0], -1)
            sv = SortedValues(rows)  # one sort shared by every candidate format
            # Candidates are ranked by their prefix-sum MSE; only the winner is quantized again for its exact MSE
            # (the two differ only for values exactly on a rounding boundary).
            results: dict[str, SearchResult] = {
                c: search_scale(parse_format(c), rows, cfg.clip_ratios, cfg.zero_points, sorted_values=sv,
                                exact=False)
                for c in cands
            }
            mses = {c: r.total_mse for c, r in results.items()}
            best = min(mses, key=lambda c: (mses[c], c))
            res = exact_mse(parse_format(best), rows, results[best])
            mses[best] = res.total_mse
            scale = res.scale.reshape(bshape) if bshape else res.scale.reshape(())
            zp = res.zero_point.reshape(bshape) if bshape else res.zero_point.reshape(())
            rec.bits = 8 if eight else 4
            rec.choice = QuantChoice(best, scale, zp, mses, mses[best])
            fmt_count[best] = fmt_count.get(best, 0) + 1
            if rec.role == "act":
                n_8bit += eight
                if not eight:
                    n_unsigned += not rec.choice.signed
                    n_signed += rec.choice.signed
            cand_txt = " ".join(f"{c}={m:.3g}" for c, m in mses.items())
            if rec.role == "act":
                report.append(f"{names.get(node.name, node.name):<56} act    {best:<6} scale {float(scale):.4g} zp {float(zp):+.4f} "
                              f"neg {rec.neg_fraction:5.1%}{' silu' if rec.after_silu else '     '} | {cand_txt}")
            else:
                report.append(f"{names.get(node.name, node.name):<56} weight {best:<6} scale {float(res.scale.min()):.3g}.."
                              f"{float(res.scale.max()):.3g} | {cand_txt}")
        bar.close()
        info = {"act_signed": n_signed, "act_unsigned": n_unsigned, "act_8bit": n_8bit, "formats": fmt_count,
                "high_precision_layers": sorted(layers.get(n, n) for n in hp), **_high_precision_shares(gm, hp)}
        return PassResult(gm, bool(fmt_count), info, report)
