"""select_format: the mixup-sign search against the baselines (issue 3 acceptance), 8-bit layers, rules, logs."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from msfp_compiler.config import SCHEMES, QuantConfig
from msfp_compiler.errors import MsfpError
from msfp_compiler.formats import parse_format
from msfp_compiler.names import layer_names
from msfp_compiler.passes.select_format import SelectFormat, get_weight, high_precision_layers
from msfp_compiler.record import QuantChoice, records
from msfp_compiler.search import quant_mse_direct

# float32 rounding in the MSE of equivalent grids (e.g. E1M2 and INT4 are the same uniform grid up to scale)
RTOL = 1e-5


@pytest.fixture(scope="module")
def selected(stages_unet2d) -> fx.GraphModule:
    return stages_unet2d.after["select_format"]  # default QuantConfig: scheme msfp


@pytest.fixture(scope="module")
def scheme_choices(stages_unet2d) -> dict[str, dict[str, tuple[str, bool, int, QuantChoice]]]:
    """Every scheme's choice on the same annotated records: scheme -> node -> (role, after_silu, bits, choice)."""
    out = {}
    for scheme in SCHEMES:
        if scheme == stages_unet2d.config.quant.scheme:
            gm = stages_unet2d.after["select_format"]
        else:
            gm = stages_unet2d.fresh("annotate_sign")
            SelectFormat(QuantConfig(scheme=scheme))(gm)
        out[scheme] = {n.name: (r.role, r.after_silu, r.bits, r.choice) for n, r in records(gm)}
    return out


def _compare(scheme_choices, baseline: str, role: str) -> list[str]:
    msfp, base = scheme_choices["msfp"], scheme_choices[baseline]
    assert msfp.keys() == base.keys()
    worse = []
    for name, (r, _, bits, c) in msfp.items():
        if r != role:
            continue
        b = base[name][3]
        assert c.mse == c.mse and b.mse == b.mse  # not NaN
        if c.mse > b.mse * (1 + RTOL) + 1e-12:
            worse.append(f"{name}: msfp {c.fmt} {c.mse:.3g} > {baseline} {b.fmt} {b.mse:.3g}")
    assert sum(1 for r, *_ in msfp.values() if r == role) > 0
    return worse


@pytest.mark.parametrize("role", ["act", "weight"])
def test_msfp_mse_le_fp4_signed_every_layer(scheme_choices, role: str) -> None:
    worse = _compare(scheme_choices, "fp4-signed", role)
    assert not worse, "\n".join(worse)


def test_msfp_mse_le_int4_every_weight(scheme_choices) -> None:
    worse = _compare(scheme_choices, "int4", "weight")
    assert not worse, "\n".join(worse)


@pytest.mark.xfail(strict=True, reason=(
    "issue 3 acceptance not met: the int4 scheme's asymmetric UINT4 (16 uniform levels + zero point) has lower MSE "
    "than every MSFP candidate on 34 of the 53 4-bit activations of the tiny UNet2DModel (e.g. the time-embedding "
    "SiLU: ue2m2 7.0e-05 vs uint4 4.3e-05; attention operands); MSFP neither includes uint4 nor beats it"))
def test_msfp_mse_le_int4_every_activation(scheme_choices) -> None:
    worse = _compare(scheme_choices, "int4", "act")
    assert not worse, f"{len(worse)} activations where int4 wins:\n" + "\n".join(worse)


def test_msfp_with_ue1m3_le_int4_every_activation(stages_unet2d, scheme_choices) -> None:
    # The opt-in answer to the xfail above: unsigned E1M3 is the UINT4 grid up to scale (one exponent bit makes the
    # grid uniform, as signed E1M2 is INT4's), so with it among the candidates MSFP matches or beats INT4 everywhere.
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(act_formats=("e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0")))(gm)
    extended = dict(scheme_choices, msfp={n.name: (r.role, r.after_silu, r.bits, r.choice) for n, r in records(gm)})
    worse = _compare(extended, "int4", "act")
    assert not worse, "\n".join(worse)
    picked = {c.fmt for role, _, bits, c in extended["msfp"].values() if role == "act" and bits == 4}
    assert "ue1m3" in picked and picked - {"ue1m3"}, picked  # used where uint4 won, FP grids elsewhere


