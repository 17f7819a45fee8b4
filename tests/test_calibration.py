"""calibration: FP trajectories recorded along the sampler, grouped by timestep; text length of cross-attention UNets."""

from __future__ import annotations

from msfp_compiler.calibration import collect
from msfp_compiler.capture import capture, signature_of
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.sampling import make_scheduler
from tests.conftest import make_unet_cond


def test_sd_style_calibration_uses_77_tokens() -> None:
    unet = make_unet_cond()
    sig = signature_of(unet, cond_len=77)
    calib = collect(unet, sig, 2, 2, 0, make_scheduler(), num_groups=1, holdout_samples=0, progress=False)
    assert calib.batches[0].cond.shape == (2, 77, 16)
    gm, _ = capture(unet, sig)
    res = AnnotateSign(calib, 64)(gm)  # runs the captured graph on 77-token states
    assert res.info["calib_batches"] == 2


def test_compile_calibrates_with_the_configured_text_length() -> None:
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CalibConfig, CompileConfig

    calib = CalibConfig(num_samples=2, num_steps=2, num_groups=1, holdout_samples=1, text_len=7)
    cm = msfp_compile(make_unet_cond(), CompileConfig(calib=calib), progress=False)
    assert {b.cond.shape[1] for b in cm.calibration.batches + cm.calibration.holdout} == {7}
    assert cm.check().ok  # ORT vs the torch graph on the 7-token hold-out batch
