"""TALoRA + DFA fine-tuning: gamma_t, the router, distillation, and the fused graph / ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from msfp_compiler.calibration import collect
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.capture import capture, signature_of
from msfp_compiler.compile import compile as msfp_compile
from msfp_compiler.config import CalibConfig, CompileConfig, FinetuneConfig, QuantConfig
from msfp_compiler.dfa import dfa_weights
from msfp_compiler.distillation import finetune
from msfp_compiler.talora import ROUTER_NAME, TimestepRouter, attach_talora, router_table
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.passes.fuse_talora import TABLE_ATTR, FuseTALoRA, table_segments
from msfp_compiler.passes.insert_qdq import InsertQDQ
from msfp_compiler.passes.select_format import SelectFormat


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.mark.parametrize("steps", [10, 25])
def test_dfa_gamma_is_ddim_eps_coefficient(steps):
    """gamma_t is |d x_prev / d eps| of the DDIM update (measured by stepping the scheduler), mean-normalized."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    gam = dfa_weights(copy.deepcopy(sched), steps, "ddim")
    sched.set_timesteps(steps)
    measured = {}
    for t in sched.timesteps:
        out = sched.step(torch.ones(1), t, torch.zeros(1)).prev_sample  # x_t = 0, eps = 1 -> the eps coefficient
        measured[int(t)] = abs(float(out))
    mean = sum(measured.values()) / len(measured)
    assert set(gam) == set(measured)
    for t in gam:
        assert gam[t] == pytest.approx(measured[t] / mean, rel=1e-5)
    assert abs(sum(gam.values()) / len(gam) - 1) < 1e-9
    # The weighting is not flat: late (small t) steps use eps far less than early ones in DDIM.
    assert max(gam.values()) / min(gam.values()) > 2


def test_dfa_gamma_ddpm_formula():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gam = dfa_weights(sched, 1000, "ddpm")
    b = sched.betas.double()
    abar = sched.alphas_cumprod.double()
    raw = {t: float(b[t] / ((1 - b[t]).sqrt() * (1 - abar[t]).sqrt())) for t in gam}
    mean = sum(raw.values()) / len(raw)
    for t in (0, 10, 500, 999):
        assert gam[t] == pytest.approx(raw[t] / mean, rel=1e-9)


def test_router_hard_choice_straight_through():
    torch.manual_seed(0)
    r = TimestepRouter(3)
    g = r(torch.tensor([700, 700]))
    # forward: one-hot up to the rounding of hard + soft - soft (float32)
    assert sorted(g.tolist()) == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    assert int((g != 0).sum()) == 1
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())  # backward: softmax STE


@pytest.fixture(scope="module")
def tuned():
    """A tiny UNet, quantized and fine-tuned with 2 LoRAs for a few steps (before fusion)."""
    unet = _unet()
    sig = signature_of(unet)
    sched = make_scheduler("ddim")
    calib = collect(unet, sig, 2, 4, 0, sched, num_groups=2, holdout_samples=0, progress=False)
    gm, _ = capture(unet, sig)
    for p in (AnnotateSign(calib, 256), SelectFormat(QuantConfig(keep_8bit=())), InsertQDQ()):
        gm = p(gm).graph_module
    data = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    cfg = FinetuneConfig(steps=40, num_loras=2, rank=2, batch_size=4, lr=5e-3, samples=4, sampler_steps=8)
    res = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
    return gm, sig, res


def test_finetune_lowers_distillation_loss(tuned):
    _, _, res = tuned
    assert len(res.losses) == 40
    assert res.final_loss < res.initial_loss


def test_router_table_is_what_the_fused_graph_selects(tuned):
    gm, sig, res = tuned
    table = router_table(gm)
    assert table.shape == (1000,) and set(table.unique().tolist()) <= {0, 1}
    assert torch.equal(table, res.table)
    trained = copy.deepcopy(gm)
    fused = FuseTALoRA()(copy.deepcopy(gm)).graph_module
    assert not any(n.op == "call_module" for n in fused.graph.nodes)  # router and LoRA modules are gone
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


def test_talora_compile_onnx_agrees_with_torch(tmp_path):
    cfg = CompileConfig(quant=QuantConfig(keep_8bit=()), calib=CalibConfig(num_samples=2, num_steps=4, num_groups=2),
                        finetune=FinetuneConfig(steps=10, num_loras=2, rank=2, batch_size=4, samples=4,
                                                sampler_steps=8, checkpoint=str(tmp_path / "lora.safetensors")))
    cm = msfp_compile(_unet(), cfg, log_dir=tmp_path / "logs", progress=False)
    runs = {r.name: r for r in cm.pass_runs}
    assert runs["fuse_talora"].info["num_loras"] == 2
    res = cm.check()
    assert res.ok, str(res)
    assert cm.onnx_op_counts["DequantizeFP4Packed"] > 0
    # Both LoRAs' weights are in the model: more packed weights than PTQ, at most K = 2 times as many (the
    # exporter merges a LoRA pair whose merged weights quantize to identical codes).
    ptq = msfp_compile(_unet(), CompileConfig(quant=cfg.quant, calib=cfg.calib), progress=False)
    n_ptq, n_ta = ptq.onnx_op_counts["DequantizeFP4Packed"], cm.onnx_op_counts["DequantizeFP4Packed"]
    assert n_ptq < n_ta <= 2 * n_ptq
    size = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
    assert size(cm.onnx_model) <= 2 * size(ptq.onnx_model) + 4096  # + the t -> LoRA table
    assert (tmp_path / "lora.safetensors").is_file()
    assert "t " in (tmp_path / "logs" / "passes.log").read_text()  # the table is logged
    assert ROUTER_NAME not in dict(cm.graph_module.named_children())


def test_plain_lora_has_no_router():
    unet = _unet()
    sig = signature_of(unet)
    calib = collect(unet, sig, 2, 3, 0, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    gm, _ = capture(unet, sig)
    for p in (AnnotateSign(calib, 128), SelectFormat(QuantConfig(keep_8bit=())), InsertQDQ()):
        gm = p(gm).graph_module
    names = attach_talora(gm, FinetuneConfig(num_loras=1, rank=2))
    assert names and not hasattr(gm, ROUTER_NAME)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    before = gm(x, t)
    fused = FuseTALoRA()(gm).graph_module
    assert TABLE_ATTR not in dict(fused.named_buffers())
    assert torch.allclose(fused(x, t), before, atol=1e-6)  # B = 0 at init: merged weights equal W
