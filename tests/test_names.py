"""Readable layer names (msfp_compiler/names.py): module paths from nn_module_stack, suggestions for typos."""

from __future__ import annotations

import pytest
import torch

from msfp_compiler.errors import MsfpError
from msfp_compiler.layer_graph import layer_kind
from msfp_compiler.names import (LAST_BLOCK, expand_keep_names, layer_matches, layer_names, model_layer_names,
                                 unknown_names_error)


@pytest.fixture(scope="module")
def unet_and_graph(stages_unet2d):
    return stages_unet2d.unet, stages_unet2d.after["capture"]  # capture(make_unet2d()), read only


def test_layer_names_are_module_paths(unet_and_graph) -> None:
    unet, gm = unet_and_graph
    names = layer_names(gm)
    modules = dict(unet.named_modules())
    layers = [n for n in gm.graph.nodes if layer_kind(n)]
    assert set(names) == {n.name for n in layers}
    for n in layers:
        path = names[n.name].split("#")[0]
        assert path in modules, (n.name, path)  # every name is a real module of the model
        kind = layer_kind(n)
        expected = {"conv": torch.nn.Conv2d, "linear": torch.nn.Linear}.get(kind)
        assert expected is None or isinstance(modules[path], expected)
    assert names[next(n.name for n in layers if layer_kind(n) == "conv")] == "conv_in"
    assert set(names.values()) <= set(model_layer_names(unet)) | {v for v in names.values() if "#" in v}


def test_unknown_names_suggest_the_closest(unet_and_graph) -> None:
    unet, _ = unet_and_graph
    err = unknown_names_error("QuantConfig.keep_8bit", ["down_blocks.0.resnet.0.conv1", "zzz"], model_layer_names(unet))
    assert isinstance(err, MsfpError)
    msg = str(err)
    assert msg.startswith("QuantConfig.keep_8bit: unknown layer 'down_blocks.0.resnet.0.conv1' (did you mean "
                          "down_blocks.0.resnets.0.conv1")
    assert "'zzz'" in msg and "\n" not in msg


def test_keep_8bit_names_and_patterns(unet_and_graph) -> None:
    """A keep_8bit name selects its layer, the layers of a block under it, or (with * ? [) the layer paths an fnmatch
    pattern matches; compile.check_layer_names rejects, before calibration, a name or pattern that selects nothing."""
    from msfp_compiler.compile import check_layer_names

    assert layer_matches("mid_block", "mid_block.resnets.0.conv1") and layer_matches("a.b", "a.b#2")
    assert not layer_matches("mid_block", "mid_blockx.conv") and not layer_matches("a.b", "a.bc")
    assert layer_matches("*.conv_shortcut", "up_blocks.0.resnets.1.conv_shortcut")
    assert not layer_matches("*.conv_shortcut", "up_blocks.0.resnets.1.conv1")
    assert layer_matches("down_blocks.?.resnets.0.conv[12]", "down_blocks.1.resnets.0.conv2#2")
    unet, _ = unet_and_graph
    shortcuts = [p for p in model_layer_names(unet) if p.endswith(".conv_shortcut")]
    assert shortcuts  # the tiny UNet has some: the pattern below matches real layers
    check_layer_names(unet, ("first", "last", "*.conv_shortcut", "mid_block"))
    with pytest.raises(MsfpError, match=r"^QuantConfig\.keep_8bit: unknown layer '\*\.nope'"):
        check_layer_names(unet, ("first", "*.conv_shortcut", "*.nope"))


def test_last_block_is_the_last_up_block(unet_and_graph) -> None:
    """'last_block' names the highest-numbered up block (the full-resolution decoder level, whose index differs by
    model), only when asked for; a model without up blocks gets a one-line error; check_layer_names accepts it."""
    from msfp_compiler.compile import check_layer_names

    unet, _ = unet_and_graph
    paths = model_layer_names(unet)
    last = f"up_blocks.{len(unet.up_blocks) - 1}"
    assert expand_keep_names(("first", LAST_BLOCK, "*.conv_shortcut"), paths) == ("first", last, "*.conv_shortcut")
    assert expand_keep_names(("first", "last"), ["conv_in"]) == ("first", "last")  # nothing to resolve: no paths needed
    # numerically, not as text: up_blocks.10 comes after up_blocks.9
    assert expand_keep_names((LAST_BLOCK,), ["up_blocks.9.conv", "up_blocks.10.conv#2", "mid_block.conv"]) == \
        ("up_blocks.10",)
    with pytest.raises(MsfpError, match=r"^QuantConfig\.keep_8bit: 'last_block' needs a UNet with up_blocks"):
        expand_keep_names((LAST_BLOCK,), ["conv_in", "mid_block.resnets.0.conv1"])
    check_layer_names(unet, ("first", "last", LAST_BLOCK))
