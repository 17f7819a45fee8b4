"""tools/bench_gpu_kernels.py's command line (the benches themselves need a GPU)."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_gpu_kernels as BK  # noqa: E402


@pytest.mark.parametrize("sections", ["geglu", "gnstats,geglu", "gnstat", "lnquant", "flashfp8,lnquant"])
def test_unknown_section_is_an_error(sections: str, capsys: pytest.CaptureFixture) -> None:
    """An unknown (or removed) section exits 2 with a one-line message before any GPU work, not an empty run."""
    with pytest.raises(SystemExit) as e:
        BK.main(["--sections", sections, "--out", "/nonexistent/x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--sections: unknown section" in err and "gnstats" in err


def test_standalone_section_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--sections gnstats runs bench_gnstats alone (no SD1.5 layer list) with --batch and writes its result."""
    seen = {}

    def stub(batch):
        seen.update(batch=batch)
        return {"per_step_ms": {}}

    monkeypatch.setattr(BK, "bench_gnstats", stub)
    monkeypatch.setattr(BK, "layer_shapes", lambda *_: pytest.fail("gnstats needs no layer list"))
    monkeypatch.setattr(BK.torch.cuda, "get_device_name", lambda *_: "stub")
    out = tmp_path / "k.json"
    assert BK.main(["--sections", "gnstats", "--batch", "2", "--out", str(out)]) == 0
    assert seen == {"batch": 2}
    assert json.loads(out.read_text())["gnstats"] == {"per_step_ms": {}}


def test_flashfp8_dry_run(monkeypatch) -> None:
    """bench_flash_fp8 end to end on the CPU: the kernel in Triton's interpreter on a tiny level, a stub timer; the
    tile names are the ones bench_gpu_sd15 --flash-tile reads, and O is within P's E4M3 rounding of the bf16 SDPA."""
    if not BK.torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is off")
    pytest.importorskip("triton")
    import bench_gpu_sd15

    dev = "cuda" if BK.torch.cuda.is_available() else "cpu"
    calls = []
    monkeypatch.setattr(BK, "graphed_ms", lambda fn: (fn(), calls.append(1), 0.5)[2])
    tiles = ((32, 32, 4, 1, False), (24, 32, 4, 1, False))  # the second fails (BLOCK_M not a power of two)
    r = BK.bench_flash_fp8(1, (("tiny", 48, 2, 40, 5),), tiles=tiles, device=dev, pad64=False)
    (row,) = r["rows"]
    assert "error" in row["24x32w4s1"]  # recorded, and left out of the per-step totals (below)
    name = BK.flash_tile_name(tiles[0])
    assert name == "32x32w4s1" and bench_gpu_sd15.parse_flash_tile(name) == tiles[0]
    assert len(calls) == 2 and row["best"] == name and r["per_step_ms"] == {"bf16_ms": 2.5, "best_ms": 2.5, name: 2.5}
    assert r["best_tile"] == name and r["per_step_saving_ms"] == 0.0
    assert 1e-3 < row[name]["rel_rmse"] < 0.05


def test_epilogue_dry_run(monkeypatch) -> None:
    """bench_epilogue end to end on the CPU (Inductor's C++ code, a stub timer) on one tiny GEGLU shape: every
    variant timed, nd tiling bit-equal to exact (the same ops), the tanh forms move few codes, Inductor's code
    kept for exact and nd, the rowwise GEMM's output close to the tensorwise GEMM's epilogue."""
    monkeypatch.setattr(BK, "DEV", "cpu")
    monkeypatch.setattr(BK, "graphed_ms", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(BK, "EPI_SHAPES", (("geglu_tiny", 16, 64, 256),))
    r = BK.bench_epilogue(2)
    (row,) = r["rows"]
    assert {f"{v}_ms" for v in ("floor", "exact", "nd", "noepi", "tanh", "fast")} <= set(row)
    assert row["nd_bit_equal"] and row["m"] == 32
    assert 0 <= row["fast_code_diff"] < 0.05 and 0 <= row["tanh_code_diff"] < 0.05
    assert set(r["code"]) == {"geglu_tiny_exact", "geglu_tiny_nd"} and all(r["code"].values())
    assert row["gemm_rowwise_bias_max_diff"] < 0.1  # outputs ~0.3: wrong scales or bias would show
