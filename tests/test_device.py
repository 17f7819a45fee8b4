"""--device: validation, moving captured graphs between devices, and CPU == GPU formats where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from msfp_compiler.config import CompileConfig, QuantConfig
from msfp_compiler.device import move_graph, move_tensors, resolve_device
from msfp_compiler.errors import MsfpError
from msfp_compiler.record import records

from .conftest import TINY_CALIB, make_unet2d


def test_resolve_device_validates():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(MsfpError, match="--device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(MsfpError, match="not a device"):
        resolve_device("gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(MsfpError, match="no CUDA device"):
            resolve_device("cuda")


def test_move_graph_rewrites_baked_devices(stages_unet2d):
    gm = stages_unet2d.fresh("capture")
    baked = [n for n in gm.graph.nodes if isinstance(n.kwargs.get("device"), torch.device)]
    assert baked  # torch.export bakes arange(..., device=cpu) of the timestep embedding into the graph
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    ref = gm(x, t)
    for n in baked:  # as if captured elsewhere
        n.kwargs = {**n.kwargs, "device": torch.device("meta")}
    gm.recompile()
    with pytest.raises(Exception):
        gm(x, t)
    move_graph(gm, "cpu")
    assert all(n.kwargs["device"] == torch.device("cpu") for n in baked)
    assert torch.equal(gm(x, t), ref)


def test_move_tensors_nested():
    from msfp_compiler.calibration import CalibBatch

    b = CalibBatch(torch.zeros(1), torch.zeros(1, dtype=torch.int64))
    out = move_tensors({"a": [b, (torch.ones(2), 3)]}, torch.device("meta"))
    assert out["a"][0] is b and b.sample.device.type == "meta" and out["a"][1][0].device.type == "meta"
    assert out["a"][1][1] == 3


def test_compile_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    from msfp_compiler.compile import compile as msfp_compile

    with pytest.raises(MsfpError, match="no CUDA device"):
        msfp_compile(make_unet2d(), CompileConfig(calib=TINY_CALIB, device="cuda"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
def test_cpu_and_cuda_choose_the_same_formats_and_scales():
    """Calibration, statistics and the search on the GPU give the CPU's formats, and scales / zero points equal up
    to float summation order (relative 1e-4)."""
    import msfp_compiler.export.triton.runtime  # noqa: F401
    from msfp_compiler.compile import compile as msfp_compile

    cfg = CompileConfig(quant=QuantConfig(clip_ratios=16, zero_points=6), calib=TINY_CALIB)
    cpu = msfp_compile(make_unet2d(), cfg, progress=False, lower=False)
    gpu = msfp_compile(make_unet2d(), CompileConfig(quant=cfg.quant, calib=cfg.calib, device="cuda"),
                       progress=False, lower=False)
    a, b = records(cpu.graph_module), records(gpu.graph_module)
    assert [n.name for n, _ in a] == [n.name for n, _ in b]
    same_fmt = sum(ra.choice.fmt == rb.choice.fmt for (_, ra), (_, rb) in zip(a, b))
    assert same_fmt == len(a)
    for (n, ra), (_, rb) in zip(a, b):
        assert torch.allclose(ra.choice.scale.cpu(), rb.choice.scale.cpu(), rtol=1e-4, atol=0), n.name
        assert torch.allclose(ra.choice.zero_point.cpu(), rb.choice.zero_point.cpu(), rtol=1e-4, atol=1e-6), n.name
    assert next(gpu.graph_module.buffers()).device.type == "cpu"  # the result comes back to the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_device_cuda_without_gpu_is_one_line_error(tmp_path, capsys):
    from msfp_compiler.cli import compile_main
    from msfp_compiler.load import save_checkpoint

    from .conftest import make_unet_min

    model = save_checkpoint(make_unet_min(), tmp_path / "m.pt")
    out = tmp_path / "m.onnx"
    rc = compile_main([str(model), "--out", str(out), "--device", "cuda"])
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if ": error: " in ln]  # progress lines ("importing torch ...") may precede it
    assert rc == 2 and len(err) == 1 and lines[-1] == err[0], lines
    assert "--device cuda" in err[0] and "no CUDA device" in err[0]
    assert not out.exists()
