"""Distillation: the fine-tuning stage lowers the loss; compile with TALoRA gives an ONNX that agrees with torch."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from onnx import TensorProto

from msfp_compiler.compile import compile as msfp_compile
from msfp_compiler.config import CalibConfig, CompileConfig, FinetuneConfig
from msfp_compiler.ops import DEQUANTIZE_PACKED, QUANTIZE
from msfp_compiler.record import record_of
from msfp_compiler.talora import ROUTER_NAME, SELECT_WEIGHT

from .conftest import FAST_QUANT
from .conftest import make_unet_min


def test_finetune_lowers_distillation_loss(tuned):
    _, _, res = tuned
    assert len(res.losses) == 40
    assert res.final_loss < res.initial_loss


def test_talora_compile_onnx_agrees_with_torch(tmp_path):
    # the conftest's coarser search grid: this test is about the fused TALoRA weights, not the format search
    cfg = CompileConfig(quant=dataclasses.replace(FAST_QUANT, keep_8bit=()),
                        calib=CalibConfig(num_samples=2, num_steps=4, num_groups=2),
                        finetune=FinetuneConfig(steps=10, num_loras=2, rank=2, batch_size=4, samples=4,
                                                sampler_steps=8, checkpoint=str(tmp_path / "lora.safetensors")))
    cm = msfp_compile(make_unet_min(), cfg, log_dir=tmp_path / "logs", progress=False)
    runs = {r.name: r for r in cm.pass_runs}
    assert runs["fuse_talora"].info["num_loras"] == 2
    res = cm.check()
    assert res.ok, str(res)
    assert cm.onnx_op_counts["int8_weights"] > 0
    # Both LoRAs' weights are in the model: more int8 weights than PTQ would store (one per quantized layer), at most
    # K = 2 times as many (the exporter merges a LoRA pair whose merged weights quantize to identical codes). What PTQ
    # stores is read off the fused graph (every layer's weight set: a select_weight over K sets, or one packed
    # weight) instead of a second compile.
    packed = [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target == DEQUANTIZE_PACKED]
    selects = [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target == SELECT_WEIGHT]
    in_select = {w for n in selects for w in n.args[2]}
    layers = [list(n.args[2]) for n in selects] + [[w] for w in packed if w not in in_select]
    numel = lambda w: math.prod(w.args[3])  # noqa: E731  (dequantize_packed(codes, scale, fmt, shape))
    n_ptq, n_ta = len(layers), cm.onnx_op_counts["int8_weights"]
    assert selects and n_ptq < n_ta <= sum(len(ws) for ws in layers) <= 2 * n_ptq
    ptq_bytes = sum(numel(ws[0]) for ws in layers)  # int8: one byte a weight
    int8_bytes = sum(len(t.raw_data) for t in cm.onnx_model.graph.initializer if t.data_type == TensorProto.INT8)
    assert ptq_bytes < int8_bytes <= 2 * ptq_bytes
    assert (tmp_path / "lora.safetensors").is_file()
    assert "t " in (tmp_path / "logs" / "passes.log").read_text()  # the table is logged
    assert ROUTER_NAME not in dict(cm.graph_module.named_children())


def test_w8a8_talora_compiles_and_onnx_agrees_with_torch(tmp_path):
    """Every layer at 8 bits (--keep-8bit '*'): each weight gets its LoRAs (before, only 4-bit weights did and a W8A8
    graph could not be fine-tuned), the fused 8-bit weight sets are selected per timestep, and ORT matches torch."""
    cfg = CompileConfig(quant=dataclasses.replace(FAST_QUANT, keep_8bit=("*",)),
                        calib=CalibConfig(num_samples=2, num_steps=4, num_groups=2),
                        finetune=FinetuneConfig(steps=6, num_loras=2, rank=2, batch_size=4, samples=4, sampler_steps=8))
    cm = msfp_compile(make_unet_min(), cfg, progress=False)
    assert {s.bits for s in cm.layers} == {8}
    runs = {r.name: r for r in cm.pass_runs}
    fused = runs["fuse_talora"].info  # cm.layers lists each layer's fused weight sets, one per kept LoRA
    assert fused["talora_layers"] * fused["kept_loras"] == sum(s.role == "weight" for s in cm.layers)
    res = cm.check()
    assert res.ok, str(res)


def _reference_losses(gm, unet, sig, data, cfg, sched) -> list[float]:
    """The distillation loop written plainly, one host-side draw and one loss.item() a step (the loop before the
    static-buffer runner), on the same gammas, optimizer groups and cosine schedule."""
    from msfp_compiler.dfa import dfa_weights
    from msfp_compiler.distillation import _param_groups, _teacher_data
    from msfp_compiler.talora import attach_talora, warm_start_router

    attach_talora(gm, cfg)
    torch.manual_seed(cfg.seed)
    warm_start_router(gm.get_submodule(ROUTER_NAME), cfg.num_loras, sched.config.num_train_timesteps)
    gammas = dfa_weights(sched, cfg.sampler_steps, cfg.sampler)
    opt = torch.optim.Adam(_param_groups(gm, cfg))
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    items = _teacher_data(unet, sig, data.batches)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        b, y = items[int(torch.randint(len(items), (1,), generator=gen))]
        idx = torch.randperm(b.sample.shape[0], generator=gen)[: cfg.batch_size]
        loss = gammas.get(int(b.timestep[0]), 1.0) * (gm(*(a[idx] for a in b.args)) - y[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
    return losses


def _finetune_pair(stages_unet2d, cfg, device="cpu"):
    """(fast-loop result, reference losses) of the same quantized tiny UNet and data (two copies of the graph)."""
    import copy

    from msfp_compiler.calibration import collect
    from msfp_compiler.device import move_graph, move_tensors
    from msfp_compiler.distillation import finetune
    from msfp_compiler.sampling import make_scheduler

    from .conftest import quantize_tiny

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=3, groups=1, sample_per_group=128, gm=stages_unet2d.fresh("capture"))
    data = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    ref = copy.deepcopy(gm)
    unet = unet.to(device)
    try:
        gm, ref, data = move_graph(gm, device), move_graph(ref, device), move_tensors(data, torch.device(device))
        scales = {n.args[1].target for n in gm.graph.nodes if n.target == QUANTIZE and record_of(n.args[0])
                  and record_of(n.args[0]).role == "act" and n.args[1].op == "get_attr"}
        before = {n: v.clone() for n, v in gm.named_buffers() if n in scales}
        res = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
        return res, _reference_losses(ref, unet, sig, data, cfg, make_scheduler("ddim")), gm, before
    finally:
        unet.to("cpu")


@pytest.mark.parametrize("learn_act_scales", [False, True])
def test_finetune_loop_matches_the_plain_loop(stages_unet2d, learn_act_scales):
    # batches drawn up front, a static-buffer step, losses kept on the device: the same training as the plain loop
    cfg = FinetuneConfig(steps=6, num_loras=2, rank=2, batch_size=3, lr=5e-3, samples=4, sampler_steps=8,
                         log_every=4, learn_act_scales=learn_act_scales, act_scale_lr_factor=1.0)
    res, ref, gm, before = _finetune_pair(stages_unet2d, cfg)
    assert not res.cuda_graph
    assert res.losses == ref  # bit-identical on the CPU
    assert [s for s, _ in res.curve] == [4, 6]
    assert math.isclose(res.curve[0][1], sum(ref[:4]) / 4, rel_tol=1e-6)
    # learned activation scales moved, stay positive and are buffers again (what the lowering reads)
    after = dict(gm.named_buffers())
    moved = [n for n, v in before.items() if not torch.equal(after[n], v)]
    assert all(n not in dict(gm.named_parameters()) and after[n].min() > 0 for n in before)
    assert bool(moved) == learn_act_scales


def test_finetune_cuda_graph_matches_eager(stages_unet2d):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    import msfp_compiler.export.triton.runtime  # noqa: F401  (the Triton msfp ops on CUDA, as tools/eval_mnist.py)

    cfg = FinetuneConfig(steps=10, num_loras=2, rank=2, batch_size=3, lr=1e-3, samples=4, sampler_steps=8,
                         learn_act_scales=True)
    res, ref, _, _ = _finetune_pair(stages_unet2d, cfg, "cuda")
    assert res.cuda_graph
    # The captured Adam (capturable, tensor lr) rounds differently from the eager one; after a few steps a
    # quantizer input can cross a rounding boundary and the runs part (seen on an H200 at lr 5e-3: equal to 4
    # digits for 9 steps, then 10% apart), so the replayed steps are compared while they must still agree.
    assert torch.allclose(torch.tensor(res.losses[:8]), torch.tensor(ref[:8]), rtol=1e-3, atol=1e-7)


def test_finetune_holdout_loss_is_measured_without_touching_training(stages_unet2d):
    # held-out trajectories are drawn after the training ones: the same training, plus a loss on unseen inputs
    from msfp_compiler.calibration import collect
    from msfp_compiler.dfa import dfa_weights
    from msfp_compiler.distillation import _eval_loss, _teacher_data, finetune
    from msfp_compiler.sampling import make_scheduler

    from .conftest import clone_gm, quantize_tiny

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=3, groups=1, sample_per_group=128, gm=stages_unet2d.fresh("capture"))
    again = clone_gm(gm)
    cfg = FinetuneConfig(steps=8, num_loras=2, rank=2, batch_size=3, lr=5e-3, samples=4, sampler_steps=8)
    plain = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    held = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=3, progress=False)
    # with a seed of their own the held-out trajectories do not depend on how many are trained on
    more = collect(unet, sig, 6, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=3, holdout_seed=9,
                   progress=False)
    fewer = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=3, holdout_seed=9,
                    progress=False)
    assert all(torch.equal(a.sample, b.sample) for a, b in zip(more.holdout, fewer.holdout))
    assert not torch.equal(held.holdout[0].sample, fewer.holdout[0].sample)  # without it they follow the training draws
    r0 = finetune(gm, unet, sig, plain, cfg, make_scheduler("ddim"), progress=False)
    cfg3 = dataclasses.replace(cfg, holdout_samples=3)
    r3 = finetune(again, unet, sig, held, cfg3, make_scheduler("ddim"), progress=False)
    assert r3.losses == r0.losses and r0.holdout_final_loss is None
    # the held-out loss is the probe's DFA-weighted loss on the unseen trajectories (8 steps: every one)
    gammas = dfa_weights(make_scheduler("ddim"), 8, "ddim")
    expect = _eval_loss(again, _teacher_data(unet, sig, held.holdout), gammas)
    assert math.isclose(r3.holdout_final_loss, expect, rel_tol=1e-6)
    assert r3.holdout_final_loss != r3.holdout_initial_loss > 0
    info = r3.log_info(cfg3)
    assert info["holdout_samples"] == 3 and info["holdout_final_loss"] == round(r3.holdout_final_loss, 6)
    assert any(line.startswith("held-out trajectories") for line in r3.log_report())


def test_kept_teacher_outputs_are_the_teachers_and_train_the_same(stages_unet2d):
    # collect(keep_outputs=True) keeps each step's FP prediction: distillation then skips its second teacher pass
    from msfp_compiler.calibration import collect
    from msfp_compiler.capture import UNetWrapper
    from msfp_compiler.distillation import _teacher_data, finetune
    from msfp_compiler.sampling import make_scheduler

    from .conftest import clone_gm, quantize_tiny

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=3, groups=1, sample_per_group=128, gm=stages_unet2d.fresh("capture"))
    again = clone_gm(gm)
    kept = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=2, progress=False,
                   keep_outputs=True)
    plain = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=2, progress=False)
    teacher = UNetWrapper(unet, sig).eval()
    with torch.no_grad():
        for b in kept.batches + kept.holdout:
            assert torch.equal(b.output, teacher(*b.args))  # also: the sampler did not modify it after the step
    assert all(b.output is None for b in plain.batches + plain.holdout)

    class Boom(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran although its outputs were kept")

    pairs = _teacher_data(Boom(), sig, kept.batches)  # no second teacher pass
    assert all(y is b.output for b, y in pairs)
    cfg = FinetuneConfig(steps=6, num_loras=2, rank=2, batch_size=3, lr=5e-3, samples=4, sampler_steps=8,
                         holdout_samples=2)
    r_kept = finetune(gm, unet, sig, kept, cfg, make_scheduler("ddim"), progress=False)
    r_plain = finetune(again, unet, sig, plain, cfg, make_scheduler("ddim"), progress=False)
    assert r_kept.losses == r_plain.losses and r_kept.holdout_final_loss == r_plain.holdout_final_loss


def test_student_trajectories_start_at_the_fp_noise_and_drift(stages_unet2d):
    # trajectories="student": the quantized graph samples from the FP trajectories' noise; the FP model labels it
    from msfp_compiler.calibration import collect
    from msfp_compiler.distillation import _student_batches, finetune
    from msfp_compiler.sampling import make_scheduler

    from .conftest import clone_gm, quantize_tiny

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=3, groups=1, sample_per_group=128, gm=stages_unet2d.fresh("capture"))
    again, third = clone_gm(gm), clone_gm(gm)
    data = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=2, progress=False)
    cfg = FinetuneConfig(steps=6, num_loras=2, rank=2, batch_size=3, lr=5e-3, samples=4, sampler_steps=8,
                         trajectories="student", holdout_samples=2)
    own = _student_batches(gm, data, make_scheduler("ddim"), cfg)
    assert [int(b.timestep[0]) for b in own] == [int(b.timestep[0]) for b in data.batches]
    assert torch.equal(own[0].sample, data.batches[0].sample)  # the same starting noise
    drift = (own[-1].sample - data.batches[-1].sample).abs().max()
    assert drift > 1e-3  # the 4-bit graph's own path has left the FP one by the last step
    r_own = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
    r_fp = finetune(again, unet, sig, data, dataclasses.replace(cfg, trajectories="fp"), make_scheduler("ddim"),
                    progress=False)
    assert r_own.initial_loss != r_fp.initial_loss  # a different training probe: the student's inputs
    assert r_own.holdout_initial_loss == r_fp.holdout_initial_loss  # the same held-out FP trajectories
    assert r_own.log_info(cfg)["trajectories"] == "student" and math.isfinite(r_own.final_loss)
    # mixed trains on both sets and probes the FP part: the same probe as the fp run before training
    r_mix = finetune(third, unet, sig, data, dataclasses.replace(cfg, trajectories="mixed"), make_scheduler("ddim"),
                     progress=False)
    assert r_mix.initial_loss == r_fp.initial_loss and r_mix.losses != r_fp.losses


@pytest.mark.parametrize("params,steps,size,expect", [
    (1.5e6, 20, 32, 256),  # the digit models: capped
    (6.09e6, 50, 32, 256),  # mnist-uncond: just inside the budget
    (36e6, 50, 32, 44),  # a CIFAR-10-size DDPM: scaled
    (860e6, 50, 64, 32),  # SD1.5 (64x64 latents): the floor
    (1.5e6, 50, 64, 256),  # a small model at 64x64: still inside the budget
    (5e6, 50, 256, 32),  # a small model at 256x256: the one-batch trajectories' memory, the floor
])
def test_default_finetune_samples_scale_with_the_model(params, steps, size, expect):
    from msfp_compiler.distillation import FINETUNE_BUDGET, default_finetune_samples

    n, rule = default_finetune_samples(int(params), steps, size)
    assert n == expect
    assert f"{steps} steps" in rule and f"{size}x{size}" in rule and f"{FINETUNE_BUDGET:.2g}" in rule


def test_finetune_time_budget_shortens_the_schedule(stages_unet2d):
    # a budget already spent at the first fit: the schedule ends at that fit (25 steps) instead of 200
    from msfp_compiler.calibration import collect
    from msfp_compiler.distillation import finetune
    from msfp_compiler.sampling import make_scheduler

    from .conftest import clone_gm, quantize_tiny

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=3, groups=1, sample_per_group=128, gm=stages_unet2d.fresh("capture"))
    again = clone_gm(gm)  # the same quantized graph for the second run (finetune rewrites gm)
    data = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    cfg = FinetuneConfig(steps=200, num_loras=1, rank=2, batch_size=2, samples=4, sampler_steps=8, log_every=10,
                         time_budget_s=1e-6)
    res = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
    assert res.steps == 26 and len(res.losses) == 26 and res.curve[-1][0] == 26
    assert res.log_info(cfg)["max_steps"] == 200
    # a budget that fits every step: the schedule keeps its length, also at a fit on the last step
    cfg = dataclasses.replace(cfg, steps=50, time_budget_s=1e6)
    res = finetune(again, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
    assert res.steps == 50 and len(res.losses) == 50
