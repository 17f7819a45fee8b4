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


def test_attach_talora_wraps_the_8bit_weights_too(stages_unet2d):
    """Layers kept at 8 bits are fine-tuned as well: a W8A8 graph gets a LoRA on every weight, and so does the
    first / last conv of a W4A4 one; a graph without weight quantizers is a one-line error."""
    from msfp_compiler.errors import MsfpError
    from msfp_compiler.record import record_of

    for keep in (("*",), ("first", "last")):
        gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"), keep_8bit=keep)
        weights = {n.name: record_of(n).bits for n in gm.graph.nodes
                   if record_of(n) is not None and record_of(n).role == "weight"}
        assert (set(weights.values()) == {8}) if keep == ("*",) else (sorted(weights.values()).count(8) == 2)
        names = attach_talora(gm, FinetuneConfig(num_loras=2, rank=2))
        assert sorted(names) == sorted(f"talora_{w}" for w in weights)
    # lora_8bit=False: the rows before session 22 (4-bit weights only); W8A8 then has nothing to fine-tune, and
    # the error leaves the graph untouched
    gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"), keep_8bit=("first", "last"))
    assert len(attach_talora(gm, FinetuneConfig(num_loras=2, rank=2, lora_8bit=False))) == len(weights) - 2
    gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"), keep_8bit=("*",))
    before = gm.code
    with pytest.raises(MsfpError, match="no 4-bit weight.*lora_8bit excludes the 8-bit layers"):
        attach_talora(gm, FinetuneConfig(num_loras=2, rank=2, lora_8bit=False))
    assert gm.code == before and not hasattr(gm, ROUTER_NAME)
    with pytest.raises(MsfpError, match="no quantized weight"):
        attach_talora(stages_unet2d.fresh("capture"), FinetuneConfig(num_loras=2, rank=2))


def test_attach_talora_leaves_the_output_unchanged_at_init(stages_unet2d):
    gm, _ = quantize_tiny(stages_unet2d.unet, gm=stages_unet2d.fresh("capture"))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    before = gm(x, t)
    names = attach_talora(gm, FinetuneConfig(num_loras=2, rank=2))
    assert names and hasattr(gm, ROUTER_NAME)
    assert all(isinstance(gm.get_submodule(n), TALoRAWeight) for n in names)
    assert torch.allclose(gm(x, t), before, atol=1e-6)  # B = 0 at init: the LoRA branch adds nothing yet
