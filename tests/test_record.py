"""record: the one typed record per quantized tensor under node.meta["msfp"]."""

from __future__ import annotations

import torch
import torch.fx as fx

from msfp_compiler.record import META_KEY, GroupStats, QuantChoice, TensorRecord, record_of, records


def test_records_in_graph_order_and_aggregates() -> None:
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    a = TensorRecord("act", ["l1"], "conv", groups=[GroupStats(500, 999, 10, -1.0, 2.0, 3),
                                                    GroupStats(0, 499, 30, -0.5, 4.0, 1)])
    w = TensorRecord("weight", ["l2"], "linear", choice=QuantChoice("ue3m1", torch.tensor(1.0), torch.tensor(-0.5)))
    nodes[1].meta[META_KEY], nodes[0].meta[META_KEY] = w, a
    nodes[0].meta["other"] = "ignored"
    assert [(n.name, r) for n, r in records(gm)] == [(nodes[0].name, a), (nodes[1].name, w)]
    assert record_of(nodes[0]) is a and record_of(next(iter(gm.graph.nodes))) is None
    assert (a.min, a.max) == (-1.0, 4.0) and a.neg_fraction == 4 / 40
    assert not w.choice.signed and QuantChoice("e2m1", torch.tensor(1.0), torch.tensor(0.0)).signed