def test_unsigned_chosen_for_some_after_silu_inputs(scheme_choices) -> None:
    msfp = scheme_choices["msfp"]
    acts4 = [(name, silu, c) for name, (role, silu, bits, c) in msfp.items() if role == "act" and bits == 4]
    unsigned_silu = [name for name, silu, c in acts4 if silu and not c.signed]
    assert unsigned_silu, "no after-SiLU input became unsigned"
    assert any(c.signed for _, _, c in acts4), "expected signed FP4 elsewhere (e.g. attention operands)"
    for name, silu, c in acts4:
        if not c.signed:
            assert c.fmt in ("ue2m2", "ue3m1", "ue4m0")
            assert float(c.zero_point) < 0  # the clip at the negative end (SiLU min about -0.278)
        else:
            assert float(c.zero_point) == 0.0


def test_choice_is_the_min_of_logged_candidates(selected) -> None:
    cfg = QuantConfig()
    for n, r in records(selected):
        c = r.choice
        if r.bits == 8:
            assert c.fmt in ("int8", "uint8")
            continue
        want = cfg.act_candidates if r.role == "act" else cfg.weight_candidates
        assert tuple(c.candidates_mse) == want
        assert c.mse == min(c.candidates_mse.values()) == c.candidates_mse[c.fmt]


def test_logged_mse_is_the_real_quantization_error(selected) -> None:
    for n, r in records(selected):
        c = r.choice
        f = parse_format(c.fmt)
        if r.role == "act":
            x = r.calibration_sample().reshape(1, -1)
            mse = float(quant_mse_direct(f, x, c.scale.reshape(1, 1), c.zero_point.reshape(1, 1))[0, 0])
        else:
            w = get_weight(selected, n)
            mse = float((f.quantize(w, c.scale, c.zero_point) - w).pow(2).mean())
        assert mse == pytest.approx(c.mse, rel=1e-4, abs=1e-12), n.name


def test_weights_signed_per_output_channel(selected) -> None:
    for n, r in records(selected):
        if r.role != "weight":
            continue
        w = get_weight(selected, n)
        c = r.choice
        assert c.signed
        assert c.scale.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
        assert torch.all(c.zero_point == 0) and torch.all(c.scale > 0)


def test_keep_8bit_first_and_last_conv(selected, stages_unet2d) -> None:
    g = selected.graph
    convs = [n for n in g.nodes if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default]
    first, last = convs[0], convs[-1]
    assert first.args[0].op == "placeholder"  # conv_in reads the sample
    out = next(n for n in g.nodes if n.op == "output")
    assert last in out.all_input_nodes or any(last in u.all_input_nodes for u in out.all_input_nodes)
    assert high_precision_layers(selected, ("first", "last")) == {first.name, last.name}
    eight = {n.name for n, r in records(selected) if r.bits == 8}
    expected = {first.args[0].name, first.args[1].name, last.args[0].name, last.args[1].name}
    assert eight == expected
    for n, r in records(selected):
        if n.name in expected:
            assert r.choice.fmt == ("int8" if r.role == "weight" else "uint8")
    info = stages_unet2d.results["select_format"].info
    assert info["high_precision_layers"] == ["conv_in", "conv_out"]  # module paths, not fx names
    assert info["act_8bit"] == 2


def test_keep_8bit_last_block(selected, stages_unet2d) -> None:
    """'last_block' keeps every layer of the last up block at 8 bits and only them: the same layers as its block path
    and as the pattern the MNIST variant runs used ('up_blocks.N.*')."""
    last = f"up_blocks.{len(stages_unet2d.unet.up_blocks) - 1}"
    paths = layer_names(selected)
    kept = high_precision_layers(selected, ("last_block",))
    assert kept == {n for n, p in paths.items() if p.startswith(last + ".")} and kept
    assert kept == high_precision_layers(selected, (last,)) == high_precision_layers(selected, (last + ".*",))
    # with first / last: conv_in sits before the block, conv_out after it
    both = high_precision_layers(selected, ("first", "last", "last_block"))
    assert both == kept | high_precision_layers(selected, ("first", "last"))
    assert len(both) == len(kept) + 2


