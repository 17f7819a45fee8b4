"""export/ort.py: sessions for compiled models (predecoded packed weights, models over the protobuf limit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

import msfp_compiler.export.onnx as onnx_export
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
    (out,) = session_from_model(model).run(None, feeds)
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
