"""export/ort.py: sessions for compiled models (predecoded packed weights, models over the protobuf limit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import msfp_compiler.export.onnx as onnx_export
from msfp_compiler.errors import MsfpError
from tests.conftest import holdout_feeds


def test_predecoded_weights_give_the_same_session_outputs(packed_unet2d) -> None:
    from msfp_compiler.export.ort import predecode_weights, session_from_model

    model = packed_unet2d.onnx_model
    before = model.SerializeToString()
    stored: list[np.ndarray] = []

    def store(a: np.ndarray) -> tuple[str, int]:
        stored.append(a)
        return "w.data", 4096 * len(stored)

    head = predecode_weights(model, store)
    assert model.SerializeToString() == before  # the caller's model is unchanged
    packed = [n for n in model.graph.node if n.op_type == "DequantizeFP4Packed"]
    assert len(stored) == len(packed) > 0 and all(a.dtype == np.float32 for a in stored)
    assert not [n for n in head.graph.node if n.op_type == "DequantizeFP4Packed"]
    ext = [t for t in head.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert sorted(t.name for t in ext) == sorted(n.output[0] for n in packed)
    assert head.ByteSize() < model.ByteSize()  # the packed codes left with their nodes
    feeds = holdout_feeds(packed_unet2d)
    (ref,) = session_from_model(model, predecode=False).run(None, feeds)  # ORT folds the function bodies
    sess = session_from_model(model)
    assert not sess.get_session_options().enable_mem_pattern  # no second-run block on top of the arena
    (out,) = sess.run(None, feeds)
    assert np.array_equal(out, ref)


def test_predecode_without_disk_space_is_a_one_line_error(packed_unet2d, tmp_path: Path, monkeypatch) -> None:
    import msfp_compiler.export.ort as ort_helpers
    from msfp_compiler.errors import MsfpError

    path = tmp_path / "m.onnx"
    packed_unet2d.save(path)

    def disk_full(model, store):
        store(np.zeros(4, np.float32))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ort_helpers, "predecode_weights", disk_full)
    with pytest.raises(MsfpError) as e:
        ort_helpers.open_session(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "No space left" in msg and "TMPDIR" in msg


@pytest.mark.parametrize("weights", ["int8", "packed"])
def test_session_and_check_over_the_protobuf_limit(compiled_unet2d, packed_unet2d, monkeypatch, weights) -> None:
    from msfp_compiler.export.ort import session_from_model

    cm = compiled_unet2d if weights == "int8" else packed_unet2d
    feeds = holdout_feeds(cm)
    (ref,) = session_from_model(cm.onnx_model).run(None, feeds)
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 1024)  # the model now goes through .onnx + .data
    for predecode in (True, False):
        (out,) = session_from_model(cm.onnx_model, predecode=predecode).run(None, feeds)
        assert np.array_equal(out, ref)
    assert cm.check().ok


def test_float32_conv_weights_are_the_int8_weights_decoded(compiled_unet2d, packed_unet2d) -> None:
    """CompileConfig.conv_weights="float32": conv weights as FP32 initializers (ORT prepacks them), bit for bit what
    the int8 model's DequantizeLinear computes; linears keep int8 + MatMulInteger."""
    import onnx
    from onnx import numpy_helper

    from msfp_compiler.export.onnx import to_integer
    from msfp_compiler.export.ort import session_from_model

    m = onnx.ModelProto()
    m.CopyFrom(packed_unet2d.onnx_model)
    counts = to_integer(m, conv_weights="float32")
    int8 = compiled_unet2d.onnx_model
    assert counts["float32_conv_weights"] > 0 and counts["integer_matmuls"] == compiled_unet2d.onnx_op_counts[
        "integer_matmuls"]
    assert counts["int8_weights"] + counts["float32_conv_weights"] == compiled_unet2d.onnx_op_counts["int8_weights"]
    inits = {t.name: t for t in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    fp32_w = [n.input[1] for n in convs if n.input[1] in inits and inits[n.input[1]].data_type == TensorProto.FLOAT]
    assert len(set(fp32_w)) == counts["float32_conv_weights"]
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in fp32_w for n in m.graph.node)
    probe = onnx.ModelProto()
    probe.CopyFrom(int8)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(w, TensorProto.FLOAT, None) for w in fp32_w)
    feeds = holdout_feeds(compiled_unet2d)
    outs = session_from_model(probe).run(None, feeds)
    for w, v in zip(fp32_w, outs[1:]):
        assert np.array_equal(numpy_helper.to_array(inits[w]).view(np.int32), v.view(np.int32)), w
    (out,) = session_from_model(m).run(None, feeds)
    assert np.linalg.norm(out - outs[0]) / np.linalg.norm(outs[0]) < 1e-5  # conv kernels may sum in another order