def _hook_shares(unet: torch.nn.Module, args: tuple, kept: set[str]) -> tuple[float, float]:
    """(weight share, MAC share) of the layers at module paths ``kept``, counted by forward hooks on the modules
    (one entry per call), attention from its q / k projections' outputs: independent of select_format's graph count."""
    calls: list[tuple[str, int, int]] = []  # (module path, weight elements, MACs per sample)
    seq: dict[str, int] = {}

    def hook(path):
        def f(m, inputs, out):
            calls.append((path, m.weight.numel(), out[0].numel() * m.weight[0].numel()))
            if path.endswith((".to_q", ".to_k")):
                seq[path[-1]] = out.shape[1]
            if path.endswith(".to_k"):  # q and k are both known now: Q K^T and P V
                calls.append((path[:-5], 0, 2 * seq["q"] * seq["k"] * m.out_features))
        return f

    handles = [m.register_forward_hook(hook(p)) for p, m in unet.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        unet(*args)
    for h in handles:
        h.remove()
    w = sum(c[1] for c in calls if c[0] in kept) / sum(c[1] for c in calls)
    return w, sum(c[2] for c in calls if c[0] in kept) / sum(c[2] for c in calls)


@pytest.mark.parametrize("model", ["unet2d", "cond"])
def test_high_precision_shares_match_module_hooks(model, request) -> None:
    """select_format's weight and MAC shares of the 8-bit layers (first, last) equal the same counts taken by
    module hooks; with cross-attention too, whose text length is symbolic in the exported graph."""
    if model == "unet2d":
        st = request.getfixturevalue("stages_unet2d")
        unet, info = st.unet, st.results["select_format"].info
        args: tuple = (torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([10]))
    else:
        cm = request.getfixturevalue("compiled_cond")
        unet = request.getfixturevalue("unet_cond")
        info = next(r.info for r in cm.pass_runs if r.name == "select_format")
        text = torch.randn(1, cm.calibration.batches[0].args[2].shape[1], unet.config.cross_attention_dim)
        args = (torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([10]), text)
    w_share, m_share = _hook_shares(unet, args, {"conv_in", "conv_out"})
    assert info["high_precision_layers"] == ["conv_in", "conv_out"]
    assert 0 < w_share < 0.1 and 0 < m_share < 0.1
    assert info["high_precision_weight_share"] == pytest.approx(w_share, abs=6e-5)
    assert info["high_precision_mac_share"] == pytest.approx(m_share, abs=6e-5)


FAST = dict(act_formats=("e2m1", "ue2m2"), weight_formats=("e2m1",), clip_ratios=8, zero_points=4,
            sample_per_group=256)


def test_keep_8bit_none_and_by_name(stages_unet2d) -> None:
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(keep_8bit=(), **FAST))(gm)
    assert all(r.bits == 4 for _, r in records(gm))
    linear = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(keep_8bit=(linear.name,), **FAST))(gm)
    eight = {n.name for n, r in records(gm) if r.bits == 8}
    assert eight == {linear.args[0].name, linear.args[1].name}
    # the same layer by its module path, and a block path keeps every layer under it
    path = linear.meta["nn_module_stack"][next(reversed(linear.meta["nn_module_stack"]))][0].removeprefix("unet.")
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(keep_8bit=(path,), **FAST))(gm)
    assert {n.name for n, r in records(gm) if r.bits == 8} == eight
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(keep_8bit=("mid_block",), **FAST))(gm)
    layers = layer_names(gm)
    mid = {n.name for n, r in records(gm) if any(layers[c].startswith("mid_block.") for c in r.consumers)}
    assert mid and {n.name for n, r in records(gm) if r.bits == 8} == mid
    # an fnmatch pattern over module paths: every layer it matches, nothing else
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(keep_8bit=("*.resnets.0.conv_shortcut",), **FAST))(gm)
    layers = layer_names(gm)
    short = {n.name for n, r in records(gm) if any(layers.get(c, "").endswith(".resnets.0.conv_shortcut")
                                                   for c in r.consumers)}
    assert short and {n.name for n, r in records(gm) if r.bits == 8} == short


