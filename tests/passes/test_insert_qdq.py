"""insert_qdq: one quantize node per quantized tensor, layer operands rewired, other users untouched."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from msfp_compiler.errors import MsfpError
from msfp_compiler.layer_graph import LAYER_OPS
from msfp_compiler.ops import QUANTIZE
from msfp_compiler.passes.insert_qdq import InsertQDQ, attr_name
from msfp_compiler.record import records


@pytest.fixture(scope="module")
def inserted(stages_unet2d) -> fx.GraphModule:
    return stages_unet2d.after["insert_qdq"]


def _quantizers(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QUANTIZE]


def _layers(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]


def _split_cats(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("msfp_split_cat")]


def _readers(q: fx.Node) -> list[fx.Node]:
    """The layers reading a quantizer: directly, or through a concatenation quantized per part."""
    return [v for u in q.users for v in (u.users if u.meta.get("msfp_split_cat") else [u])]


def test_one_quantizer_per_record(inserted, stages_unet2d) -> None:
    qs = _quantizers(inserted)
    recs = records(inserted)
    assert len(qs) == len(recs)
    sources = [q.args[0] for q in qs]
    assert len(set(sources)) == len(sources), "two quantizers on one tensor"
    assert set(sources) == {n for n, _ in recs}
    info = stages_unet2d.results["insert_qdq"].info
    assert info["quantize_nodes"] == len(qs)
    assert info["act_quantizers"] == sum(r.role == "act" for _, r in recs)
    assert info["weight_quantizers"] == sum(r.role == "weight" for _, r in recs)
    # the 4-bit UNet2DModel with one attention block: 30+ layers, each with a weight quantizer
    assert info["weight_quantizers"] == sum(LAYER_OPS[n.target][2] is not None for n in _layers(inserted))


def test_shared_inputs_share_one_quantizer(inserted) -> None:
    qs = _quantizers(inserted)
    shared = [q for q in qs if len(q.users) >= 2]
    assert shared, "to_q / to_k / to_v read one tensor: expected one quantizer with several layer users"
    assert any(sum(u.target == torch.ops.aten.linear.default for u in q.users) >= 3 for q in shared)
    for q in qs:
        rec = q.args[0].meta["msfp"]
        assert sorted(u.name for u in _readers(q)) == sorted(set(rec.consumers))


def test_every_layer_operand_is_quantized(inserted) -> None:
    for layer in _layers(inserted):
        kind, act_idx, w_idx = LAYER_OPS[layer.target]
        for i in list(act_idx) + ([w_idx] if w_idx is not None else []):
            a = layer.args[i]
            parts = a.args[0] if a.meta.get("msfp_split_cat") else [a]
            assert all(p.op == "call_function" and p.target == QUANTIZE for p in parts), (layer.name, i)


def test_concatenation_parts_get_their_own_quantizers(inserted, stages_unet2d) -> None:
    """The decoder's skip concatenations feeding conv_shortcut: a quantizer per part, each with its own scale,
    read through the conv's own copy of the cat; the original cat (GroupNorm's input) stays float."""
    cats = _split_cats(inserted)
    assert cats, "UNet2DModel's up blocks concatenate decoder state and skip before conv_shortcut"
    before = {n.name: n for n in stages_unet2d.after["select_format"].graph.nodes}
    for cat in cats:
        assert [u.target for u in cat.users] == [torch.ops.aten.conv2d.default]
        parts = cat.args[0]
        assert len(parts) >= 2 and all(p.target == QUANTIZE for p in parts)
        srcs = [p.args[0] for p in parts]
        assert len({p.args[1].target for p in parts}) == len(parts)  # one scale buffer per part
        orig = [n for n in before[srcs[0].name].users if n.target == torch.ops.aten.cat.default]
        assert orig and [a.name for a in orig[0].args[0]] == [s.name for s in srcs]
        still = [n for n in inserted.graph.nodes if n.name == orig[0].name]  # the original keeps the float parts
        assert still and list(still[0].args[0]) == srcs
    scales = [float(getattr(inserted, p.args[1].target)) for cat in cats for p in cat.args[0]]
    assert len(set(scales)) > len(cats)  # the parts' ranges differ: their scales are not one shared value


def test_split_concat_false_quantizes_the_concatenation(stages_unet2d) -> None:
    from msfp_compiler.layer_graph import quant_operands

    gm = stages_unet2d.after["capture"]
    whole = quant_operands(gm, split_concat=False)
    split = quant_operands(gm)
    cats = [q.producer for q in whole if q.producer.target == torch.ops.aten.cat.default
            and all(c.target == torch.ops.aten.conv2d.default for c in q.consumers)]
    assert cats and not any(q.producer in cats for q in split)
    parts = {p for c in cats for p in c.args[0]}
    assert parts <= {q.producer for q in split}


def test_only_layer_operands_are_rewired(inserted, stages_unet2d) -> None:
    before = stages_unet2d.after["select_format"]
    before_users = {n.name: sorted(u.name for u in n.users) for n in before.graph.nodes}
    for q in _quantizers(inserted):
        src = q.args[0]
        for u in q.users:
            assert u.target in LAYER_OPS or u.meta.get("msfp_split_cat")
        # non-layer users (residual adds, norms, views) still read the FP tensor
        fp_users = {u.name for u in src.users if u is not q}
        want = {u for u in before_users[src.name] if u not in {c.name for c in q.users}}
        assert fp_users == want
    # something in a UNet reads a quantized layer input in full precision too (the resnet residual)
    assert any(len(q.args[0].users) > 1 for q in _quantizers(inserted))


def test_scale_and_zero_point_buffers(inserted) -> None:
    for q in _quantizers(inserted):
        src, s, z, fmt = q.args
        c = src.meta["msfp"].choice
        assert s.op == z.op == "get_attr"
        assert s.target == attr_name(src, "scale") and z.target == attr_name(src, "zero_point")
        assert torch.equal(getattr(inserted, s.target), c.scale.float())
        assert torch.equal(getattr(inserted, z.target), c.zero_point.float())
        assert fmt == c.fmt


def test_graph_lints_and_runs(inserted, stages_unet2d) -> None:
    inserted.graph.lint()
    b = stages_unet2d.calib.holdout[0]
    with torch.no_grad():
        q = inserted(*b.args)
        fp = stages_unet2d.after["capture"](*b.args)
    assert q.shape == fp.shape and torch.isfinite(q).all()
    rel = float((q - fp).norm() / fp.norm())
    assert 0 < rel < 1.0, rel  # quantized (not identical), still tracking the FP output


def test_missing_choice_is_a_user_error(stages_unet2d) -> None:
    with pytest.raises(MsfpError, match="no format chosen"):
        InsertQDQ()(stages_unet2d.fresh("annotate_sign"))
