"""fuse_talora: the router becomes a t -> LoRA table (the scheduler's timestep count) and every LoRA layer one
msfp::select_weight node."""

from __future__ import annotations

import copy

import torch

from msfp_compiler.calibration import collect
from msfp_compiler.config import FinetuneConfig, QuantConfig
from msfp_compiler.distillation import finetune
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.passes.fuse_talora import TABLE_ATTR, FuseTALoRA, table_segments
from msfp_compiler.passes.insert_qdq import InsertQDQ
from msfp_compiler.passes.select_format import SelectFormat
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.talora import ROUTER_NAME, SELECT_WEIGHT, attach_talora, router_table

from ..conftest import quantize_tiny


def test_router_table_is_what_the_fused_graph_selects(tuned):
    gm, sig, res = tuned
    table = router_table(gm)
    assert table.shape == (1000,) and set(table.unique().tolist()) <= {0, 1}
    assert torch.equal(table, res.table)
    trained = copy.deepcopy(gm)
    fused = FuseTALoRA()(copy.deepcopy(gm)).graph_module
    assert not any(n.op == "call_module" for n in fused.graph.nodes)  # router and LoRA modules are gone
    # One select_weight node per LoRA layer, each choosing between K = 2 quantized weights by the table and t.
    loras = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("talora_")
             and n.target != ROUTER_NAME]
    selects = [n for n in fused.graph.nodes if n.op == "call_function" and n.target == SELECT_WEIGHT]
    assert len(selects) == len(loras) > 0
    assert all(s.args[0].target == TABLE_ATTR and s.args[1].op == "placeholder" and len(s.args[2]) == 2
               for s in selects)
    assert torch.equal(getattr(fused, TABLE_ATTR), table)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for lo, hi, k in table_segments(table):
        t = torch.full((2,), (lo + hi) // 2)
        ref = trained(x, t)
        assert torch.allclose(fused(x, t), ref, atol=1e-4, rtol=1e-4), f"segment {lo}..{hi} -> LoRA {k}"
    # Selection is live: forcing every timestep to the other LoRA changes the output.
    setattr(fused, TABLE_ATTR, 1 - table)
    t = torch.full((2,), 500)
    assert not torch.allclose(fused(x, t), trained(x, t), atol=1e-6)


def test_weight_sets_no_timestep_selects_are_dropped(tuned):
    """A router that picks one LoRA for every timestep leaves plain quantized layers: no table, no select_weight."""
    gm, _, _ = tuned
    k = int(router_table(gm)[500])
    forced = copy.deepcopy(gm)
    forced.get_submodule(ROUTER_NAME).choose = lambda t: torch.full_like(t, k)
    res = FuseTALoRA()(forced)
    fused = res.graph_module
    assert res.info["num_loras"] == 2 and res.info["kept_loras"] == 1 and res.info["segments"] == 1
    assert res.info["table"].endswith(f":{k}")  # numbered as in training
    assert any("dropped LoRA" in line for line in res.report)
    assert TABLE_ATTR not in dict(fused.named_buffers())
    assert not any(n.op == "call_function" and n.target == SELECT_WEIGHT for n in fused.graph.nodes)
    assert sum("_lora" in name for name, _ in fused.named_buffers()) == res.info["talora_layers"]  # one set a layer
    both = FuseTALoRA()(copy.deepcopy(gm)).graph_module  # keeps both sets, told to select LoRA k everywhere
    setattr(both, TABLE_ATTR, torch.full_like(getattr(both, TABLE_ATTR), k))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    for t in (0, 500, 999):
        tt = torch.full((2,), t)
        # the same weights; only the kernels may sum in another order (a selected weight)
        torch.testing.assert_close(fused(x, tt), both(x, tt), rtol=1e-5, atol=1e-5)


def test_plain_lora_has_no_router(stages_unet2d):
    gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"))
    names = attach_talora(gm, FinetuneConfig(num_loras=1, rank=2))
    assert names and not hasattr(gm, ROUTER_NAME)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    before = gm(x, t)
    fused = FuseTALoRA()(gm).graph_module
    assert TABLE_ATTR not in dict(fused.named_buffers())
    assert torch.allclose(fused(x, t), before, atol=1e-6)  # B = 0 at init: merged weights equal W


def test_fuse_talora_table_covers_a_2000_step_scheduler(stages_unet2d):
    sched_cfg = {"num_train_timesteps": 2000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    unet, sig = stages_unet2d.unet, stages_unet2d.sig
    calib = collect(unet, sig, 2, 3, 0, make_scheduler("ddim", sched_cfg), num_groups=1, holdout_samples=0,
                    progress=False)
    gm = stages_unet2d.fresh("capture")  # the shared capture of the tiny UNet2DModel, not one of its own
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
