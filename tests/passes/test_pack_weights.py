"""pack_weights: 4-bit codes two per byte decode to exactly the fake-quantized weights; FP32 copies are dropped."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from msfp_compiler.ops import get_format
from msfp_compiler.ops import DEQUANTIZE_PACKED, QUANTIZE
from msfp_compiler.passes.pack_weights import PackWeights
from msfp_compiler.passes.select_format import get_weight
from msfp_compiler.record import records


@pytest.fixture(scope="module")
def before_after(stages_unet2d) -> tuple[fx.GraphModule, fx.GraphModule]:
    return stages_unet2d.after["fold_zero_point"], stages_unet2d.after["pack_weights"]


def _weight_quantizers(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QUANTIZE
            and n.args[0].op == "get_attr" and n.args[0].meta["msfp"].role == "weight"]


def test_packed_graph_equals_fake_quant_graph(before_after, stages_unet2d) -> None:
    before, after = before_after
    for b in stages_unet2d.calib.holdout + stages_unet2d.calib.batches[:1]:
        with torch.no_grad():
            ref, out = before(*b.args), after(*b.args)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_every_4bit_weight_is_packed_and_decodes_exactly(before_after) -> None:
    before, after = before_after
    wq = _weight_quantizers(before)
    four = [q for q in wq if q.args[0].meta["msfp"].bits == 4]
    eight = [q for q in wq if q.args[0].meta["msfp"].bits == 8]
    assert four and len(eight) == 2  # first and last conv stay 8-bit fake quant
    packed = {n.name: n for n in after.graph.nodes if n.op == "call_function" and n.target == DEQUANTIZE_PACKED}
    assert len(packed) == len(four)
    for q in four:
        p = packed[q.name]  # the pass retargets the node in place, so the name survives
        codes_node, scale_node, fmt, shape = p.args
        rec = q.args[0].meta["msfp"]
        w = get_weight(before, q.args[0])
        assert fmt == rec.choice.fmt and list(shape) == list(w.shape)
        buf = get_weight(after, codes_node)
        assert buf.dtype == torch.uint8 and buf.numel() == (w.numel() + 1) // 2
        decoded = torch.ops.msfp.dequantize_packed(buf, get_weight(after, scale_node), fmt, list(shape))
        fake = get_format(fmt).quantize(w, rec.choice.scale, rec.choice.zero_point)
        assert torch.equal(decoded, fake), q.name
    remaining = [n for n in after.graph.nodes if n.op == "call_function" and n.target == QUANTIZE
                 and n.args[0].op == "get_attr" and n.args[0].meta["msfp"].role == "weight"]
    assert sorted(n.name for n in remaining) == sorted(n.name for n in eight)


def test_fp32_weight_buffers_are_gone(before_after) -> None:
    before, after = before_after
    four = [q.args[0].target for q in _weight_quantizers(before) if q.args[0].meta["msfp"].bits == 4]
    state = dict(after.named_parameters()) | dict(after.named_buffers())
    for target in four:
        assert target not in state
        with pytest.raises(AttributeError):
            get_weight(after, type("N", (), {"target": target})())
    assert not any(n.op == "get_attr" and n.target in four for n in after.graph.nodes)
    # what is left in float32 is small: biases, norms, scales, and the two 8-bit layers
    fp_bytes = lambda m: sum(t.numel() * t.element_size() for t in  # noqa: E731
                             (dict(m.named_parameters()) | dict(m.named_buffers())).values()
                             if t.dtype == torch.float32)
    assert fp_bytes(after) < 0.5 * fp_bytes(before)


def test_size_ratio(stages_unet2d, before_after) -> None:
    before, _ = before_after
    info = stages_unet2d.results["pack_weights"].info
    four = [q for q in _weight_quantizers(before) if q.args[0].meta["msfp"].bits == 4]
    fp = sum(get_weight(before, q.args[0]).numel() * 4 for q in four)
    packed = sum((get_weight(before, q.args[0]).numel() + 1) // 2 + q.args[0].meta["msfp"].choice.scale.numel() * 4
                 for q in four)
    assert info["packed_weights"] == len(four)
    assert info["fp32_bytes"] == fp and info["packed_bytes"] == packed
    assert info["ratio"] == round(packed / fp, 4)
    # 1/8 for the codes plus one float32 scale per output channel (large relative to 8-16 channel layers)
    assert 0.125 < info["ratio"] < 0.2
    # the packed weights' FP32 bytes are reported once, as fp32_bytes; what else was dropped is counted apart
    assert "freed_bytes" not in info and info["other_freed_bytes"] >= 0
    gm = stages_unet2d.after["pack_weights"]
    kept = {n for n, _ in list(gm.named_buffers()) + list(gm.named_parameters())}
    assert not any(str(q.args[0].target) in kept for q in four)


def test_packing_is_a_no_op_without_4bit_weights(stages_unet2d) -> None:
    gm = stages_unet2d.fresh("fold_zero_point")
    for _, r in records(gm):
        r.bits = 8
    res = PackWeights()(gm)
    assert res.info["packed_weights"] == 0
    # fold_zero_point's replaced biases are the only buffers left to drop: modified says whether any were
    assert res.modified == (res.info["other_freed_bytes"] > 0)
