"""fuse_talora uses the scheduler's number of training timesteps (the count the router was trained on)."""

from __future__ import annotations

import copy

import torch

from msfp_compiler.calibration import collect
from msfp_compiler.capture import capture, signature_of
from msfp_compiler.config import FinetuneConfig, QuantConfig
from msfp_compiler.distillation import finetune
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.talora import router_table
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.passes.fuse_talora import TABLE_ATTR, FuseTALoRA, table_segments
from msfp_compiler.passes.insert_qdq import InsertQDQ
from msfp_compiler.passes.select_format import SelectFormat

from ..conftest import make_unet_min


def test_fuse_talora_table_covers_a_2000_step_scheduler():
    sched_cfg = {"num_train_timesteps": 2000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    unet = make_unet_min()
    sig = signature_of(unet)
    calib = collect(unet, sig, 2, 3, 0, make_scheduler("ddim", sched_cfg), num_groups=1, holdout_samples=0,
                    progress=False)
    gm, _ = capture(unet, sig)
    for p in (AnnotateSign(calib, 128), SelectFormat(QuantConfig(keep_8bit=(), clip_ratios=8, zero_points=4)),
              InsertQDQ()):
        gm = p(gm).graph_module
    data = collect(unet, sig, 2, 4, 1, make_scheduler("ddim", sched_cfg), num_groups=1, holdout_samples=0,
                   progress=False)
    cfg = FinetuneConfig(steps=3, num_loras=2, rank=2, batch_size=2, samples=2, sampler_steps=4, log_every=0)
    res = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim", sched_cfg), progress=False)
    assert res.table.shape == (2000,) and torch.equal(res.table, router_table(gm, 2000))
    assert torch.equal(router_table(gm), res.table)  # the router knows the count it was trained on
    # the router was warm-started on the 2000-step schedule: both halves have their own LoRA
    assert res.table[100] != res.table[1900]
    trained = copy.deepcopy(gm)
    fused = FuseTALoRA()(copy.deepcopy(gm)).graph_module
    assert getattr(fused, TABLE_ATTR).shape == (2000,)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for lo, hi, _ in table_segments(res.table):
        t = torch.full((2,), hi)  # t >= 1000 indexed past the end of the old 1000-entry table
        assert torch.allclose(fused(x, t), trained(x, t), atol=1e-5, rtol=1e-5), (lo, hi)
