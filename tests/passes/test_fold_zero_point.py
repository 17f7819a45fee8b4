"""fold_zero_point: moving the unsigned zero point into the consumer bias is exact, padded convs included (opt-in)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from msfp_compiler.calibration import CalibBatch, CalibrationSet, TimestepGroup
from msfp_compiler.config import QuantConfig
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.ops import QUANTIZE, QUANTIZE_FOLDED
from msfp_compiler.passes.fold_zero_point import FoldZeroPoint, padded_conv
from msfp_compiler.passes.insert_qdq import InsertQDQ
from msfp_compiler.passes.select_format import SelectFormat
from msfp_compiler.record import records
from tests.conftest import clone_gm

aten = torch.ops.aten


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _nodes(gm, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_folded_unet_equals_unfolded(stages_unet2d) -> None:
    unfolded, folded = stages_unet2d.after["insert_qdq"], stages_unet2d.after["fold_zero_point"]
    for b in stages_unet2d.calib.holdout + stages_unet2d.calib.batches:
        with torch.no_grad():
            ref, out = unfolded(*b.args), folded(*b.args)
        assert _rel_max(out, ref) < 1e-4


def test_unet_fold_counts_and_pads(stages_unet2d) -> None:
    gm = stages_unet2d.after["fold_zero_point"]
    info = stages_unet2d.results["fold_zero_point"].info
    folded = _nodes(gm, QUANTIZE_FOLDED)
    assert info["folded"] == len(folded) > 0
    # default: padded convs keep the zero point in their quantizer (a Pad copy costs more in ORT than it saves)
    assert info["explicit_pads"] == 0 and not _nodes(gm, aten.constant_pad_nd.default)
    for q in folded:
        c = q.args[0].meta["msfp"].choice
        assert not c.signed and float(c.zero_point) != 0.0
        for user in q.users:
            assert user.target in (aten.conv2d.default, aten.linear.default)
            assert not padded_conv(user)
            assert user.args[2].op == "get_attr" and "folded_bias" in user.args[2].target
    # signed, attention-fed, padded-conv-fed and concatenation-part quantizers are left alone
    for q in _nodes(gm, QUANTIZE):
        c = q.args[0].meta["msfp"].choice
        if not c.signed and float(c.zero_point) != 0.0 and q.args[0].meta["msfp"].role == "act":
            assert any(u.target == aten.scaled_dot_product_attention.default or u.meta.get("msfp_split_cat")
                       or padded_conv(u) for u in q.users)


class _Net(nn.Module):
    """Convs with and without padding / bias / stride, and a linear, each fed by an unsigned-quantized input."""

    def __init__(self):
        super().__init__()
        self.conv_pad = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_1x1 = nn.Conv2d(8, 8, 1, bias=False)
        self.conv_stride = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.conv_pad2 = nn.Conv2d(6, 4, 5, padding=2, bias=False)
        self.lin = nn.Linear(4, 5)

    def forward(self, x, t):
        h = self.conv_pad(x)
        h = self.conv_1x1(nn.functional.silu(h))
        h = self.conv_stride(nn.functional.silu(h))
        h = self.conv_pad2(nn.functional.silu(h))
        return self.lin(nn.functional.silu(h.mean((2, 3))))


@pytest.fixture(scope="module")
def small_graphs():
    torch.manual_seed(0)
    net = _Net().eval()
    x, t = torch.randn(2, 3, 8, 8) + 0.5, torch.zeros(2, dtype=torch.int64)
    ep = torch.export.export(net, (x, t), dynamic_shapes=({0: torch.export.Dim.AUTO}, {0: torch.export.Dim.AUTO}))
    gm = ep.run_decompositions({}).module()
    g = torch.Generator().manual_seed(1)
    batches = [CalibBatch(torch.randn(2, 3, 8, 8, generator=g) + 0.5, t) for _ in range(3)]
    AnnotateSign(CalibrationSet([TimestepGroup(0, 0, batches)]), 512, 0)(gm)
    # unsigned with a zero point everywhere (even on the signed network input), no 8-bit layers
    SelectFormat(QuantConfig(act_formats=("ue3m1",), weight_formats=("e2m1",), keep_8bit=()))(gm)
    InsertQDQ()(gm)
    gm.recompile()
    unfolded = clone_gm(gm)
    res = FoldZeroPoint(pad_convs=True)(gm)
    gm.graph.lint()
    gm.recompile()
    return unfolded, gm, res


def test_small_net_default_skips_padded_convs(small_graphs) -> None:
    unfolded, _, _ = small_graphs
    gm = clone_gm(unfolded)
    res = FoldZeroPoint()(gm)
    gm.recompile()
    assert res.info == {"folded": 2, "explicit_pads": 0}  # conv_1x1 and lin; the three padded convs keep z
    folded_into = sorted(u.name for q in _nodes(gm, QUANTIZE_FOLDED) for u in q.users)
    assert len(folded_into) == 2
    assert not any(padded_conv(u) for q in _nodes(gm, QUANTIZE_FOLDED) for u in q.users)
    x, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.zeros(3, dtype=torch.int64)
    with torch.no_grad():
        assert _rel_max(gm(x, t), unfolded(x, t)) < 1e-5


def test_small_net_fold_is_exact(small_graphs) -> None:
    unfolded, folded, res = small_graphs
    assert res.info["folded"] == 5 and res.info["explicit_pads"] == 3
    for pad in _nodes(folded, aten.constant_pad_nd.default):
        z = float(pad.args[0].args[0].meta["msfp"].choice.zero_point)
        assert pad.args[2] == -z  # the border must contribute W * (-z) + z * W = 0
        (conv,) = pad.users
        assert list(conv.args[4]) == [0, 0]
    zps = [float(r.choice.zero_point) for _, r in records(folded) if r.role == "act"]
    assert all(z < 0 for z in zps)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(3, 3, 8, 8, generator=g) * 1.5 + 0.3
        t = torch.zeros(3, dtype=torch.int64)
        with torch.no_grad():
            ref, out = unfolded(x, t), folded(x, t)
        assert _rel_max(out, ref) < 1e-5


def test_small_net_each_layer_matches(small_graphs) -> None:
    # compare every conv / linear output, not just the network output (which a later quantizer could hide)
    unfolded, folded, _ = small_graphs
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)), torch.zeros(2, dtype=torch.int64)

    def layer_outputs(gm):
        seen = {}

        class I(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.op == "call_function" and n.target in (aten.conv2d.default, aten.linear.default):
                    seen[n.name] = out
                return out

        with torch.no_grad():
            I(gm).run(x, t)
        return seen

    a, b = layer_outputs(unfolded), layer_outputs(folded)
    assert a.keys() == b.keys() and len(a) == 5
    for k in a:
        assert a[k].shape == b[k].shape
        assert _rel_max(b[k], a[k]) < 1e-5, k


def test_signed_choice_is_not_folded(small_graphs) -> None:
    unfolded, _, _ = small_graphs
    gm = clone_gm(unfolded)
    for _, r in records(gm):
        if r.role == "act":
            r.choice.fmt = "e2m1"  # signed: nothing to fold
    res = FoldZeroPoint()(gm)
    assert res.info["folded"] == 0 and not res.modified
    assert not _nodes(gm, QUANTIZE_FOLDED)
