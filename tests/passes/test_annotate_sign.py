"""annotate_sign: records on every quantized operand, SiLU detection, per-timestep-group statistics."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from msfp_compiler.calibration import CalibBatch, CalibrationSet, TimestepGroup, collect
from msfp_compiler.errors import MsfpError
from msfp_compiler.layer_graph import LAYER_OPS, split_cat_parts
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.record import TensorRecord, records
from msfp_compiler.sampling import make_scheduler

aten = torch.ops.aten
SILU_MIN = -0.2784645  # min of x * sigmoid(x), at x = -1.2785


@pytest.fixture(scope="module")
def annotated(stages_unet2d) -> fx.GraphModule:
    return stages_unet2d.after["annotate_sign"]


def _act_records(gm) -> list[tuple[fx.Node, TensorRecord]]:
    return [(n, r) for n, r in records(gm) if r.role == "act"]


def test_every_layer_operand_has_one_record(annotated) -> None:
    by_node = dict(records(annotated))
    layers = [n for n in annotated.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]
    assert {layers_kind for layers_kind in (LAYER_OPS[n.target][0] for n in layers)} == {"conv", "linear", "attn"}
    for layer in layers:
        kind, act_idx, w_idx = LAYER_OPS[layer.target]
        for i in act_idx:
            parts = split_cat_parts(layer.args[i], layer) or [layer.args[i]]  # a skip concatenation: per part
            for part in parts:
                rec = by_node[part]
                assert rec.role == "act" and layer.name in rec.consumers
        if w_idx is not None:
            w = layer.args[w_idx]
            assert w.op == "get_attr"
            rec = by_node[w]
            assert rec.role == "weight" and rec.channel_axis == 0 and layer.name in rec.consumers
            assert rec.groups == []  # weights need no calibration statistics
    # consumers listed by the records are exactly the layers
    consumer_names = {c for _, r in records(annotated) for c in r.consumers}
    assert consumer_names == {n.name for n in layers}


def _through_views(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in (aten.clone.default, aten.view.default, aten.reshape.default,
                                                    aten.transpose.int, aten.permute.default):
        n = n.args[0]
    return n


def test_finds_silu_fed_inputs(annotated) -> None:
    acts = _act_records(annotated)
    silu_fed = [(n, r) for n, r in acts if r.after_silu]
    # tiny UNet2DModel: time embedding (1 linear), per resnet conv1, conv2 (after dropout) and time_emb_proj
    assert len(silu_fed) >= 10
    for n, r in acts:
        src = _through_views(n)
        is_silu = src.op == "call_function" and src.target == aten.silu.default
        assert r.after_silu == is_silu, n.name
    # and the values agree: a SiLU output never goes below the SiLU minimum
    for n, r in silu_fed:
        assert r.min >= SILU_MIN - 1e-6, (n.name, r.min)
        assert r.max > 0
    # a resnet's conv1 reads silu(norm1(x)) directly
    silu_nodes = {n for n in annotated.graph.nodes if n.op == "call_function" and n.target == aten.silu.default}
    conv_after_silu = [n for n in annotated.graph.nodes if n.op == "call_function"
                       and n.target == aten.conv2d.default and n.args[0] in silu_nodes]
    assert conv_after_silu and all(dict(records(annotated))[c.args[0]].after_silu for c in conv_after_silu)


def test_stats_per_timestep_group(annotated, stages_unet2d) -> None:
    calib = stages_unet2d.calib
    assert len(calib.groups) == stages_unet2d.config.calib.num_groups == 3
    for _, r in _act_records(annotated):
        assert len(r.groups) == len(calib.groups)
        assert [(g.t_lo, g.t_hi) for g in r.groups] == [(g.t_lo, g.t_hi) for g in calib.groups]
    ts = [g.t_hi for g in calib.groups]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 3  # distinct, from noisy to clean


class _Collect(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names = names
        self.seen: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.seen.setdefault(n.name, []).append(out.detach().reshape(-1).clone())
        return out


def test_min_max_negative_fraction_match_direct_computation(annotated, stages_unet2d) -> None:
    gm = stages_unet2d.after["capture"]
    acts = _act_records(annotated)
    names = {n.name for n, _ in acts}
    for gi, grp in enumerate(stages_unet2d.calib.groups):
        interp = _Collect(gm, names)
        with torch.no_grad():
            for b in grp.batches:
                interp.run(*b.args)
        for n, r in acts:
            v = torch.cat(interp.seen[n.name])
            g = r.groups[gi]
            assert g.count == v.numel(), n.name
            assert g.min == float(v.min()) and g.max == float(v.max()), n.name
            assert g.negatives == int((v < 0).sum()), n.name
            assert g.neg_fraction == int((v < 0).sum()) / v.numel()
            # the kept subsample consists of real values of that group
            assert g.sample is not None and torch.isin(g.sample, v).all()
    for n, r in acts:
        assert r.min == min(g.min for g in r.groups) and r.max == max(g.max for g in r.groups)
        total = sum(g.count for g in r.groups)
        assert r.neg_fraction == pytest.approx(sum(g.negatives for g in r.groups) / total)


def test_samples_bounded_and_drawn_from_the_values(annotated, stages_unet2d) -> None:
    k = 2048  # QuantConfig.sample_per_group default, passed by compile's default_passes
    assert stages_unet2d.config.quant.sample_per_group == k
    for n, r in _act_records(annotated):
        for g in r.groups:
            assert 0 < g.sample.numel() <= max(k, len(stages_unet2d.calib.groups[0].batches))
            assert g.min <= float(g.sample.min()) and float(g.sample.max()) <= g.max  # drawn from the values
        x = r.calibration_sample()
        assert x.numel() == sum(g.sample.numel() for g in r.groups)  # every group, not only the last


def test_info_and_report(stages_unet2d) -> None:
    res = stages_unet2d.results["annotate_sign"]
    gm = stages_unet2d.after["annotate_sign"]
    acts = _act_records(gm)
    assert res.info["activations"] == len(acts)
    assert res.info["weights"] == len(records(gm)) - len(acts)
    assert res.info["after_silu"] == sum(r.after_silu for _, r in acts)
    assert res.info["timestep_groups"] == 3
    assert len(res.report) == len(acts) and any("after SiLU" in line for line in res.report)
    assert res.report[0].startswith("conv_in.input ")  # module paths, not fx node names
    assert not any(line.split()[0] in {n.name for n, _ in acts} for line in res.report)


@pytest.mark.parametrize("num_groups", [2])
def test_group_count_follows_configuration(unet2d, stages_unet2d, num_groups: int) -> None:
    sig = stages_unet2d.sig
    calib = collect(unet2d, sig, 1, 3, 0, make_scheduler(), num_groups=num_groups, holdout_samples=0,
                    progress=False)
    assert len(calib.groups) == num_groups
    assert sum(len(g.batches) for g in calib.groups) == 3
    gm = stages_unet2d.fresh("capture")
    AnnotateSign(calib, 256, 0)(gm)
    for _, r in _act_records(gm):
        assert len(r.groups) == num_groups
        assert sum(g.count for g in r.groups) > 0


def test_nonfinite_activation_names_the_node(stages_unet2d) -> None:
    b = stages_unet2d.calib.batches[0]
    bad = CalibBatch(b.sample.clone(), b.timestep, b.cond)
    bad.sample[0, 0, 0, 0] = float("nan")
    calib = CalibrationSet([TimestepGroup(int(b.timestep[0]), int(b.timestep[0]), [bad])])
    with pytest.raises(MsfpError, match=r"node \S+: non-finite activation"):
        AnnotateSign(calib, 64, 0)(stages_unet2d.fresh("capture"))


def test_same_seed_same_statistics(stages_unet2d) -> None:
    gm1, gm2 = stages_unet2d.fresh("capture"), stages_unet2d.fresh("capture")
    calib = CalibrationSet(stages_unet2d.calib.groups[:1])
    AnnotateSign(calib, 128, 7)(gm1)
    AnnotateSign(calib, 128, 7)(gm2)
    for (n1, r1), (n2, r2) in zip(records(gm1), records(gm2)):
        assert n1.name == n2.name
        for g1, g2 in zip(r1.groups, r2.groups):
            assert torch.equal(g1.sample, g2.sample) and g1.min == g2.min and g1.negatives == g2.negatives


# ---------------------------------------------------------------------------------------------------------------
# statistics stay bounded per timestep group however much calibration data there is




def _stats(gm, calib, per_group: int):
    res = AnnotateSign(calib, per_group, seed=0)(gm)
    acts = [r for _, r in records(res.graph_module) if r.role == "act"]
    return acts


@pytest.mark.parametrize("per_group", [64, 300])
def test_statistics_memory_is_bounded_per_timestep_group(stages_unet2d, per_group: int) -> None:
    unet, sig = stages_unet2d.unet, stages_unet2d.sig
    small = collect(unet, sig, 2, 4, 0, make_scheduler(), num_groups=2, holdout_samples=0, progress=False)
    large = collect(unet, sig, 6, 8, 0, make_scheduler(), num_groups=2, holdout_samples=0, progress=False)
    kept = {}
    for name, calib in (("small", small), ("large", large)):
        acts = _stats(stages_unet2d.fresh("capture"), calib, per_group)
        assert acts
        for rec in acts:
            assert len(rec.groups) == 2
            for g in rec.groups:
                assert g.sample is not None and 0 < g.sample.numel() <= per_group  # bounded, whatever the data
        kept[name] = (sum(g.sample.numel() for r in acts for g in r.groups), sum(g.count for r in acts for g in r.groups),
                      len(acts))
    # 6x the calibration data (3x samples, 2x steps): all of it is counted, what is kept stays under the same
    # bound (records x groups x per_group), independent of the calibration size
    assert kept["large"][1] == 6 * kept["small"][1]
    assert kept["large"][2] == kept["small"][2]
    assert kept["large"][0] <= kept["large"][2] * 2 * per_group


def test_statistics_reject_non_finite_activations(stages_unet2d) -> None:
    unet, sig = stages_unet2d.unet, stages_unet2d.sig
    calib = collect(unet, sig, 1, 2, 0, make_scheduler(), num_groups=1, holdout_samples=0, progress=False)
    calib.groups[0].batches[0].sample[0, 0, 0, 0] = float("nan")
    with pytest.raises(MsfpError, match="non-finite activation"):
        AnnotateSign(calib, 64)(stages_unet2d.fresh("capture"))
