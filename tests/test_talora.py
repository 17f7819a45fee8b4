"""TALoRA: the router (hard choice, straight-through), attach_talora, the select_weight op."""

from __future__ import annotations

import pytest
import torch

from msfp_compiler.config import FinetuneConfig
from msfp_compiler.talora import ROUTER_NAME, SELECT_WEIGHT, TALoRAWeight, TimestepRouter, attach_talora

from .conftest import quantize_tiny


def test_router_hard_choice_straight_through():
    torch.manual_seed(0)
    r = TimestepRouter(3)
    g = r(torch.tensor([700, 700]))
    # forward: one-hot up to the rounding of hard + soft - soft (float32)
    assert sorted(g.tolist()) == pytest.approx([0.0, 0.0, 1.0], abs=1e-6)
    assert int((g != 0).sum()) == 1
    (g * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in r.parameters())  # backward: softmax STE



def test_select_weight_picks_the_tables_set_for_the_first_timestep():
    ws = [torch.full((3, 2), float(k)) for k in range(3)]
    table = torch.tensor([2, 0, 1, 1])
    for t, k in ((0, 2), (1, 0), (3, 1)):
        assert torch.equal(SELECT_WEIGHT(table, torch.tensor([t, 0]), ws), ws[k])


def test_attach_talora_wraps_every_4bit_weight_quantizer(stages_unet2d):
    gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    before = gm(x, t)
    names = attach_talora(gm, FinetuneConfig(num_loras=2, rank=2))
    assert names and hasattr(gm, ROUTER_NAME)
    assert all(isinstance(gm.get_submodule(n), TALoRAWeight) for n in names)
    assert torch.allclose(gm(x, t), before, atol=1e-6)  # B = 0 at init: the LoRA branch adds nothing yet
