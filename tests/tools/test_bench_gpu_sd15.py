"""tools/bench_gpu_sd15.Recorder.section: an optional phase of the GPU benchmark records its result, or its error,
and the benchmark goes on (the rest of the file needs a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_gpu_sd15  # noqa: E402


def test_section_records_result_or_error(tmp_path, capsys):
    rec = bench_gpu_sd15.Recorder(tmp_path / "gpu.json", {"device": "cpu"})
    rec.section("ok", lambda: {"x": list(range(400))}, log_chars=20)

    def fails() -> None:
        raise RuntimeError("no GPU here")

    rec.section("bad", fails)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["ok"] == {"x": list(range(400))} and saved["device"] == "cpu"
    assert saved["bad"] == {"error": "RuntimeError('no GPU here')"}
    out = capsys.readouterr()
    assert "ok: " + json.dumps(saved["ok"])[:20] + "\n" in out.out + out.err
    assert "RuntimeError: no GPU here" in out.err  # the traceback is printed, not swallowed
    with pytest.raises(KeyboardInterrupt):  # only Exception is a failed phase
        rec.section("stop", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_graphed_run_calls_its_step_with_the_example_inputs():
    calls = []

    class Step:  # a GraphedStep's interface as compiled_baseline uses it: __call__ and the compiled fn
        fn = "compiled"

        def __call__(self, *args):
            calls.append(args)
            return sum(args)

    run = bench_gpu_sd15.GraphedRun(Step(), (1, 2, 3))
    assert run() == 6 and calls == [(1, 2, 3)]
    assert run.step.fn == "compiled"  # what capture_medians captures again


def test_parse_variant_batches_and_errors():
    assert bench_gpu_sd15.parse_variant("gnauto/gntriton:8,1,4") == (["gnauto", "gntriton"], [8, 1, 4])
    assert bench_gpu_sd15.parse_variant("combo:2") == (["combo"], [2])
    assert bench_gpu_sd15.VARIANTS["gntriton"] == ({}, {"group_norm": "triton"})
    # the default build (gnauto: build_fast's defaults) next to the NHWC concatenations, batch 8 then 1, one process
    assert bench_gpu_sd15.parse_variants("gnauto/catnhwc:8,1") == [(["gnauto", "catnhwc"], [8, 1])]
    assert bench_gpu_sd15.VARIANTS["catnhwc"] == ({}, {"cat_nhwc": True})
    assert bench_gpu_sd15.VARIANTS["catnchw"] == ({}, {"cat_nhwc": False})  # the graph before session 16
    assert bench_gpu_sd15.variant_options("splitcat,catnhwc") == ({}, {"split_concat": True, "cat_nhwc": True})
    assert bench_gpu_sd15.VARIANTS["gnauto"][1] == {"group_norm": "auto"}  # what build_fast does by default
    for bad in ("gntriton", "welford:8", "gnauto/welford:8", "gntriton:8,x", "geglu", "geglu_fused:8",
                "lnquant:8"):
        with pytest.raises(ValueError, match="--variant"):
            bench_gpu_sd15.parse_variant(bad)
    with pytest.raises(ValueError, match="unknown variant 'geglu'"):  # removed in session 16 (docs/triton.md)
        bench_gpu_sd15.parse_variant("gnauto/geglu:8")
    with pytest.raises(ValueError, match="unknown variant 'lnquant'"):  # removed in session 17 (docs/triton.md)
        bench_gpu_sd15.parse_variant("gnauto/lnquant:8")
    with pytest.raises(ValueError, match="unknown variant 'lnquant'"):
        bench_gpu_sd15.variant_options("lnquant,catnhwc")
    assert bench_gpu_sd15.parse_variants("gnauto/gntriton/gntriton_splitcat:8+gnauto/gntriton:1,4") == [
        (["gnauto", "gntriton", "gntriton_splitcat"], [8]), (["gnauto", "gntriton"], [1, 4])]
    for bad in ("gnauto:8+", "gnauto:8+welford:1"):
        with pytest.raises(ValueError, match="--variant"):
            bench_gpu_sd15.parse_variants(bad)


def test_variant_combinations_are_one_build():
    """"A,B" is one build with both variants' options (one compile for two levers); a clash or an unknown part is
    a one-line ValueError before any compile."""
    assert bench_gpu_sd15.parse_variant("gnauto/catnhwc,splitcat:8") == (["gnauto", "catnhwc,splitcat"], [8])
    assert bench_gpu_sd15.variant_options("catnhwc,splitcat") == ({}, {"cat_nhwc": True, "split_concat": True})
    assert bench_gpu_sd15.variant_options("combo,gntriton") == ({"combo_kernels": True}, {"group_norm": "triton"})
    assert bench_gpu_sd15.variant_options("gntriton,splitcat") == bench_gpu_sd15.VARIANTS["gntriton_splitcat"]
    assert bench_gpu_sd15.variant_options("gntriton,gntriton_splitcat")[1] == {"group_norm": "triton",
                                                                                 "split_concat": True}
    with pytest.raises(ValueError, match="sets group_norm differently"):
        bench_gpu_sd15.variant_options("gnaten,gntriton")
    for bad in ("conv,im2col:8", "catnhwc,welford:8", "catnhwc,:8", ",catnhwc:1"):
        with pytest.raises(ValueError, match="--variant"):
            bench_gpu_sd15.parse_variant(bad)


def test_variant_build_options_are_build_fast_options():
    """Every variant's build_fast options are accepted by build_fast (names and values; an identity graph on the
    CPU), so a variant cannot fail only after the SD1.5 compile on the device."""
    import torch
    import torch.fx as fx

    from msfp_compiler.export.triton.fast import build_fast

    gm = fx.symbolic_trace(torch.nn.Identity())
    for name, (_, build) in bench_gpu_sd15.VARIANTS.items():
        fast = build_fast(gm, "cpu", weights="packed", **build)
        assert torch.equal(fast(torch.ones(2)), torch.ones(2)), name


def test_output_diff():
    """A variant's output against the headline step's: 0 and equal for the same values, the relative RMS difference
    and the largest difference otherwise (what a --variant row records as output_vs)."""
    import torch

    ref = torch.tensor([3.0, 4.0, 0.0])
    assert bench_gpu_sd15.output_diff(ref.clone(), ref) == {"rel_rmse": 0.0, "max_abs": 0.0, "equal": True}
    got = bench_gpu_sd15.output_diff(torch.tensor([3.0, 4.0, 0.5]), ref)
    assert got == {"rel_rmse": 0.1, "max_abs": 0.5, "equal": False}


def test_variant_rows_compare_outputs(monkeypatch, tmp_path):
    """--skip main --variant gnauto/catnhwc:1 (an A/B without the headline rows): the first variant's step output is
    the reference of the second's (output_vs); with main rows the headline step's output is (time_fast keeps it)."""
    import types

    import torch

    from msfp_compiler.export.triton import fast as FA

    ns = types.SimpleNamespace
    outs = {"gnauto": torch.tensor([3.0, 4.0, 0.0]), "catnhwc": torch.tensor([3.0, 4.0, 0.5])}
    monkeypatch.setattr(FA, "build_fast", lambda gm, dev, weights, **kw: ns(
        report="r", kind="catnhwc" if kw.get("cat_nhwc") else "gnauto"))
    monkeypatch.setattr(bench_gpu_sd15, "inputs", lambda b, ex: (b,))
    monkeypatch.setattr(bench_gpu_sd15, "compile_fast", lambda f, x, mode, row, w: lambda *a: outs[f.kind])
    monkeypatch.setattr(bench_gpu_sd15, "time_fast", lambda *a, **k: None)
    monkeypatch.setattr(bench_gpu_sd15.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_gpu_sd15, "REF_OUT", {})
    args = bench_gpu_sd15.parser().parse_args(["--skip", "main,accuracy,prefetch", "--captures", "1",
                                               "--variant", "gnauto/catnhwc:1"])
    cm = ns(graph_module=None, calibration=ns(batches=[ns(args=(0,))]))
    bench_gpu_sd15.variant(args, bench_gpu_sd15.Recorder(tmp_path / "gpu.json", {}), cm)
    rows = json.loads((tmp_path / "gpu.json").read_text())["variants"]
    assert [r["variant"] for r in rows] == ["gnauto", "catnhwc"] and "output_vs" not in rows[0]
    assert rows[1]["output_vs"] == {"ref": "gnauto", "rel_rmse": 0.1, "max_abs": 0.5, "equal": False}
    bench_gpu_sd15.REF_OUT[(1, args.weights.split(",")[0])] = (outs["catnhwc"], "main")  # as time_fast keeps it
    bench_gpu_sd15.variant(args, bench_gpu_sd15.Recorder(tmp_path / "gpu2.json", {}), cm)
    rows = json.loads((tmp_path / "gpu2.json").read_text())["variants"]
    assert [r["output_vs"]["ref"] for r in rows] == ["main", "main"] and rows[1]["output_vs"]["equal"]


@pytest.mark.parametrize("time_each", [False, True])
def test_measure_compile_order(monkeypatch, tmp_path, time_each):
    """measure compiles every batch size's W4A4 step before the warm-up wait and the timings, or with --time-each
    each batch size's just before its own timings (a run cut short keeps the rows it timed)."""
    import types

    from msfp_compiler.export.triton import fast as FA

    events = []
    ns = types.SimpleNamespace
    monkeypatch.setattr(FA, "build_fast", lambda gm, dev, **k: ns(report="r"))
    monkeypatch.setattr(FA, "weight_bytes", lambda f: 1)
    for name, fn in {"inputs": lambda b, ex: (b,), "bf16_inputs": lambda x: x, "conv_tuning": lambda b: [],
                     "capture_medians": lambda *a: [1.0, 1.0],
                     "cached_modes": lambda *a: ["default-graph"], "save_profiles": lambda *a: None,
                     "wait_warm": lambda w, t: events.append("wait") or {},
                     "build_sd15": lambda: ns(unet=ns(to=lambda *a: ns(eval=lambda: None)))}.items():
        monkeypatch.setattr(bench_gpu_sd15, name, fn)

    def compile_fast(f, x, mode, row, w):
        events.append(f"compile {row['batch']}")
        return ns(fn=None)

    def time_fast(c, x, row, w, iters, prof, tag=""):
        events.append(f"time {row['batch']}")
        row[f"w4a4_{w}"] = {"median_ms": 1.0}

    def time_baselines(unet, xb, row, modes, iters, prof, captures):
        row["bf16_compile_default_graph_capture_medians"] = [1.5]

    monkeypatch.setattr(bench_gpu_sd15, "compile_fast", compile_fast)
    monkeypatch.setattr(bench_gpu_sd15, "time_fast", time_fast)
    monkeypatch.setattr(bench_gpu_sd15, "time_baselines", time_baselines)
    monkeypatch.setattr(bench_gpu_sd15.torch.cuda, "max_memory_allocated", lambda: 0)
    args = bench_gpu_sd15.parser().parse_args(["--batches", "8,1", "--captures", "3", "--skip", "accuracy,prefetch"]
                                              + (["--time-each"] if time_each else []))
    cm = ns(graph_module=None, calibration=ns(batches=[ns(args=(0,))]))
    rows = bench_gpu_sd15.measure(args, bench_gpu_sd15.Recorder(tmp_path / "gpu.json", {}), cm, 2, [8, 1], (None, None))
    assert events == (["compile 8", "wait", "time 8", "compile 1", "time 1"] if time_each
                      else ["compile 8", "compile 1", "wait", "time 8", "time 1"])
    assert [r["speedup_over_captures"] for r in rows] == [1.5, 1.5]



