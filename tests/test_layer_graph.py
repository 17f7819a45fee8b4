"""layer_graph.quant_operands: the operands the compiler quantizes; QuantConfig.quantize_attention reaches it."""

from __future__ import annotations

from msfp_compiler.layer_graph import layer_kind, quant_operands


def test_attention_false_leaves_sdpa_operands_float(stages_unet2d) -> None:
    gm = stages_unet2d.after["annotate_sign"]
    every = quant_operands(gm)
    no_attn = quant_operands(gm, attention=False)
    attn_only = {q.producer for q in every if all(layer_kind(c) == "attn" for c in q.consumers)}
    assert attn_only and len(attn_only) % 3 == 0  # q, k, v of each attention block
    assert {q.producer for q in no_attn} == {q.producer for q in every} - attn_only
    assert all(layer_kind(c) != "attn" for q in no_attn for c in q.consumers)


def test_quantize_attention_option_reaches_annotate_sign() -> None:
    from msfp_compiler.calibration import CalibrationSet
    from msfp_compiler.compile import quantize_passes
    from msfp_compiler.config import CompileConfig, QuantConfig

    calib = CalibrationSet([])
    on = quantize_passes(CompileConfig(), calib)[0]
    off = quantize_passes(CompileConfig(quant=QuantConfig(quantize_attention=False)), calib)[0]
    assert on.quantize_attention and not off.quantize_attention
