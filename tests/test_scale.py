"""Scale and deployment hardening (fast: tiny models only; the SD1.5 numbers come from tools/bench_compile.py).

- ONNX external data (models over 2 GB): exercised with a lowered threshold; the round trip, atomic writes,
  no mutation of the caller's model and no stale data appended on a re-save.
- Calibration statistics stay bounded per timestep group however much calibration data there is.
- Same input + seed -> identical ONNX bytes across two processes (the CLI, different hash seeds).
- Text-conditioned UNets: the captured graph takes any text length (SD uses 77 tokens).
- The fast quantize function bodies (unsigned and power-of-two overloads) are bit-exact with torch.ops.msfp.quantize on
  every grid level, tie and their float32 neighbours (tools/bench_ort.py --verify runs the dense sweep).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import msfp_compiler.export.onnx as onnx_export
from msfp_compiler.calibration import collect
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.capture import capture, signature_of
from msfp_compiler.export.msfp_ops import MSFP_DOMAIN, single_op_model
from msfp_compiler.export.onnx import check_model, save_atomic
from msfp_compiler.ops import get_format
from msfp_compiler.passes.annotate_sign import AnnotateSign
from msfp_compiler.record import records
from tests.conftest import make_unet2d, make_unet_cond

ROOT = Path(__file__).resolve().parents[1]


def _session(src) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _feeds(cm, batch: int = 2) -> dict[str, np.ndarray]:
    b = (cm.calibration.holdout or cm.calibration.batches)[0]
    return {n: a[:batch].numpy() for n, a in zip(cm.signature.input_names, b.args)}


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
    feeds = _feeds(compiled_unet2d)
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


def test_predecoded_weights_give_the_same_session_outputs(compiled_unet2d) -> None:
    from msfp_compiler.export.ort import predecode_weights, session_from_model

    model = compiled_unet2d.onnx_model
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
    feeds = _feeds(compiled_unet2d)
    (ref,) = session_from_model(model, predecode=False).run(None, feeds)  # ORT folds the function bodies
    (out,) = session_from_model(model).run(None, feeds)
    assert np.array_equal(out, ref)


def test_predecode_without_disk_space_is_a_one_line_error(compiled_unet2d, tmp_path: Path, monkeypatch) -> None:
    import msfp_compiler.export.ort as ort_helpers
    from msfp_compiler.errors import MsfpError

    path = tmp_path / "m.onnx"
    compiled_unet2d.save(path)

    def disk_full(model, store):
        store(np.zeros(4, np.float32))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ort_helpers, "predecode_weights", disk_full)
    with pytest.raises(MsfpError) as e:
        ort_helpers.open_session(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "No space left" in msg and "TMPDIR" in msg


def test_session_and_check_over_the_protobuf_limit(compiled_unet2d, monkeypatch) -> None:
    from msfp_compiler.export.ort import session_from_model

    feeds = _feeds(compiled_unet2d)
    (ref,) = session_from_model(compiled_unet2d.onnx_model).run(None, feeds)
    monkeypatch.setattr(onnx_export, "MAX_PROTO_BYTES", 1024)  # the model now goes through .onnx + .data
    for predecode in (True, False):
        (out,) = session_from_model(compiled_unet2d.onnx_model, predecode=predecode).run(None, feeds)
        assert np.array_equal(out, ref)
    assert compiled_unet2d.check().ok


# ---------------------------------------------------------------------------------------------------------------
# calibration statistics: bounded per timestep group


def _stats(gm, calib, per_group: int):
    res = AnnotateSign(calib, per_group, seed=0)(gm)
    acts = [r for _, r in records(res.graph_module) if r.role == "act"]
    return acts


@pytest.mark.parametrize("per_group", [64, 300])
def test_statistics_memory_is_bounded_per_timestep_group(per_group: int) -> None:
    unet = make_unet2d()
    sig = signature_of(unet)
    small = collect(unet, sig, 2, 4, 0, make_scheduler(), num_groups=2, holdout_samples=0, progress=False)
    large = collect(unet, sig, 6, 8, 0, make_scheduler(), num_groups=2, holdout_samples=0, progress=False)
    kept = {}
    for name, calib in (("small", small), ("large", large)):
        gm, _ = capture(unet, sig)
        acts = _stats(gm, calib, per_group)
        assert acts
        for rec in acts:
            assert len(rec.groups) == 2
            for g in rec.groups:
                assert g.sample is not None and 0 < g.sample.numel() <= per_group  # bounded, whatever the data
                assert g.hist is not None and g.hist.numel() == 64
        kept[name] = (sum(g.sample.numel() for r in acts for g in r.groups), sum(g.count for r in acts for g in r.groups),
                      len(acts))
    # 6x the calibration data (3x samples, 2x steps): all of it is counted, what is kept stays under the same
    # bound (records x groups x per_group), independent of the calibration size
    assert kept["large"][1] == 6 * kept["small"][1]
    assert kept["large"][2] == kept["small"][2]
    assert kept["large"][0] <= kept["large"][2] * 2 * per_group


def test_statistics_reject_non_finite_activations() -> None:
    from msfp_compiler.errors import MsfpError

    unet = make_unet2d()
    sig = signature_of(unet)
    calib = collect(unet, sig, 1, 2, 0, make_scheduler(), num_groups=1, holdout_samples=0, progress=False)
    calib.groups[0].batches[0].sample[0, 0, 0, 0] = float("nan")
    gm, _ = capture(unet, sig)
    with pytest.raises(MsfpError, match="non-finite activation"):
        AnnotateSign(calib, 64)(gm)


# ---------------------------------------------------------------------------------------------------------------
# determinism across processes


def test_cli_output_is_identical_across_two_processes(tmp_path: Path) -> None:
    from msfp_compiler.load import save_checkpoint

    ckpt = save_checkpoint(make_unet_cond(seed=3), tmp_path / "tiny.pt")
    exe = Path(sys.executable).parent / "msfp-compile"
    procs = []
    for i, hash_seed in enumerate(("1", "12345")):  # different hash seeds: no set/dict-order dependence
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [str(exe), str(ckpt), "--out", str(tmp_path / f"out{i}.onnx"), "--calib-samples", "2",
               "--calib-steps", "2", "--calib-groups", "2", "--seed", "7", "-q"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    a, b = (tmp_path / "out0.onnx").read_bytes(), (tmp_path / "out1.onnx").read_bytes()
    assert a == b and len(a) > 10_000


# ---------------------------------------------------------------------------------------------------------------
# text length of cross-attention UNets


def test_captured_graph_takes_any_text_length() -> None:
    unet = make_unet_cond()
    sig = signature_of(unet)  # cond_len 1 by default, e.g. a class-embedding row
    gm, _ = capture(unet, sig)
    g = torch.Generator().manual_seed(0)
    for batch, length in ((1, 1), (3, 77), (2, 5)):
        x, t = torch.randn(batch, 4, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)
        c = torch.randn(batch, length, 16, generator=g)
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=c).sample
            assert torch.allclose(gm(x, t, c), ref, atol=1e-5)


def test_sd_style_calibration_uses_77_tokens() -> None:
    unet = make_unet_cond()
    sig = signature_of(unet, cond_len=77)
    calib = collect(unet, sig, 2, 2, 0, make_scheduler(), num_groups=1, holdout_samples=0, progress=False)
    assert calib.batches[0].cond.shape == (2, 77, 16)
    gm, _ = capture(unet, sig)
    res = AnnotateSign(calib, 64)(gm)  # runs the captured graph on 77-token states
    assert res.info["calib_batches"] == 2


def test_compile_calibrates_with_the_configured_text_length() -> None:
    from msfp_compiler.compile import compile as msfp_compile
    from msfp_compiler.config import CalibConfig, CompileConfig

    calib = CalibConfig(num_samples=2, num_steps=2, num_groups=1, holdout_samples=1, text_len=7)
    cm = msfp_compile(make_unet_cond(), CompileConfig(calib=calib), progress=False)
    assert {b.cond.shape[1] for b in cm.calibration.batches + cm.calibration.holdout} == {7}
    assert cm.check().ok  # ORT vs the torch graph on the 7-token hold-out batch


# ---------------------------------------------------------------------------------------------------------------
# the fast function bodies (overloads) vs the torch op


def _one_node(op_type: str, overload: str, fmt: str, scale: float, zp: float, keep: float) -> ort.InferenceSession:
    """One msfp node with the given body; scale and zero point are initializers as in compiled models, so ORT's
    constant folding and fusions (which once rejected an FP8 zero point) run on it."""
    m = single_op_model(op_type, fmt, {"x": (TensorProto.FLOAT, ["n"]), "scale": np.array(scale, np.float32),
                                       "zero_point": np.array(zp, np.float32)}, ["n"], overload=overload,
                        keep_zero_point=keep)
    assert m.graph.node[0].overload == overload and [f.overload for f in m.functions] == [overload]
    return _session(m)


def _tie_heavy(fmt: str) -> np.ndarray:
    """Every level, midpoint (tie) and threshold +- 3 float32 ulps, a strided sweep, huge and tiny values."""
    f = get_format(fmt)
    lv = f.levels.double().numpy()
    pts = np.concatenate([lv, (lv[1:] + lv[:-1]) / 2, f.thresholds.double().numpy(), 2.0 ** np.arange(-12, 12)])
    bits = pts.astype(np.float32).view(np.int32)[:, None] + np.arange(-3, 4)[None]
    sweep = np.arange(0, int(np.float32(f.max * 1.25).view(np.int32)), 4099, dtype=np.int64).astype(np.int32)
    x = np.concatenate([bits.ravel(), sweep]).view(np.float32)
    x = np.concatenate([x, -x, np.array([1e30, 3e38, 1e-40, 0.0], np.float32)])
    return x[~np.isnan(x)]  # (bit patterns below +0 are NaNs; NaN in, NaN out is not specified)


@pytest.mark.parametrize("fmt,op_type,overload", [
    ("e1m2", "QuantizeFP", ""), ("e2m1", "QuantizeFP", ""), ("ue3m1", "QuantizeFP", ""), ("ue2m2", "QuantizeFP", ""),
    ("ue2m2", "QuantizeFP", "unsigned"), ("ue3m1", "QuantizeFP", "unsigned"),
    ("e3m0", "QuantizeLUT", "pow2"), ("ue4m0", "QuantizeLUT", "pow2"), ("e3m0", "QuantizeLUT", ""),
    ("int4", "QuantizeInt", ""),
])
@pytest.mark.parametrize("scale,zp,keep", [(1.0, 0.0, 1.0), (0.0371, 0.0, 1.0), (0.0371, -0.4125, 1.0),
                                           (0.0371, -0.4125, 0.0), (3.3, 1.7, 1.0)])
def test_fast_quantize_bodies_are_bit_exact(fmt, op_type, overload, scale, zp, keep) -> None:
    v = _tie_heavy(fmt)
    with np.errstate(over="ignore"):  # 3e38 * 3.3 -> inf, on purpose
        x = v if (scale, zp) == (1.0, 0.0) else (np.float32(zp) + v * np.float32(scale)).astype(np.float32)
    sess = _one_node(op_type, overload, fmt, scale, zp, keep)
    (y,) = sess.run(None, {"x": x})
    op = torch.ops.msfp.quantize if keep else torch.ops.msfp.quantize_folded
    ref = op(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zp), fmt).numpy()
    y, ref = y + np.float32(0), ref + np.float32(0)  # -0 == +0
    bad = y.view(np.int32) != ref.view(np.int32)
    assert not bad.any(), f"{bad.sum()} differ: x={x[bad][:5]} onnx={y[bad][:5]} torch={ref[bad][:5]}"


def test_lowering_picks_the_fast_bodies(compiled_unet2d) -> None:
    m = compiled_unet2d.onnx_model
    for n in m.graph.node:
        if n.domain != MSFP_DOMAIN or n.op_type not in ("QuantizeFP", "QuantizeLUT"):
            continue
        f = get_format(next(a.s.decode() for a in n.attribute if a.name == "format"))
        if n.op_type == "QuantizeLUT":
            assert n.overload == ("pow2" if f.man_bits == 0 else "")
        else:
            assert n.overload == ("" if f.signed else "unsigned")
    overloads = {(f.name, f.overload) for f in m.functions}
    assert {(n.op_type, n.overload) for n in m.graph.node if n.domain == MSFP_DOMAIN} == overloads  # only those used
    assert m.ir_version >= 10  # function overloads