def test_flash_tile_option():
    """--flash-tile reads bench_gpu_kernels' flashfp8 tile names; anything else is a one-line error (exit 2)
    before any GPU work; tfp8attn is build_fast(attention="fp8-triton")."""
    assert bench_gpu_sd15.parse_flash_tile("128x64w4s3e16") == (128, 64, 4, 3, True)
    assert bench_gpu_sd15.parse_flash_tile("64x128w8s4") == (64, 128, 8, 4, False)
    assert bench_gpu_sd15.VARIANTS["tfp8attn"] == ({}, {"attention": "fp8-triton"})
    assert bench_gpu_sd15.VARIANTS["cdt"] == ({"coordinate_descent_tuning": True}, {})
    with pytest.raises(SystemExit) as e:  # a tile nothing would run
        bench_gpu_sd15.main(["--flash-tile", "128x64w4s3"])
    assert e.value.code == 2
    for bad in ("128x64", "128x64w4s3e8", "tile", "96x64w4s3", "128x16w4s3", "128x64w3s3", "0x64w4s3"):
        with pytest.raises(ValueError, match="--flash-tile"):
            bench_gpu_sd15.parse_flash_tile(bad)
        with pytest.raises(SystemExit) as e:
            bench_gpu_sd15.main(["--flash-tile", bad])
        assert e.value.code == 2
