"""Readable layer names (msfp_compiler/names.py): module paths from nn_module_stack, suggestions for typos."""

from __future__ import annotations

import pytest
import torch

from msfp_compiler.errors import MsfpError
from msfp_compiler.layer_graph import layer_kind
from msfp_compiler.names import layer_names, model_layer_names, unknown_names_error


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