def test_same_convs_run_as_integer_matmuls(compiled_unet2d, packed_unet2d, monkeypatch) -> None:
    """1x1 and 3x3 "same" convs on integer-grid activations lower to MatMulInteger over the uint8 im2col [N, H*W,
    kh*kw*C] with the int8 weight stored [(kh, kw, C), C_out]: the same weights as DequantizeLinear + Conv, the
    output equal up to the float summation order, also where the activation carries a zero point (the border taps'
    correction) and for 1x1 convs on a Concat of quantizer outputs (one GEMM per part); with conv_weights="float32" they stay integer GEMMs (the faster kernel) and keep their int8 weight."""
    import onnx
    from onnx import numpy_helper

    import msfp_compiler.export.integer_kernels as ik
    from msfp_compiler.export.onnx import to_integer
    from msfp_compiler.export.ort import session_from_model

    def lowered(conv_weights: str = "int8") -> tuple[onnx.ModelProto, dict[str, int]]:
        m = onnx.ModelProto()
        m.CopyFrom(packed_unet2d.onnx_model)
        return m, to_integer(m, conv_weights=conv_weights)

    m, counts = lowered()
    assert counts == compiled_unet2d.onnx_op_counts and counts["integer_convs"] > 0
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert any(k.startswith("tap_mask_") for k in inits)  # a 3x3 conv on an activation with a zero point
    sliced = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Slice" and n.input[0] in inits}
    mmi_w = {sliced.get(n.input[1], n.input[1]) for n in m.graph.node if n.op_type == "MatMulInteger"}
    assert len(sliced) > 1  # a 1x1 conv on a Concat: one integer GEMM per part, on rows of the one int8 weight
    monkeypatch.setattr(ik, "_same_conv", lambda n: None)
    ref, ref_counts = lowered()
    assert ref_counts["int8_weights"] == counts["int8_weights"] and "integer_convs" not in ref_counts
    ref_inits = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    dq_w = {n.input[0] for n in ref.graph.node if n.op_type == "DequantizeLinear"}
    conv_w = [w for w in mmi_w if w in dq_w and ref_inits[w].ndim == 4]
    assert len(conv_w) == counts["integer_convs"]
    assert {ref_inits[w].shape[2:] for w in conv_w} == {(1, 1), (3, 3)}
    for w in conv_w:  # the conv's int8 weight in the im2col order
        assert np.array_equal(inits[w], ref_inits[w].transpose(2, 3, 1, 0).reshape(inits[w].shape))
    feeds = holdout_feeds(compiled_unet2d)
    (out,) = session_from_model(m).run(None, feeds)
    (want,) = session_from_model(ref).run(None, feeds)
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-5
    monkeypatch.undo()
    assert lowered("float32")[1]["integer_convs"] == counts["integer_convs"]


def test_tap_mask_marks_the_taps_inside_the_image() -> None:
    from msfp_compiler.export.integer_kernels import _tap_mask

    m = _tap_mask(3, 4, 3, 3).reshape(3, 4, 10)
    assert m[1, 1].tolist() == [1] * 10  # interior: every tap, and the bias column
    assert m[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1, 1]  # corner: taps (1..2, 1..2)
    assert m[2, 2].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]  # bottom row: no tap below


def test_float32_conv_share_picks_the_convs_with_the_most_output_positions(packed_unet2d, monkeypatch) -> None:
    """CompileConfig.conv_weights="float32:F": FP32 initializers for at most the share F of the conv weight
    elements, the convs with the most output positions first; "float32:1" is "float32". The share applies to the
    convs that stay FP32 kernels; the test UNet's integer-grid convs are kept out of the integer GEMMs here so that
    it has enough of them to rank (it has one strided conv)."""
    import onnx
    from onnx import numpy_helper

    import msfp_compiler.export.integer_kernels as ik
    from msfp_compiler.export.onnx import to_integer

    monkeypatch.setattr(ik, "_same_conv", lambda n: None)

    def lowered(spec: str) -> tuple[onnx.ModelProto, dict[str, int]]:
        m = onnx.ModelProto()
        m.CopyFrom(packed_unet2d.onnx_model)
        return m, to_integer(m, conv_weights=spec)

    def conv_weights(m: onnx.ModelProto) -> dict[str, tuple[int, int, bool]]:
        """conv weight -> (output positions, elements, stored as FP32)"""
        inits = {t.name: t for t in m.graph.initializer}
        vi = {v.name: v for v in m.graph.value_info}
        dq = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
        out = {}
        for n in m.graph.node:
            w = n.input[1] if n.op_type == "Conv" else None
            if w in inits and inits[w].data_type == TensorProto.FLOAT or w in dq:
                t = inits[w] if w in inits else inits[dq[w]]
                pos = int(np.prod([d.dim_value for d in vi[n.output[0]].type.tensor_type.shape.dim][2:]))
                out[w] = (pos, numpy_helper.to_array(t).size, t.data_type == TensorProto.FLOAT)
        return out

    full, counts_full = lowered("float32")
    assert counts_full == lowered("float32:1")[1]
    m, counts = lowered("float32:0.3")
    ws = conv_weights(m)
    total = sum(numel for _, numel, _ in conv_weights(full).values())
    chosen = [w for w, (_, _, f32) in ws.items() if f32]
    assert 0 < counts["float32_conv_weights"] == len(chosen) < counts_full["float32_conv_weights"]
    used = sum(ws[w][1] for w in chosen)
    assert used <= 0.3 * total
    skipped = [w for w in ws if not ws[w][2]]
    assert all(used + ws[w][1] > 0.3 * total for w in skipped)  # nothing left that fits
    assert max(ws[w][0] for w in chosen) == max(pos for pos, _, _ in ws.values())
    mean_pos = lambda names: sum(ws[w][0] * ws[w][1] for w in names) / sum(ws[w][1] for w in names)  # noqa: E731
    assert mean_pos(chosen) > mean_pos(skipped)
    with pytest.raises(MsfpError, match="float32:F"):  # a user's option value: the CLI's one-line error
        lowered("float32:0")
