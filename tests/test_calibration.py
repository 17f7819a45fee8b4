"""calibration: FP trajectories recorded along the sampler, grouped by timestep; text length of cross-attention UNets."""

from __future__ import annotations

import pytest

from msfp_compiler.calibration import CALIB_BUDGET, collect, default_calibration
from msfp_compiler.capture import signature_of
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.sampling import make_scheduler


def test_sd_style_calibration_uses_77_tokens(captured_cond) -> None:
    unet = captured_cond.unet
    sig = signature_of(unet, cond_len=77)
    calib = collect(unet, sig, 2, 2, 0, make_scheduler(), num_groups=1, holdout_samples=0, progress=False)
    assert calib.batches[0].cond.shape == (2, 77, 16)
    res = AnnotateSign(calib, 64)(captured_cond.fresh())  # runs the captured graph on 77-token states
    assert res.info["calib_batches"] == 2


def test_compile_calibrates_with_the_configured_text_length(compiled_text7) -> None:
    cm = compiled_text7  # CalibConfig(text_len=7) on the smallest cross-attention UNet
    assert {b.cond.shape[1] for b in cm.calibration.batches + cm.calibration.holdout} == {7}
    assert cm.check().ok  # ORT vs the torch graph on the 7-token hold-out batch


@pytest.mark.parametrize("params", [1_100_000, 35_700_000, 150_000_000])
def test_small_models_get_the_full_default(params: int) -> None:
    samples, steps, groups, rule = default_calibration(params)
    assert (samples, steps, groups) == (8, 10, 4) and "default" in rule


@pytest.mark.parametrize("params", [300_000_000, 859_520_964, 2_600_000_000])
def test_large_models_stay_within_the_budget(params: int) -> None:
    samples, steps, groups, rule = default_calibration(params)
    assert samples >= 2 and steps >= groups == 4
    assert samples * steps * params <= CALIB_BUDGET or (samples, steps) == (2, 4)  # the floor: 2 samples x groups
    assert "scaled to the model" in rule and f"{params / 1e6:.0f}M parameters" in rule


def test_sd15_size() -> None:
    assert default_calibration(859_520_964)[:3] == (2, 6, 4)


def test_given_values_are_kept() -> None:
    assert default_calibration(859_520_964, samples=8, steps=10)[:3] == (8, 10, 4)
    s, st, g, rule = default_calibration(859_520_964, samples=4)
    assert s == 4 and st == 4 and "steps scaled" in rule  # 3 steps would fit; never fewer steps than groups
    assert default_calibration(1_000_000, steps=2)[2] == 2  # groups never exceed steps


def test_statistics_from_the_calibration_forwards_equal_a_separate_pass(stages_unet2d) -> None:
    """collect(graph=gm) runs the trajectories through the captured graph and streams the statistics on the way; they
    must equal what a forward of their own over the recorded inputs gives (activation_stats), and the recorded inputs
    must equal the eager calibration's."""
    import torch

    from msfp_compiler.calibration import activation_stats, stats_nodes

    unet, sig, gm = stages_unet2d.unet, stages_unet2d.sig, stages_unet2d.fresh("capture")  # capture(make_unet2d())
    args = dict(num_samples=2, num_steps=5, seed=3, num_groups=2, holdout_samples=1, progress=False)
    eager = collect(unet, sig, scheduler=make_scheduler(), **args)
    fused = collect(unet, sig, scheduler=make_scheduler(), graph=gm, sample_per_group=100, stats_seed=9, **args)
    assert eager.stats is None and fused.stats is not None
    for a, b in zip(eager.batches + eager.holdout, fused.batches + fused.holdout):
        assert torch.equal(a.sample, b.sample) and torch.equal(a.timestep, b.timestep)
    assert [(g.t_lo, g.t_hi, len(g.batches)) for g in fused.groups] == [(g.t_lo, g.t_hi, len(g.batches))
                                                                        for g in eager.groups]
    separate = activation_stats(gm, eager, sample_per_group=100, seed=9, progress=False)
    assert set(fused.stats.groups) == set(separate.groups) == {n.name for n in stats_nodes(gm)}
    for name, groups in separate.groups.items():
        assert len(groups) == 2
        for x, y in zip(groups, fused.stats.groups[name]):
            assert (x.t_lo, x.t_hi, x.count, x.min, x.max, x.negatives) == (y.t_lo, y.t_hi, y.count, y.min, y.max,
                                                                            y.negatives)
            assert torch.equal(x.sample, y.sample)
    # annotate_sign takes them as they are (no forward), or computes them when the subsample size differs
    assert AnnotateSign(fused, 100, 9)(stages_unet2d.fresh("capture")).info["statistics"] == \
        "from the calibration forwards"
    assert AnnotateSign(fused, 64, 9)(stages_unet2d.fresh("capture")).info["statistics"] == \
        "one forward per calibration batch"


def _assert_statistics_from_the_calibration_forwards(cm) -> None:
    info = {r.name: r.info for r in cm.pass_runs}["annotate_sign"]
    assert info["statistics"] == "from the calibration forwards"
    assert len(cm.calibration.stats.groups) == info["activations"]


def test_compile_takes_the_statistics_from_the_calibration_forwards(compiled_unet2d) -> None:
    """compile() calibrates through the captured graph, watching exactly the operands annotate_sign records, so
    annotate_sign runs no forward of its own (the shared compiled UNet2DModel, attention operands quantized)."""
    _assert_statistics_from_the_calibration_forwards(compiled_unet2d)


def test_compile_takes_the_statistics_from_the_calibration_forwards_without_attention() -> None:
    """The same with QuantConfig.quantize_attention=False: the forwards watch the operands without q, k, v."""
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CalibConfig, CompileConfig, QuantConfig
    from tests.conftest import make_unet2d

    cfg = CompileConfig(quant=QuantConfig(quantize_attention=False, clip_ratios=8, zero_points=4),
                        calib=CalibConfig(num_samples=1, num_steps=2, num_groups=2, holdout_samples=0))
    _assert_statistics_from_the_calibration_forwards(msfp_compile(make_unet2d(), cfg, progress=False, lower=False))
