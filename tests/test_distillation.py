"""Distillation: the fine-tuning stage lowers the loss; compile with TALoRA gives an ONNX that agrees with torch."""

from __future__ import annotations

import dataclasses
import math

from onnx import TensorProto

from msfp_compiler.compile import compile as msfp_compile
from msfp_compiler.config import CalibConfig, CompileConfig, FinetuneConfig
from msfp_compiler.ops import DEQUANTIZE_PACKED
from msfp_compiler.talora import ROUTER_NAME, SELECT_WEIGHT

from .conftest import FAST_QUANT
from .conftest import make_unet2d


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
    cm = msfp_compile(make_unet2d(), cfg, log_dir=tmp_path / "logs", progress=False)
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
