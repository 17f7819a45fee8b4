"""tools/bench_gpu_kernels.py's command line (the benches themselves need a GPU)."""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_gpu_kernels as BK  # noqa: E402


@pytest.mark.parametrize("sections", ["geglu", "gnstats,geglu", "gnstat"])
def test_unknown_section_is_an_error(sections: str, capsys: pytest.CaptureFixture) -> None:
    """An unknown (or removed) section exits 2 with a one-line message before any GPU work, not an empty run."""
    with pytest.raises(SystemExit) as e:
        BK.main(["--sections", sections, "--out", "/nonexistent/x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--sections: unknown section" in err and "gnstats" in err


def test_lnquant_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--sections lnquant runs bench_lnquant alone with the parsed --ln-tiles / --ln-fmt and writes its result; a
    tile that is not rows x warps in powers of two is an argument error."""
    seen = {}

    def stub(batch, tiles, fmt):
        seen.update(batch=batch, tiles=tiles, fmt=fmt)
        return {"per_step_ms": {}}

    monkeypatch.setattr(BK, "bench_lnquant", stub)
    monkeypatch.setattr(BK.torch.cuda, "get_device_name", lambda *_: "stub")
    out = tmp_path / "k.json"
    assert BK.main(["--sections", "lnquant", "--batch", "2", "--ln-tiles", "1x2,4x8", "--ln-fmt", "int4",
                    "--out", str(out)]) == 0
    assert seen == {"batch": 2, "tiles": ((1, 2), (4, 8)), "fmt": "int4"}
    assert json.loads(out.read_text())["lnquant"] == {"per_step_ms": {}}
    assert BK.parse_ln_tiles(",".join(f"{b}x{w}" for b, w in BK.LN_TILES)) == BK.LN_TILES
    for bad in ("3x4", "1x4x2", "4"):
        with pytest.raises(SystemExit) as e:
            BK.main(["--sections", "lnquant", "--ln-tiles", bad, "--out", str(out)])
        assert e.value.code == 2


def test_ln_shapes_sd15() -> None:
    """48 LayerNorms a step: per transformer block norm1 without the residual add, norm2 and norm3 with it."""
    shapes = BK.ln_shapes(8)
    assert sum(shapes.values()) == 48 and sum(n for (_, _, res), n in shapes.items() if not res) == 16
    assert shapes[(8 * 64 * 64, 320, True)] == 10 and shapes[(8 * 8 * 8, 1280, False)] == 1


def test_lnquant_dry_run() -> None:
    """bench_lnquant end to end on the CPU: the kernel in Triton's interpreter on tiny shapes, a stub timer, the
    eager reference as the baseline (eager rounds the epilogue and the add to bf16, the kernel's Inductor numerics do
    not: codes within one grid step)."""
    if not BK.torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("no CUDA and TRITON_INTERPRET is off")
    pytest.importorskip("triton")
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 0.01

    dev = "cuda" if BK.torch.cuda.is_available() else "cpu"
    r = BK.bench_lnquant(1, tiles=((1, 4), (4, 8)), device=dev, timer=timer,
                         shapes=Counter({(13, 320, False): 1, (9, 40, True): 2}), compile_fn=lambda f: f)
    step = r["per_step_ms"]
    assert len(calls) == 2 * 3 and step == {"inductor": 0.03, "1x4": 0.03, "4x8": 0.03, "best": 0.03,
                                            "roofline": step["roofline"]}
    assert step["roofline"] == 0.0  # 0.419 ms at SD1.5's batch 8, rounded to 4 decimals on these tiny shapes
    for row in r["rows"]:
        assert row["1x4_g_max"] <= 1 and row["4x8_g_max"] <= 1 and row["1x4_g_off"] < 0.02
        if not row["residual"] and dev == "cpu":  # no add: one float32 epilogue rounded once (no FMA on the CPU)
            assert row["1x4_h_off"] == 0.0


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
    tiles = ((32, 32, 4, 1, False),)
    r = BK.bench_flash_fp8(1, (("tiny", 48, 2, 40, 5),), tiles=tiles, device=dev, pad64=False)
    (row,) = r["rows"]
    name = BK.flash_tile_name(tiles[0])
    assert name == "32x32w4s1" and bench_gpu_sd15.parse_flash_tile(name) == tiles[0]
    assert len(calls) == 2 and row["best"] == name and r["per_step_ms"] == {"bf16_ms": 2.5, "best_ms": 2.5, name: 2.5}
    assert 1e-3 < row[name]["rel_rmse"] < 0.05
