"""ONNX lowering: msfp custom nodes + model-local FunctionProtos that stock onnxruntime runs with no plugin.

Model-level tests run on both tiny compiled models (UNet2DModel with attention, UNet2DConditionModel with
cross-attention); op-level tests build one-node ONNX models per msfp op and compare the function bodies with the
torch reference ops bit for bit (up to the sign of zero).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import msfp_compiler.export.onnx as onnx_export
from msfp_compiler.compile import compile
from msfp_compiler.export.onnx import check_model, save_atomic
from msfp_compiler.export.msfp_ops import (BODY_OPS, MSFP_DOMAIN, QUANTIZE_OPS, base_op, quantize_op_type,
                                          single_op_model)
from msfp_compiler.formats import IntFormat
from msfp_compiler.ops import get_format, pack_codes
from tests.conftest import holdout_feeds

QUANT_OPS = set(QUANTIZE_OPS)
BASE_OP = {name: base_op(name) for name in BODY_OPS.values()}  # body op name -> the op the translation emits
TORCH_QUANT = {torch.ops.msfp.quantize.default, torch.ops.msfp.quantize_folded.default}
TOLERANCE = 1e-3  # relative error bound of --check (msfp_compiler/check.py) and of the direct ORT comparison


def _msfp_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.domain == MSFP_DOMAIN]


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _session(model_or_path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _feeds(cm, batch: int) -> tuple[dict, tuple]:
    """`batch` held-out/calibration inputs as ORT feeds and torch args."""
    pool = cm.calibration.holdout + cm.calibration.batches
    cat = [torch.cat([b.args[i] for b in pool])[:batch] for i in range(len(pool[0].args))]
    names = cm.signature.input_names
    feeds = {n: a.numpy() for n, a in zip(names, cat)}
    return feeds, tuple(cat)


# ---------------------------------------------------------------------------------------------------------------
# model structure


def test_msfp_nodes_match_the_torch_graph(compiled) -> None:
    m = compiled.onnx_model
    counts = Counter(n.op_type for n in _msfp_nodes(m))
    assert dict(counts) == {k: v for k, v in compiled.onnx_op_counts.items() if k[0].isupper()}
    assert compiled.onnx_op_counts["int8_weights"] > 0 and sum(v for k, v in counts.items() if BASE_OP[k] == "QuantizeFP")
    assert set(counts) <= QUANT_OPS  # every packed weight became int8 + DequantizeLinear
    gm = compiled.graph_module
    targets = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    # The exporter's optimizer merges common subexpressions: diffusers applies SiLU to the time embedding once per
    # resnet, so those quantizers (same input, same scale and zero point) become one ONNX node.
    distinct = {(n.args[3], getattr(gm, n.args[1].target).numpy().tobytes(),
                 getattr(gm, n.args[2].target).numpy().tobytes(), n.args[0].target, str(n.args[0].args))
                for n in gm.graph.nodes if n.op == "call_function" and n.target in TORCH_QUANT}
    assert sum(counts[k] for k in QUANT_OPS) == len(distinct) <= sum(targets[t] for t in TORCH_QUANT)
    assert compiled.onnx_op_counts["int8_weights"] == targets[torch.ops.msfp.dequantize_packed.default]
    for n in _msfp_nodes(m):
        fmt = _attr(n, "format").decode()
        assert BASE_OP[n.op_type] == quantize_op_type(fmt)
        assert (BASE_OP[n.op_type] == "QuantizeInt") == isinstance(get_format(fmt), IntFormat)
    inits = {t.name: t for t in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    mmi = [n for n in m.graph.node if n.op_type == "MatMulInteger"]
    # linears, and "same" convs on integer-grid activations (a 1x1 conv on a Concat: one MatMulInteger per part)
    layers = {re.sub(r"_mmi(_\d+)?$", "", n.name) for n in mmi}
    assert mmi and len(layers) == compiled.onnx_op_counts["integer_matmuls"] + compiled.onnx_op_counts.get(
        "integer_convs", 0)
    sliced = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Slice" and n.input[0] in inits}
    # int8 weights: read by a DequantizeLinear (FP32 kernels) or by a MatMulInteger (integer kernels), each once;
    # the other DequantizeLinears read the uint8 tap masks of integer convs on activations with a zero point
    int8 = {t.name for t in m.graph.initializer if t.data_type == TensorProto.INT8}
    assert len(int8) == compiled.onnx_op_counts["int8_weights"]
    dq_int8 = [n.input[0] for n in dq if inits[n.input[0]].data_type == TensorProto.INT8]
    assert sorted(set(dq_int8 + [sliced.get(n.input[1], n.input[1]) for n in mmi])) == sorted(int8)
    assert len(dq_int8) + len({sliced.get(n.input[1], n.input[1]) for n in mmi}) == len(int8)
    assert all(inits[n.input[0]].data_type == TensorProto.UINT8 and n.input[0].startswith("tap_mask_")
               for n in dq if n.input[0] not in int8)
    for n in mmi:
        assert inits[n.input[2]].data_type == TensorProto.UINT8  # activation zero point: 128 (signed) or 0
    # no standard FP4 types, which ORT's CPU provider cannot run
    for n in m.graph.node:
        if n.op_type == "Cast":
            assert _attr(n, "to") != TensorProto.FLOAT4E2M1


def test_model_local_functions_and_opset(compiled) -> None:
    m = compiled.onnx_model
    funcs = {(f.domain, f.name): f for f in m.functions}
    used = {n.op_type for n in _msfp_nodes(m)}
    for op in used:
        f = funcs[(MSFP_DOMAIN, op)]
        assert f.node, op
        # the body is made of standard ops only: that is what lets a stock ORT run it
        assert all(n.domain in ("", "ai.onnx") for n in f.node), op
    imports = {o.domain: o.version for o in m.opset_import}
    assert imports.get(MSFP_DOMAIN) == 1
    assert "msfp.translation" not in imports
    assert not any(n.domain == "msfp.translation" for n in m.graph.node)
    assert not any(n.domain not in ("", "ai.onnx", MSFP_DOMAIN) for n in m.graph.node)


def test_onnx_checker_passes(compiled) -> None:
    onnx.checker.check_model(compiled.onnx_model, full_check=True)


def test_inputs_outputs_and_dynamic_batch(compiled) -> None:
    m = compiled.onnx_model
    sig = compiled.signature
    want = ["sample", "timestep"] + (["encoder_hidden_states"] if sig.cond else [])
    assert [i.name for i in m.graph.input] == want == sig.input_names
    assert [o.name for o in m.graph.output] == ["noise_pred"]
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types["sample"] == TensorProto.FLOAT and types["timestep"] == TensorProto.INT64
    if sig.cond:
        assert types["encoder_hidden_states"] == TensorProto.FLOAT
    for vi in list(m.graph.input) + list(m.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        assert not d0.HasField("dim_value") and d0.dim_param == "batch", vi.name
    sample = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in sample[1:]] == [sig.in_channels, sig.sample_size, sig.sample_size]


# ---------------------------------------------------------------------------------------------------------------
# running it


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_onnxruntime_runs_saved_file(compiled, tmp_path: Path, batch: int) -> None:
    path = compiled.save(tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path))  # no plugin, no custom-op library, nothing registered
    feeds, args = _feeds(compiled, batch)
    (out,) = sess.run(None, feeds)
    assert out.shape == (batch, compiled.signature.in_channels, compiled.signature.sample_size,
                         compiled.signature.sample_size)
    assert np.isfinite(out).all()
    ref = compiled(*args).numpy()
    rel = np.sqrt(((out - ref) ** 2).reshape(batch, -1).sum(1) / (ref ** 2).reshape(batch, -1).sum(1))
    assert np.median(rel) <= TOLERANCE, rel


def test_check_agrees_with_torch_quantized_graph(compiled) -> None:
    res = compiled.check(TOLERANCE)
    n_holdout = sum(b.sample.shape[0] for b in compiled.calibration.holdout)
    assert res.samples == n_holdout == 6
    assert res.ok, str(res)
    # unforced end to end, every sample matches, except that a legitimate rounding flip (one grid step at a
    # threshold, counted by the check) may carry one sample's trajectory away: at most one such sample per flip
    assert sum(e > TOLERANCE for e in res.end_to_end_rel_rmse) <= res.flips, str(res)
    assert str(res).startswith("check PASS") and f"on {n_holdout} held-out samples" in str(res)


def test_check_detects_a_broken_lowering(compiled) -> None:
    # the criterion is not vacuous: a lowering bug (the integer matmuls rescaled by the activation's codes instead
    # of the scale product); more planted bugs, one node at a time, in tests/test_check.py
    m = onnx.ModelProto()
    m.CopyFrom(compiled.onnx_model)
    for n in m.graph.node:
        if n.op_type == "Mul" and n.name.endswith("_rescale"):
            n.input[1] = n.input[0]
    broken = dataclasses.replace(compiled, onnx_model=m)
    res = broken.check(TOLERANCE)
    assert not res.ok and str(res).startswith("check FAIL at ")
    # named at the first quantizer after the first broken matmul: its input (the matmul's output) diverges
    assert "the float layers before it diverge" in res.first_failure.problem, str(res)


def test_same_input_and_seed_give_identical_bytes(compiled_text7, unet_cond_min, tmp_path: Path) -> None:
    """A second compile in the same process (after others: no state carried between compiles) gives the same bytes.
    On an SD-style model, whose layers (convs, linears, self- and cross-attention, time embedding) include the
    UNet2DModel's kinds, calibrated with 7-token text states (the one cross-process check is test_cli's console-script
    test)."""
    compiled = compiled_text7
    again = compile(unet_cond_min, compiled.config, progress=False)
    a, b = compiled.onnx_model.SerializeToString(), again.onnx_model.SerializeToString()
    assert a == b
    pa, pb = compiled.save(tmp_path / "a.onnx"), again.save(tmp_path / "b.onnx")
    assert pa.read_bytes() == pb.read_bytes() == a


def test_save_is_atomic_and_needs_an_existing_folder(compiled, tmp_path: Path) -> None:
    from msfp_compiler.errors import MsfpError

    with pytest.raises(MsfpError, match="does not exist"):
        compiled.save(tmp_path / "missing" / "m.onnx")
    compiled.save(tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files left behind


# ---------------------------------------------------------------------------------------------------------------
# each msfp op's function body vs the torch op, one-node models

OPSET = 20


def _one_node_model(op_type: str, fmt: str, inputs: list[tuple[str, int, list]], out_shape: list[int],
                    **attrs) -> onnx.ModelProto:
    return single_op_model(op_type, fmt, {n: (t, s) for n, t, s in inputs}, out_shape, opset=OPSET, **attrs)


def _same_bits_up_to_zero_sign(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of elements whose float32 bits differ, after mapping -0.0 to +0.0."""
    a = np.ascontiguousarray(a + np.float32(0.0), dtype=np.float32)
    b = np.ascontiguousarray(b + np.float32(0.0), dtype=np.float32)
    return a.view(np.int32) != b.view(np.int32)


