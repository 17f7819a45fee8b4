"""Distillation: the fine-tuning stage lowers the loss; compile with TALoRA gives an ONNX that agrees with torch."""

from __future__ import annotations


from msfp_compiler.compile import compile as msfp_compile
from msfp_compiler.config import CalibConfig, CompileConfig, FinetuneConfig, QuantConfig
from msfp_compiler.talora import ROUTER_NAME

from .conftest import make_tiny_talora_unet as _unet


def test_finetune_lowers_distillation_loss(tuned):
    _, _, res = tuned
    assert len(res.losses) == 40
    assert res.final_loss < res.initial_loss


def test_talora_compile_onnx_agrees_with_torch(tmp_path):
    cfg = CompileConfig(quant=QuantConfig(keep_8bit=()), calib=CalibConfig(num_samples=2, num_steps=4, num_groups=2),
                        finetune=FinetuneConfig(steps=10, num_loras=2, rank=2, batch_size=4, samples=4,
                                                sampler_steps=8, checkpoint=str(tmp_path / "lora.safetensors")))
    cm = msfp_compile(_unet(), cfg, log_dir=tmp_path / "logs", progress=False)
    runs = {r.name: r for r in cm.pass_runs}
    assert runs["fuse_talora"].info["num_loras"] == 2
    res = cm.check()
    assert res.ok, str(res)
    assert cm.onnx_op_counts["int8_weights"] > 0
    # Both LoRAs' weights are in the model: more int8 weights than PTQ, at most K = 2 times as many (the
    # exporter merges a LoRA pair whose merged weights quantize to identical codes).
    ptq = msfp_compile(_unet(), CompileConfig(quant=cfg.quant, calib=cfg.calib), progress=False)
    n_ptq, n_ta = ptq.onnx_op_counts["int8_weights"], cm.onnx_op_counts["int8_weights"]
    assert n_ptq < n_ta <= 2 * n_ptq
    size = lambda m: sum(len(t.raw_data) for t in m.graph.initializer)  # noqa: E731
    assert size(cm.onnx_model) <= 2 * size(ptq.onnx_model) + 4096  # + the t -> LoRA table
    assert (tmp_path / "lora.safetensors").is_file()
    assert "t " in (tmp_path / "logs" / "passes.log").read_text()  # the table is logged
    assert ROUTER_NAME not in dict(cm.graph_module.named_children())