def test_keep_8bit_unknown_name_suggests_the_closest(stages_unet2d) -> None:
    from msfp_compiler.errors import MsfpError

    gm = stages_unet2d.fresh("annotate_sign")
    with pytest.raises(MsfpError, match=r"keep_8bit: unknown layer 'mid_block.resnet.0.conv1' \(did you mean "
                                        r"mid_block.resnets.0.conv1"):
        SelectFormat(QuantConfig(keep_8bit=("first", "mid_block.resnet.0.conv1"), **FAST))(gm)
    with pytest.raises(MsfpError, match=r"keep_8bit: unknown layer '\*\.nope'"):
        SelectFormat(QuantConfig(keep_8bit=("*.conv_shortcut", "*.nope"), **FAST))(gm)


def test_stats_sign_rule_limits_unsigned(stages_unet2d) -> None:
    gm = stages_unet2d.fresh("annotate_sign")
    ratio = 0.5
    SelectFormat(QuantConfig(sign_rule="stats", unsigned_max_neg_ratio=ratio, keep_8bit=(), **FAST))(gm)
    n_unsigned = 0
    for n, r in records(gm):
        if r.role != "act":
            continue
        allowed = r.min >= 0 or -r.min <= ratio * r.max
        if not allowed:
            assert r.choice.signed and "ue2m2" not in r.choice.candidates_mse, n.name
        n_unsigned += not r.choice.signed
    assert n_unsigned > 0


def test_per_tensor_granularity(stages_unet2d) -> None:
    gm = stages_unet2d.fresh("annotate_sign")
    SelectFormat(QuantConfig(weight_granularity="tensor", **FAST))(gm)
    for _, r in records(gm):
        if r.role == "weight":
            assert r.choice.scale.numel() == 1


def test_report_logs_format_scale_zero_point_candidates_and_neg_fraction(stages_unet2d, selected) -> None:
    res = stages_unet2d.results["select_format"]
    recs = records(selected)
    assert len(res.report) == len(recs)
    from msfp_compiler.names import tensor_names

    names = tensor_names(selected)
    for line, (n, r) in zip(res.report, recs):
        assert line.startswith(names[n.name] + " ") and r.choice.fmt in line  # module path, not the fx name
        if r.role == "act":
            assert "scale" in line and "zp" in line and "neg" in line
            assert all(f"{c}=" in line for c in r.choice.candidates_mse)
    info = res.info
    acts = [r for _, r in recs if r.role == "act"]
    assert info["act_signed"] + info["act_unsigned"] + info["act_8bit"] == len(acts)
    assert info["act_unsigned"] == sum(1 for r in acts if r.bits == 4 and not r.choice.signed)
    assert sum(info["formats"].values()) == len(recs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="int5"), r"QuantConfig\.scheme"),
    (dict(act_formats=("e2m1", "e9z9")), r"QuantConfig\.act_formats: .*e9z9"),
    (dict(act_formats=("e4m3",)), r"QuantConfig\.act_formats: 'e4m3' is a 8-bit format"),
    (dict(weight_formats=("e2m1", "int8")), r"QuantConfig\.weight_formats: 'int8' is a 8-bit format"),
    (dict(weight_formats=("ue2m2",)), "must be signed"),
    (dict(weight_granularity="row"), r"QuantConfig\.weight_granularity"),
    (dict(sign_rule="maybe"), r"QuantConfig\.sign_rule"),
])
def test_config_errors(kwargs, match: str) -> None:
    with pytest.raises(MsfpError, match=match):
        QuantConfig(**kwargs)
