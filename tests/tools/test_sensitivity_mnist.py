"""tools/sensitivity_mnist.py: quantizer groups by name, and bypassing quantizers in a copy of the graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

sens = pytest.importorskip("sensitivity_mnist")


def test_kinds_and_blocks_from_readable_names() -> None:
    assert sens.kind_of("up_blocks.0.resnets.1.conv_shortcut.input.1", "act") == "skip_concat"
    assert sens.kind_of("down_blocks.1.resnets.0.conv_shortcut.input", "act") == "skip_concat"
    assert sens.kind_of("mid_block.attentions.0.k", "act") == "attn_qkv"
    assert sens.kind_of("up_blocks.1.attentions.0.to_q.input", "act") == "attn_linear"
    assert sens.kind_of("up_blocks.1.resnets.2.time_emb_proj.input", "act") == "time_emb_proj"
    assert sens.kind_of("down_blocks.0.downsamplers.0.conv.input", "act") == "samplers"
    assert sens.kind_of("up_blocks.0.resnets.0.conv1.weight", "weight") == "weights"
    assert sens.block_of("up_blocks.3.resnets.1.conv2.input") == "up_blocks.3"
    assert sens.block_of("time_embedding.linear_1.input") == "top"


def test_bypassed_copy_passes_the_input_through_only_outside_keep() -> None:
    from msfp_compiler.ops import QUANTIZE

    g = fx.Graph()
    x = g.placeholder("x")
    s, z = g.get_attr("s"), g.get_attr("z")
    q1 = g.call_function(QUANTIZE, (x, s, z, "e2m1"))
    q2 = g.call_function(QUANTIZE, (q1, s, z, "e2m1"))
    g.output(q2)
    root = torch.nn.Module()
    root.register_buffer("s", torch.tensor(0.5))
    root.register_buffer("z", torch.tensor(0.0))
    gm = fx.GraphModule(root, g)
    inp = torch.linspace(-2, 2, 33)
    quantized = gm(inp)
    assert not torch.equal(quantized, inp)  # e2m1 at scale 0.5 cannot hold every input
    assert torch.equal(sens.bypassed(gm, set())(inp), inp)
    assert torch.equal(sens.bypassed(gm, {q1.name, q2.name})(inp), quantized)
    assert torch.equal(sens.bypassed(gm, {q1.name})(inp), quantized)  # q2 of an already quantized value: same
    assert sum(n.target is QUANTIZE for n in gm.graph.nodes) == 2  # the original is untouched


def test_efficientdm_scope_floats_shortcut_downsampler_time_mlp_and_attention_operands() -> None:
    names = {"a": ("up_blocks.0.resnets.0.conv_shortcut.input.1", "act", 4),
             "b": ("up_blocks.0.resnets.0.conv_shortcut.weight", "weight", 4),
             "c": ("down_blocks.0.downsamplers.0.conv.input", "act", 4),
             "d": ("time_embedding.linear_1.input", "act", 4),
             "e": ("mid_block.attentions.0.v", "act", 4),
             "f": ("up_blocks.0.resnets.0.conv1.input", "act", 4),
             "g": ("up_blocks.1.upsamplers.0.conv.input", "act", 4),
             "h": ("conv_in.input", "act", 8)}
    qs = [{"node": k, "name": n, "role": r, "bits": b, "kind": sens.kind_of(n, r), "block": sens.block_of(n)}
          for k, (n, r, b) in names.items()]
    cfg = sens.reference_configs(qs)
    assert cfg["EfficientDM scope"] == {"f", "g", "h"}
    assert cfg["W4A4"] == set(names) and cfg["W4A32 (weights only)"] == {"b", "h"}
    groups = sens.quantizer_groups(qs)
    assert groups["kind:skip_concat"] == {"a"} and groups["kind:weights"] == {"b"}
    assert groups["block:up_blocks.0"] == {"a", "f"}  # 4-bit activations only
    assert "block:top" not in sens.quantizer_groups(qs, blocks=False)


def test_study_end_to_end_on_a_tiny_unet(tmp_path) -> None:
    """prepare + run_study on the smallest UNet: with every quantizer bypassed the graph reproduces FP32 (the
    reference is aligned: same noise, timesteps, inputs), W4A4 does not, and every group is measured and saved."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_unet_min

    from msfp_compiler.load import LoadedModel

    args = sens.build_parser().parse_args(["--samples", "2", "--steps", "3", "--probe-steps", "0,2",
                                           "--calib-samples", "2", "--calib-steps", "3", "--no-blocks",
                                           "--out", str(tmp_path)])
    gm, qs, pr = sens.prepare(LoadedModel(make_unet_min(), Path("tiny")), args, torch.device("cpu"))
    acts4 = [q for q in qs if q["role"] == "act" and q["bits"] == 4]
    assert acts4 and all(0 < e < 1 for q in acts4 for e in q["local_rel_rmse"].values())
    assert pr.measure(sens.bypassed(gm, set()))["eps_rel_rmse_mean"] < 1e-5
    res = sens.run_study(gm, qs, pr, args, "tiny")
    assert res["configs"]["W4A4"]["eps_rel_rmse_mean"] > 1e-3
    assert set(res["groups"]) == {f"kind:{q['kind']}" for q in qs}
    saved = json.loads((tmp_path / "sensitivity_tiny.json").read_text())
    assert set(saved["groups"]) == set(res["groups"]) and (tmp_path / "sensitivity_tiny.md").exists()