def _quant_inputs(fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with power-of-two scales hit every tie / level / power of two exactly; others use random scales."""
    f = get_format(fmt)
    g = torch.Generator().manual_seed(seed)
    lv = f.levels.double()
    mids = (lv[1:] + lv[:-1]) / 2
    pts = torch.cat([lv, mids, lv * 1.5, 2.0 ** torch.arange(-10, 12).double()]).float()
    near = torch.cat([torch.nextafter(pts, torch.full_like(pts, -np.inf)), pts,
                      torch.nextafter(pts, torch.full_like(pts, np.inf))])
    special = torch.cat([near, -near]) if f.signed else near
    n = special.numel()
    rows = []
    scales = [0.5, 1.0, 2.0, 0.25]
    zps = [0.0, 0.0, -0.25, -1.0] if not f.signed else [0.0] * 4
    for s, z in zip(scales, zps):
        rows.append(special * s + z)
    for _ in range(4):
        rows.append(torch.randn(n, generator=g) * float(f.max) * 0.6 + torch.rand(1, generator=g))
        scales.append(float(torch.rand(1, generator=g) * 2 + 0.01))
        zps.append(0.0 if f.signed else -float(torch.rand(1, generator=g)))
    rows.append(torch.tensor([1e30, -1e30, 3e38, -3e38, 0.0, -0.0, 1e-40, -1e-40]).repeat(n // 8 + 1)[:n])
    scales.append(0.1)
    zps.append(0.0 if f.signed else -0.1)
    x = torch.stack(rows)
    return x, torch.tensor(scales)[:, None], torch.tensor(zps)[:, None]


QUANT_FORMATS = ["e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]


def _quant_cases():
    for fmt in QUANT_FORMATS:
        if isinstance(get_format(fmt), IntFormat):
            yield fmt, "QuantizeInt"
        else:
            yield fmt, "QuantizeLUT"  # the table path is valid for every grid
            if get_format(fmt).man_bits >= 1:
                yield fmt, "QuantizeFP"  # the arithmetic path is meant for M >= 1


@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("fmt,op_type", list(_quant_cases()))
def test_quantize_function_body_matches_torch_op(fmt: str, op_type: str, folded: bool) -> None:
    x, s, z = _quant_inputs(fmt, seed=len(fmt))
    attrs = {"keep_zero_point": 0.0} if folded else {}
    model = _one_node_model(op_type, fmt, [("x", TensorProto.FLOAT, list(x.shape)),
                                           ("scale", TensorProto.FLOAT, list(s.shape)),
                                           ("zero_point", TensorProto.FLOAT, list(z.shape))], list(x.shape),
                            **attrs)
    (out,) = _session(model).run(None, {"x": x.numpy(), "scale": s.numpy(), "zero_point": z.numpy()})
    op = torch.ops.msfp.quantize_folded if folded else torch.ops.msfp.quantize
    ref = op(x, s, z, fmt).numpy()
    bad = _same_bits_up_to_zero_sign(out, ref)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ; x={x.numpy()[bad][:6]} onnx={out[bad][:6]} "
                           f"torch={ref[bad][:6]}")


def test_translation_picks_a_body_that_supports_the_format() -> None:
    for fmt in QUANT_FORMATS:
        op = quantize_op_type(fmt)
        assert (fmt, op) in set(_quant_cases()), (fmt, op)


@pytest.mark.parametrize("fmt", ["e1m2", "e2m1", "e3m0", "int4"])
@pytest.mark.parametrize("shape", [[6, 3, 3, 3], [5, 7], [3, 1, 1, 1], [4, 9]])
def test_dequantize_packed_function_body_matches_torch_op(fmt: str, shape: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes)
    scale = torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) + 0.01
    model = _one_node_model("DequantizeFP4Packed", fmt, [("packed", TensorProto.UINT8, list(packed.shape)),
                                                         ("scale", TensorProto.FLOAT, list(scale.shape))],
                            shape, shape=shape)
    (out,) = _session(model).run(None, {"packed": packed.numpy(), "scale": scale.numpy()})
    ref = torch.ops.msfp.dequantize_packed(packed, scale, fmt, shape).numpy()
    assert out.shape == tuple(shape)
    assert not _same_bits_up_to_zero_sign(out, ref).any()


# ---------------------------------------------------------------------------------------------------------------
# external data (the > 2 GB path), with the threshold lowered so a tiny model takes it


def test_external_data_round_trip(compiled_unet2d, tmp_path: Path) -> None:
    model = compiled_unet2d.onnx_model
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    save_atomic(model, path, external_data_threshold=0, external_min_bytes=256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp files left
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    data = (tmp_path / "m.onnx.data").read_bytes()
    head = onnx.load(str(path), load_external_data=False)
    ext = [t for t in head.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    inline = {t.name: t for t in model.graph.initializer}
    moved = 0
    for t in ext:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "m.onnx.data" and int(info["offset"]) % 4096 == 0
        off, n = int(info["offset"]), int(info["length"])
        assert data[off:off + n] == inline[t.name].raw_data and inline[t.name].ByteSize() >= 256
        moved += n
    assert ext and path.stat().st_size < len(before) - moved + 100 * len(ext)  # the weights left the .onnx
    assert [t.name for t in head.graph.initializer] == [t.name for t in model.graph.initializer]  # same order
    # onnx and onnxruntime load it from the path; outputs are bit-identical to the in-memory model
    assert onnx.load(str(path)).graph.initializer[0].raw_data == model.graph.initializer[0].raw_data
    feeds = holdout_feeds(compiled_unet2d)
    (out,) = _session(path).run(None, feeds)
    (ref,) = _session(model).run(None, feeds)
    assert np.array_equal(out, ref)
    # a re-save rewrites the data file (never appends); a small save removes the now unused data file
    save_atomic(model, path, external_data_threshold=0, external_min_bytes=256)
    assert (tmp_path / "m.onnx.data").read_bytes() == data
    save_atomic(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert path.read_bytes() == before


def test_external_data_save_leaves_nothing_on_failure(compiled_unet2d, tmp_path: Path, monkeypatch) -> None:
    from msfp_compiler.errors import MsfpError

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "_externalized", disk_full)
    with pytest.raises(MsfpError, match="cannot write"):
        save_atomic(compiled_unet2d.onnx_model, tmp_path / "m.onnx", external_data_threshold=0)
    assert list(tmp_path.iterdir()) == []


def test_check_model_over_the_protobuf_limit(compiled_unet2d, monkeypatch) -> None:
    model = compiled_unet2d.onnx_model
    before = model.SerializeToString()
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 1024)  # everything is "too big to serialize" now
    check_model(model)
    assert model.SerializeToString() == before
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(onnx.checker.ValidationError):
        check_model(broken)


# ---------------------------------------------------------------------------------------------------------------
# portability: onnx's ReferenceEvaluator runs the same model


def test_reference_evaluator_agrees_with_onnxruntime(compiled_unet2d) -> None:
    """onnx.reference runs every msfp body and the integer kernels as onnxruntime does (one op name per body: the
    evaluator ignores function overloads, which once made it 22% off on this model)."""
    from onnx.reference import ReferenceEvaluator

    cm = compiled_unet2d
    feeds, args = _feeds(cm, 2)
    ref = ReferenceEvaluator(cm.onnx_model).run(None, feeds)[0]
    (out,) = _session(cm.onnx_model).run(None, feeds)
    assert np.linalg.norm(ref - out) / np.linalg.norm(out) < 1e-5
    torch_out = cm(*args).numpy()
    assert np.linalg.norm(ref - torch_out) / np.linalg.norm(torch_out) < 1e-5


@pytest.mark.parametrize("text_len", [1, 5, 77])
def test_any_text_length(compiled_cond, text_len: int) -> None:
    """Calibrated with 1 token, the ONNX takes any length (SD pipelines pass 77)."""
    cm = compiled_cond
    m = cm.onnx_model
    (ehs,) = [i for i in m.graph.input if i.name == "encoder_hidden_states"]
    assert ehs.type.tensor_type.shape.dim[1].dim_param == "text_len"
    g = torch.Generator().manual_seed(text_len)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 900])
    c = torch.randn(2, text_len, 16, generator=g)
    (out,) = _session(m).run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()})
    ref = cm(x, t, c).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_fp32_scheme_goes_through_the_same_lowering(fp32_min) -> None:
    """``--scheme fp32``: no msfp node, the compiled models' inputs and output, the torch UNet's result; the same
    bytes as the library verb ``lower_fp32`` that tools use for their FP32 baseline."""
    from msfp_compiler.config import CompileConfig, QuantConfig

    unet, fp32 = fp32_min
    cm = compile(unet, CompileConfig(quant=QuantConfig(scheme="fp32")), progress=False)
    m = cm.onnx_model
    assert not _msfp_nodes(m) and not m.functions
    assert [r.name for r in cm.pass_runs] == ["capture", "lower_onnx"]  # no quantization pass ran
    assert [i.name for i in m.graph.input] == ["sample", "timestep"] and [o.name for o in m.graph.output] == \
        ["noise_pred"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 500, 999])
    (out,) = _session(m).run(None, {"sample": x.numpy(), "timestep": t.numpy()})
    with torch.no_grad():
        ref = unet(x, t).sample.numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert fp32.SerializeToString() == m.SerializeToString()
