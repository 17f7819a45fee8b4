"""CLI: msfp-compile / msfp-sample end to end (in-process and as console scripts) and every user error.

A user error must print ONE line ``msfp-compile: error: ...`` naming the file or option, exit 2 and leave no output.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from msfp_compiler.cli import compile_main, sample_main
from msfp_compiler.load import save_checkpoint
from tests.conftest import make_unet_min

# Cheap but complete: 2 samples x 3 steps, one act and one weight candidate family each (the search is tested
# elsewhere); the one-block UNet2DModel keeps the ONNX export short.
FAST = ["--calib-samples", "2", "--calib-steps", "3", "--calib-groups", "3", "--formats", "e2m1,ue3m1",
        "--weight-formats", "e2m1", "--seed", "3"]
FX_PASSES = ["annotate_sign", "select_format", "insert_qdq", "fold_zero_point", "pack_weights"]


def _call(main, argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors exit from parse_args
        return int(e.code or 0)


@pytest.fixture(autouse=True)
def _restore_msfp_logger():
    """The CLI installs a stderr handler on the 'msfp' logger; do not leak it into other tests."""
    lg = logging.getLogger("msfp")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    yield
    lg.handlers[:], lg.level, lg.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return make_unet_min(seed=4)


@pytest.fixture(scope="module")
def model_pt(workdir: Path, unet) -> Path:
    return save_checkpoint(unet, workdir / "model.pt")


@pytest.fixture(scope="module")
def full_run(workdir: Path, model_pt: Path) -> dict:
    """One in-process compile with every reporting option: --log-dir --dump-graph --plots --check --summary."""
    out, logs = workdir / "out" / "model.onnx", workdir / "logs"
    out.parent.mkdir()
    lg = logging.getLogger("msfp")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = _call(compile_main, [model_pt, "--out", out, "--log-dir", logs, "--dump-graph", "--plots", "--check",
                                  "--summary", *FAST])
    lg.handlers[:], lg.level, lg.propagate = saved
    return {"rc": rc, "out": out, "logs": logs, "stdout": so.getvalue(), "stderr": se.getvalue()}


# ---------------------------------------------------------------------------------------------------------------
# success paths


def test_compile_checkpoint_in_process(full_run) -> None:
    assert full_run["rc"] == 0, full_run["stderr"]
    out = full_run["out"]
    assert out.is_file() and out.stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp files
    m = re.search(r"wrote .*model\.onnx .*: (\d+) msfp nodes", full_run["stdout"])
    assert m and int(m.group(1)) > 0, full_run["stdout"]
    sess = ort.InferenceSession(str(out))
    x = torch.randn(2, 1, 8, 8).numpy()
    (y,) = sess.run(None, {"sample": x, "timestep": torch.tensor([10, 900]).numpy()})
    assert y.shape == (2, 1, 8, 8)
    # verbose by default: the pass log goes to stderr
    assert "select_format" in full_run["stderr"]


def test_check_prints_ort_vs_torch_line(full_run) -> None:
    m = re.search(r"ORT vs torch: median rel-RMSE ([0-9.e+-]+) \(tolerance ([0-9.e+-]+)\)", full_run["stdout"])
    assert m, full_run["stdout"]
    assert float(m.group(1)) <= float(m.group(2)) == 1e-3


def test_summary_table(full_run) -> None:
    lines = full_run["stdout"].splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tensor") and "format" in ln)
    rows = [ln.split() for ln in lines[head + 1:] if ln.strip()]
    assert rows and {r[1] for r in rows} == {"act", "weight"}
    assert {r[2] for r in rows} <= {"e2m1", "ue3m1", "int8", "uint8"}


def test_pass_logs(full_run) -> None:
    logs = full_run["logs"]
    rows = [json.loads(line) for line in (logs / "passes.jsonl").read_text().splitlines()]
    names = [r["pass"] for r in rows]
    assert names == ["capture", *FX_PASSES, "lower_onnx"]  # one line per pass (and per non-fx stage)
    for r in rows:
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert r["peak_rss_mb"] > 0
    fx = {r["pass"]: r for r in rows if r["pass"] in FX_PASSES}
    assert all(r["nodes_after"] > 0 for r in fx.values())
    assert fx["insert_qdq"]["nodes_after"] > fx["insert_qdq"]["nodes_before"]
    assert fx["insert_qdq"]["quantize_nodes"] > 0 and fx["annotate_sign"]["timestep_groups"] == 3
    text = (logs / "passes.log").read_text()
    blocks = re.findall(r"^== pass (\d+): (\S+)\s+([0-9.]+)s", text, flags=re.M)
    assert [b[1] for b in blocks] == names
    assert [int(b[0]) for b in blocks] == list(range(len(names)))
    # select_format's block has one line per quantized tensor with its format
    sel = text.split("== pass 2: select_format")[1].split("== pass 3")[0]
    assert re.search(r"act\s+(e2m1|ue3m1)\s+scale", sel) and "weight" in sel


def test_dump_graph_files(full_run) -> None:
    logs = full_run["logs"]
    dumps = sorted(p.name for p in logs.glob("graph_*.txt"))
    assert [re.sub(r"^graph_\d+_|\.txt$", "", d) for d in dumps] == FX_PASSES
    insert = next(logs.glob("graph_*_insert_qdq.txt")).read_text()
    annotate = next(logs.glob("graph_*_annotate_sign.txt")).read_text()
    assert "msfp.quantize" in insert and "msfp.quantize" not in annotate
    assert "msfp.dequantize_packed" in next(logs.glob("graph_*_pack_weights.txt")).read_text()


def test_plots(full_run) -> None:
    from PIL import Image

    plots = full_run["logs"] / "plots"
    rows = [json.loads(line) for line in (full_run["logs"] / "passes.jsonl").read_text().splitlines()]
    n_act = next(r for r in rows if r["pass"] == "annotate_sign")["activations"]
    hists = sorted(plots.glob("hist_*.png"))
    assert len(hists) == n_act > 0
    for p in [plots / "sign_summary.png", hists[0]]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_sample_writes_png(full_run, workdir: Path, capsys) -> None:
    from PIL import Image

    png = workdir / "grid.png"
    rc = _call(sample_main, [full_run["out"], "--out", png, "--steps", "2", "-n", "4", "--threads", "1", "-q"])
    assert rc == 0
    assert f"wrote {png}" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width == im.height > 8  # 2x2 grid of 8x8 images, upscaled
    assert not list(workdir.glob(".grid*"))


def test_trust_pickle_compiles_a_pickled_module(workdir: Path, unet, capsys) -> None:
    pickled = workdir / "module.pt"
    torch.save(unet, pickled)
    out = workdir / "pickled.onnx"
    rc = _call(compile_main, [pickled, "--out", out, "--trust-pickle", "-q", "--no-pack", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()


def _console_script(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.is_file() else shutil.which(name)


def test_console_script_is_deterministic_across_processes(full_run, model_pt: Path, workdir: Path) -> None:
    """The one cross-process determinism test: the console script, in a fresh process with another hash seed (no
    set/dict-order dependence), writes the same ONNX bytes as the in-process compile of the same checkpoint."""
    exe = _console_script("msfp-compile")
    if exe is None:
        pytest.skip("msfp-compile console script not installed (pip install -e .)")
    out = workdir / "proc.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="12345")
    p = subprocess.run([exe, str(model_pt), "--out", str(out), "-q", *FAST], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "", p.stderr  # -q: nothing on stderr
    assert p.stdout.startswith("wrote ")
    a = out.read_bytes()
    assert len(a) > 10_000 and a == full_run["out"].read_bytes(), "same model + seed, different ONNX bytes"


# ---------------------------------------------------------------------------------------------------------------
# user errors: exit 2, one line naming the file or option, no output left behind


@pytest.fixture(scope="module")
def bad_files(workdir: Path, unet, model_pt: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    d = workdir / "bad"
    d.mkdir()
    f = {}
    f["unknown_ext"] = d / "model.txt"
    f["unknown_ext"].write_text("not a model")
    f["no_config_folder"] = d / "folder"
    f["no_config_folder"].mkdir()
    f["safetensors"] = d / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(f["safetensors"]))
    f["corrupt_pt"] = d / "corrupt.pt"
    f["corrupt_pt"].write_bytes(random.Random(0).randbytes(4096))
    f["truncated_pt"] = d / "truncated.pt"
    f["truncated_pt"].write_bytes(model_pt.read_bytes()[:3000])
    f["pickled"] = d / "pickled.pt"
    torch.save(unet, f["pickled"])
    obj = torch.load(model_pt, weights_only=True)
    obj["config"]["block_out_channels"] = [16]
    f["mismatch"] = d / "mismatch.pt"
    torch.save(obj, f["mismatch"])
    obj = torch.load(model_pt, weights_only=True)
    key = "conv_in.weight"
    obj["state_dict"][key] = obj["state_dict"][key].clone()
    obj["state_dict"][key][0, 0, 0, 0] = float("nan")
    f["nan"] = d / "nan.pt"
    torch.save(obj, f["nan"])
    obj = torch.load(model_pt, weights_only=True)
    obj["state_dict"][key] = obj["state_dict"][key] * 1e30  # finite weights, overflowing activations
    f["overflow"] = d / "overflow.pt"
    torch.save(obj, f["overflow"])
    f["a_file"] = d / "somefile.txt"
    f["a_file"].write_text("x")
    return f


def _expect_error(capsys, argv: list, out: Path, *must_contain: str, prog=compile_main) -> str:
    folder = out.parent if out.parent.is_dir() else None
    before = sorted(p.name for p in folder.iterdir()) if folder else None
    rc = _call(prog, argv)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, (rc, cap.err)
    name = "msfp-sample" if prog is sample_main else "msfp-compile"
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), cap.err
    for s in must_contain:
        assert s in lines[0], lines[0]
    assert not out.exists()
    if folder:
        assert sorted(p.name for p in folder.iterdir()) == before, "partial output left behind"
    return lines[0]


def _out(workdir: Path, name: str) -> Path:
    d = workdir / f"out_{name}"
    d.mkdir(exist_ok=True)
    return d / "model.onnx"


def test_error_missing_file(capsys, workdir: Path) -> None:
    out = _out(workdir, "missing")
    _expect_error(capsys, [workdir / "nope.pt", "--out", out], out, "nope.pt", "no such file")


@pytest.mark.parametrize("which,expected", [
    ("unknown_ext", ("model.txt", "unknown model kind")),
    ("no_config_folder", ("folder", "config.json")),
    ("safetensors", ("weights.safetensors", "--config")),  # a bare .safetensors needs --config
    ("pickled", ("pickled.pt", "--trust-pickle")),
    ("mismatch", ("mismatch.pt", "do not match")),  # config does not match the weights
    ("nan", ("nan.pt", "conv_in.weight", "NaN")),
])
def test_error_bad_model_file(capsys, workdir: Path, bad_files, which: str, expected: tuple[str, ...]) -> None:
    out = _out(workdir, which)
    _expect_error(capsys, [bad_files[which], "--out", out], out, *expected)


@pytest.mark.parametrize("which", ["corrupt_pt", "truncated_pt"])
def test_error_corrupt_or_truncated_checkpoint(capsys, workdir: Path, bad_files, which: str) -> None:
    out = _out(workdir, which)
    msg = _expect_error(capsys, [bad_files[which], "--out", out], out, bad_files[which].name, "corrupt or truncated")
    assert "trust" not in msg  # never advise unpickling a damaged file


def test_error_non_finite_calibration(capsys, workdir: Path, bad_files) -> None:
    out = _out(workdir, "overflow")
    _expect_error(capsys, [bad_files["overflow"], "--out", out, "-q", *FAST], out, "non-finite", "calibration")


def test_error_unknown_format(capsys, workdir: Path, model_pt: Path) -> None:
    out = _out(workdir, "fmt")
    _expect_error(capsys, [model_pt, "--out", out, "--formats", "e2m1,fp9"], out, "--formats", "fp9")


@pytest.mark.parametrize("flag,fmt", [("--formats", "e4m3"), ("--weight-formats", "int8"), ("--formats", "e9m9")])
def test_error_format_that_is_not_4bit(capsys, workdir: Path, model_pt: Path, flag: str, fmt: str) -> None:
    out = _out(workdir, "fmt8")
    _expect_error(capsys, [model_pt, "--out", out, flag, fmt], out, flag, fmt, "4-bit")


def test_error_unsigned_weight_format(capsys, workdir: Path, model_pt: Path) -> None:
    out = _out(workdir, "wfmt")
    _expect_error(capsys, [model_pt, "--out", out, "--weight-formats", "ue3m1"], out, "ue3m1", "signed")


@pytest.mark.parametrize("flag,value", [("--scheme", "int3"), ("--granularity", "row"), ("--scheduler", "euler")])
def test_error_unknown_choice(capsys, workdir: Path, model_pt: Path, flag: str, value: str) -> None:
    out = _out(workdir, flag.strip("-"))
    _expect_error(capsys, [model_pt, "--out", out, flag, value], out, flag, value)


def test_error_bad_calibration_size(capsys, workdir: Path, model_pt: Path) -> None:
    out = _out(workdir, "calib0")
    _expect_error(capsys, [model_pt, "--out", out, "--calib-samples", "0", "-q"], out, "--calib-samples")


def test_error_bad_text_len(capsys, workdir: Path, model_pt: Path) -> None:
    out = _out(workdir, "textlen")
    _expect_error(capsys, [model_pt, "--out", out, "--text-len", "0", "-q"], out, "--text-len")


def test_error_output_folder_missing(capsys, workdir: Path, model_pt: Path) -> None:
    out = workdir / "does_not_exist" / "model.onnx"
    _expect_error(capsys, [model_pt, "--out", out], out, "does_not_exist", "does not exist")
    assert not out.parent.exists()


def test_error_output_under_a_file(capsys, workdir: Path, model_pt: Path, bad_files) -> None:
    out = bad_files["a_file"] / "model.onnx"
    _expect_error(capsys, [model_pt, "--out", out], out, "somefile.txt")
    assert bad_files["a_file"].read_text() == "x"


def test_error_output_folder_read_only(capsys, workdir: Path, model_pt: Path) -> None:
    ro = workdir / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            # root ignores permission bits; a procfs folder refuses new files even to root
            ro = Path("/proc/self").resolve()
            if not ro.is_dir() or os.access(ro, os.W_OK):
                pytest.skip("no folder here that this user cannot write to")
        out = ro / "model.onnx"
        _expect_error(capsys, [model_pt, "--out", out], out, ro.name, "not writable")
    finally:
        (workdir / "readonly").chmod(0o755)


def test_error_plots_without_log_dir(capsys, workdir: Path, model_pt: Path) -> None:
    out = _out(workdir, "plots")
    _expect_error(capsys, [model_pt, "--out", out, "--plots"], out, "--plots", "--log-dir")


def test_sample_errors(capsys, workdir: Path) -> None:
    png = workdir / "x.png"
    _expect_error(capsys, [workdir / "nope.onnx", "--out", png], png, "nope.onnx", prog=sample_main)
    bogus = workdir / "bogus.onnx"
    bogus.write_bytes(b"not an onnx model")
    _expect_error(capsys, [bogus, "--out", png], png, "bogus.onnx", "onnxruntime cannot load", prog=sample_main)
    _expect_error(capsys, [bogus, "--out", workdir / "missing" / "x.png"], workdir / "missing" / "x.png",
                  "missing", prog=sample_main)
