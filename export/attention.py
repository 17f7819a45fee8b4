"""Query-chunked attention in the lowered ONNX: the attention score tensor never exists whole.

The exporter writes ``scaled_dot_product_attention`` as ``MatMul(q, k^T) -> Softmax(axis=-1) -> MatMul(p, v)``.
At SD1.5's 64x64 latents the score tensor is [batch, 8, 4096, 4096] floats, 512 MB at batch 1 (1 GB with
classifier-free guidance), and it is what sets the peak of onnxruntime's activation arena. Every row of the scores
depends on its own query row only, so the rewrite splits the queries into chunks along the sequence axis, runs
MatMul -> Softmax -> MatMul per chunk (one chunk after another in graph order, which onnxruntime follows, so each
chunk's scores are freed before the next one's are allocated) and concatenates the outputs. Measured with ORT 1.32,
8 heads x 4096 x 4096 x 40, 1 thread: the run's peak RSS above the inputs falls from 564 MB to 165 MB with 8 chunks,
and the run is no slower (the chunk fits the caches better). Values: the same per-row arithmetic; MLAS may block a
smaller GEMM differently, so outputs can differ from the unchunked graph in the last bit (~1e-7 relative), like any
other float-layer summation order (see README "What is exact").

Only standard ops (Split, MatMul, Softmax, Concat), so onnx.reference.ReferenceEvaluator runs it too. The rewrite
applies to the FP32 baseline (``lower_fp32``) and to quantized models alike; only the float attention core is
touched, the quantizers of q, k and v stay where they were. The ONNX-standard ``Attention`` op (opset 23) was
measured as well: ORT's CPU kernel materializes the same full score tensor (peak 565 MB), so it saves nothing.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["chunk_attention", "MAX_CHUNK_SCORES"]

# Score elements per head and chunk: 2^21 floats = 8 MB (512 query rows at 4096 keys; 8 heads: 64 MB a chunk).
MAX_CHUNK_SCORES = 1 << 21


def _dims(value_info: dict[str, onnx.ValueInfoProto], name: str) -> list[int | None] | None:
    vi = value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _attention_cores(g: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """(MatMul scores, Softmax, MatMul output) triples whose intermediates nothing else reads."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in g.output}
    cores = []
    for s in g.node:
        if s.op_type != "Softmax" or s.domain not in ("", "ai.onnx"):
            continue
        axis = next((helper.get_attribute_value(a) for a in s.attribute if a.name == "axis"), -1)
        mm1 = producer.get(s.input[0])
        users = consumers[s.output[0]]
        if axis != -1 or mm1 is None or mm1.op_type != "MatMul" or len(users) != 1:
            continue
        mm2 = users[0]
        if (mm2.op_type != "MatMul" or mm2.input[0] != s.output[0] or len(consumers[mm1.output[0]]) != 1
                or {mm1.output[0], s.output[0]} & outputs):
            continue
        cores.append((mm1, s, mm2))
    return cores


def _chunk_rows(value_info: dict, mm1: onnx.NodeProto, max_scores: int) -> list[int] | None:
    """Query rows per chunk, or None to leave the core alone (queries short enough, or their length unknown)."""
    scores = _dims(value_info, mm1.output[0]) or []
    queries = _dims(value_info, mm1.input[0]) or []
    rows = next((d[-2] for d in (scores, queries) if len(d) >= 2 and d[-2]), None)
    if rows is None:
        return None
    keys = next((d[-1] for d in (scores, _dims(value_info, mm1.input[1]) or []) if len(d) >= 2 and d[-1]), rows)
    per_chunk = max(1, max_scores // keys)
    if rows <= per_chunk:
        return None
    n = -(-rows // per_chunk)
    base, extra = divmod(rows, n)
    return [base + (i < extra) for i in range(n)]


def chunk_attention(model: onnx.ModelProto, max_scores: int = MAX_CHUNK_SCORES) -> int:
    """Rewrite ``model`` in place (see the module docstring); returns how many attention cores were chunked.
    ``max_scores``: score elements per head and chunk. Needs the query length from the graph's value_info (the
    exporter writes it: the spatial size is static); cores of unknown length are left as they are."""
    g = model.graph
    value_info = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    plan: dict[int, tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, list[int]]] = {}
    for mm1, s, mm2 in _attention_cores(g):
        sizes = _chunk_rows(value_info, mm1, max_scores)
        if sizes is not None:
            plan[id(mm2)] = (mm1, s, mm2, sizes)
    if not plan:
        return 0
    dropped = {id(mm1) for mm1, _, _, _ in plan.values()} | {id(s) for _, s, _, _ in plan.values()}
    new_nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in dropped:
            continue
        if id(n) not in plan:
            new_nodes.append(n)
            continue
        mm1, s, mm2, sizes = plan[id(n)]
        base = mm2.output[0].replace("/", "_") + "_chunk"
        split = f"{base}_sizes"
        g.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), split))
        q = [f"{base}{i}_q" for i in range(len(sizes))]
        new_nodes.append(helper.make_node("Split", [mm1.input[0], split], q, axis=-2, name=f"{base}_split"))
        for i, qi in enumerate(q):  # one chunk after the other: its scores die before the next chunk's exist
            new_nodes += [
                helper.make_node("MatMul", [qi, mm1.input[1]], [f"{base}{i}_scores"], name=f"{base}{i}_qk"),
                helper.make_node("Softmax", [f"{base}{i}_scores"], [f"{base}{i}_p"], axis=-1,
                                 name=f"{base}{i}_softmax"),
                helper.make_node("MatMul", [f"{base}{i}_p", mm2.input[1]], [f"{base}{i}_o"], name=f"{base}{i}_pv"),
            ]
        new_nodes.append(helper.make_node("Concat", [f"{base}{i}_o" for i in range(len(sizes))], [mm2.output[0]],
                                          axis=-2, name=f"{base}_concat"))
    stale = {mm1.output[0] for mm1, _, _, _ in plan.values()} | {s.output[0] for _, s, _, _ in plan.values()}
    keep_vi = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    del g.node[:]
    g.node.extend(new_nodes)
    return len(plan)
