"""Query-chunked attention (export/attention.py): same result, in onnxruntime and onnx's ReferenceEvaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from msfp_compiler.export.attention import chunk_attention
from tests.conftest import holdout_feeds, ort_session


@pytest.mark.parametrize("max_scores", [64, 8])
def test_chunked_attention_gives_the_same_result(compiled, max_scores: int) -> None:
    """Forced onto the tiny models' short attention (self- and cross-attention): every core split into chunks."""
    m = onnx.ModelProto()
    m.CopyFrom(compiled.onnx_model)
    softmax = sum(n.op_type == "Softmax" for n in m.graph.node)
    n = chunk_attention(m, max_scores)
    assert n == softmax > 0
    onnx.checker.check_model(m)
    assert sum(x.op_type == "Split" and x.name.endswith("_chunk_split") for x in m.graph.node) == n
    assert sum(x.op_type == "Softmax" for x in m.graph.node) >= 2 * n
    feeds = holdout_feeds(compiled)
    (ref,) = ort_session(compiled.onnx_model).run(None, feeds)
    (out,) = ort_session(m).run(None, feeds)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-6


def test_reference_evaluator_runs_chunked_attention(compiled_unet2d) -> None:
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.CopyFrom(compiled_unet2d.onnx_model)
    assert chunk_attention(m, 64) > 0
    feeds = holdout_feeds(compiled_unet2d)
    (ref,) = ReferenceEvaluator(m).run(None, feeds)
    (out,) = ort_session(m).run(None, feeds)
    assert np.linalg.norm(ref - out) / np.linalg.norm(out) < 1e-5


def test_short_attention_is_left_alone(compiled) -> None:
    """At the default budget the tiny models' 16 x 16 scores stay one MatMul -> Softmax -> MatMul."""
    m = onnx.ModelProto()
    m.CopyFrom(compiled.onnx_model)
    assert chunk_attention(m) == 0
    assert m.SerializeToString() == compiled.onnx_model.SerializeToString()
