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
# full_run and the compiles compared with it byte for byte: the default 8-bit layers plus one named by module path
KEEP_8BIT = ["--keep-8bit", "first,last,down_blocks.0.resnets.0.conv1"]
FX_PASSES = ["annotate_sign", "select_format", "insert_qdq", "fold_zero_point", "pack_weights"]


def _call(main, argv: list[str]) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors exit from parse_args
        return int(e.code or 0)


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
    """One in-process compile with every reporting option: --log-dir --dump-graph --plots --check --summary (and
    --keep-8bit naming a layer by module path)."""
    out, logs = workdir / "out" / "model.onnx", workdir / "logs"
    out.parent.mkdir()
    lg = logging.getLogger("msfp")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    so, se = io.StringIO(), io.StringIO()
    old = os.environ.get("MSFP_PROGRESS_INTERVAL")
    os.environ["MSFP_PROGRESS_INTERVAL"] = "0"  # a progress line at every update: stderr is not a terminal here
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            rc = _call(compile_main, [model_pt, "--out", out, "--log-dir", logs, "--dump-graph", "--plots", "--check",
                                      "--summary", *KEEP_8BIT, *FAST])
    finally:
        os.environ.pop("MSFP_PROGRESS_INTERVAL") if old is None else os.environ.__setitem__("MSFP_PROGRESS_INTERVAL", old)
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
    # output files get the umask's mode (0644 under umask 022), not mkstemp's 0600
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_progress_lines_without_a_terminal(full_run) -> None:
    err = full_run["stderr"]
    for what in ("calibration (4 samples x 3 steps + activation statistics)", "format search:"):
        assert re.search(rf"^{re.escape(what)}.*\d+/\d+ .*elapsed, ~.* left", err, re.M), (what, err[-3000:])
    assert re.search(r"msfp-compile: .*model\.pt \(UNet2DModel, [0-9.]+M parameters\) loaded in", err)

def test_check_prints_a_pass_line(full_run) -> None:
    m = re.search(r"^check PASS: ORT matches torch at (\d+) quantizers and the output on (\d+) held-out samples "
                  r"\(tolerance 1e-03\); (\d+) rounding flips", full_run["stdout"], re.M)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 2 * 3, full_run["stdout"]  # 2 held out x 3 steps


def test_summary_table(full_run) -> None:
    lines = full_run["stdout"].splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("tensor") and "format" in ln)
    rows = [ln.split() for ln in lines[head + 1:] if ln.strip()]
    assert rows and {r[1] for r in rows} == {"act", "weight"}
    assert {r[2] for r in rows} <= {"e2m1", "ue3m1", "int8", "uint8"}
    # tensors are named by module path (conv_in.input, down_blocks.0.resnets.0.conv1.input, ...), not fx nodes
    names = [r[0] for r in rows]
    assert "conv_in.input" in names and "conv_in.weight" in names
    assert any(n.startswith("down_blocks.0.resnets.0.") for n in names)
    assert not any(re.fullmatch(r"(silu|conv2d|clone|cat|transpose)(_\d+)?", n) for n in names), names


def test_pass_logs(full_run) -> None:
    logs = full_run["logs"]
    rows = [json.loads(line) for line in (logs / "passes.jsonl").read_text().splitlines()]
    names = [r["pass"] for r in rows]
    # one line per pass and per non-fx stage, --check and --plots included
    assert names == ["capture", "calibrate", *FX_PASSES, "lower_onnx", "plots", "check"]
    for r in rows:
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        assert r["peak_rss_mb"] > 0
    stage = {r["pass"]: r for r in rows}
    assert stage["capture"]["nodes_before"] == 0 and stage["capture"]["nodes_after"] > 100  # not "0 -> 0"
    assert stage["calibrate"]["samples"] == 2 and stage["calibrate"]["steps"] == 3
    assert stage["check"]["ok"] is True and stage["check"]["quantizers"] > 0 and stage["plots"]["files"] > 1
    assert stage["pack_weights"]["fp32_bytes"] > 0 and "freed_bytes" not in stage["pack_weights"]
    fx = {r["pass"]: r for r in rows if r["pass"] in FX_PASSES}
    assert all(r["nodes_after"] > 0 for r in fx.values())
    assert fx["insert_qdq"]["nodes_after"] > fx["insert_qdq"]["nodes_before"]
    assert fx["insert_qdq"]["quantize_nodes"] > 0 and fx["annotate_sign"]["timestep_groups"] == 3
    text = (logs / "passes.log").read_text()
    blocks = re.findall(r"^== pass (\d+): (\S+)\s+([0-9.]+)s", text, flags=re.M)
    assert [b[1] for b in blocks] == names
    assert [int(b[0]) for b in blocks] == list(range(len(names)))
    # select_format's block has one line per quantized tensor with its format
    sel = text.split("== pass 3: select_format")[1].split("== pass 4")[0]
    assert re.search(r"act\s+(e2m1|ue3m1)\s+scale", sel) and "weight" in sel
    assert re.search(r"^   down_blocks\.0\.resnets\.0\.conv1\.input\s+act ", sel, re.M), sel  # module paths
    assert "check PASS" in text and re.search(r"== pass 1: calibrate .*\n.*samples: 2", text)
    assert re.search(r"== pass 0: capture .*nodes 0 -> \d+", text)


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
    assert (plots / "hist_conv_in.input.png").is_file()  # named by module path
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


def _console_script(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.is_file() else shutil.which(name)


def test_console_script_is_deterministic_across_processes(full_run, workdir: Path, unet) -> None:
    """The one cross-process determinism test, and --trust-pickle end to end: the console script, in a fresh process
    with another hash seed (no set/dict-order dependence), compiles the pickled module of the checkpoint's weights to
    the same ONNX bytes as the in-process compile of the checkpoint (loading either way changes nothing; a second
    compile in one process is checked in test_onnx)."""
    exe = _console_script("msfp-compile")
    if exe is None:
        pytest.skip("msfp-compile console script not installed (pip install -e .)")
    pickled, out = workdir / "module.pt", workdir / "proc.onnx"
    torch.save(unet, pickled)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="12345")
    p = subprocess.run([exe, str(pickled), "--out", str(out), "--trust-pickle", "-q", *KEEP_8BIT, *FAST],
                       capture_output=True, text=True, env=env, timeout=600)
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
    assert rc == 2, (rc, cap.err)
    name = "msfp-sample" if prog is sample_main else "msfp-compile"
    # the error is one line, the last; what comes before it is progress ("msfp-compile: loading ..."), no traceback
    errors = [ln for ln in cap.err.strip().splitlines() if ": error: " in ln]
    lines = errors[-1:]
    assert len(errors) == 1 and cap.err.strip().splitlines()[-1] == errors[0], cap.err
    assert errors[0].startswith(f"{name}: error: ") and "Traceback" not in cap.err, cap.err
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
    msg = _expect_error(capsys, [bad_files[which], "--out", out], out, *expected)
    assert "load_model." not in msg  # the library names its parameters, the CLI its flags


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


# ---------------------------------------------------------------------------------------------------------------
# arguments and output paths are checked before the model loads: with a corrupt model file, the error must still
# be about the option (a check after loading would report the corrupt file instead)


@pytest.mark.parametrize("extra,expected", [
    (["--calib-samples", "0"], ("--calib-samples must be >= 1",)),
    (["--calib-steps", "0"], ("--calib-steps must be >= 1",)),
    (["--calib-groups", "0"], ("--calib-groups must be >= 1",)),
    (["--calib-groups", "5", "--calib-steps", "3"], ("--calib-groups 5 exceeds --calib-steps 3",)),
    (["--text-len", "0"], ("--text-len",)),
    (["--finetune-steps", "-5"], ("--finetune-steps must be >= 0 (got -5)",)),
    (["--finetune-steps", "3", "--num-loras", "0"], ("--num-loras must be >= 1",)),
    (["--finetune-steps", "3", "--lora-rank", "0"], ("--lora-rank must be >= 1",)),
    (["--no-dfa"], ("--no-dfa", "--finetune-steps")),
    (["--finetune-holdout", "4"], ("--finetune-holdout", "--finetune-steps")),
    (["--finetune-trajectories", "mixed"], ("--finetune-trajectories", "--finetune-steps")),
    (["--finetune-samples", "64"], ("--finetune-samples", "--finetune-steps")),
    (["--no-lora-8bit"], ("--no-lora-8bit", "--finetune-steps")),
    (["--finetune-steps", "3", "--finetune-holdout", "-1"], ("--finetune-holdout must be >= 0 (got -1)",)),
    (["--tolerance", "1e-3"], ("--tolerance only applies with --check",)),
    (["--check", "--tolerance", "0"], ("--tolerance must be > 0",)),
    (["--dump-graph"], ("--dump-graph needs --log-dir",)),
    (["--plots"], ("--plots needs --log-dir",)),
    (["--config", "nope.json"], ("--config nope.json", "no such file")),
    (["--formats", "e2m1,fp9"], ("--formats", "fp9")),
    (["--conv-weights", "float16"], ("--conv-weights: unknown 'float16'", "float32:F")),
    (["--conv-weights", "float32:0"], ("--conv-weights: unknown 'float32:0'", "0 < F <= 1")),
    (["--conv-weights", "float32:x"], ("--conv-weights: unknown 'float32:x'",)),
])
def test_error_arguments_before_loading(capsys, workdir: Path, bad_files, extra: list, expected: tuple) -> None:
    out = _out(workdir, "args")
    _expect_error(capsys, [bad_files["corrupt_pt"], "--out", out, *extra], out, *expected)


@pytest.mark.parametrize("where,expected", [
    ("folder", ("is a folder",)),
    ("proc", ("/proc", "not writable")),
    ("under_file", ("somefile.txt is a file, not a folder",)),
    ("missing", ("does not exist",)),
])
def test_error_output_paths_before_loading(capsys, workdir: Path, bad_files, where: str, expected: tuple) -> None:
    out = {"folder": workdir, "proc": Path("/proc/msfp_model.onnx"),
           "under_file": bad_files["a_file"] / "model.onnx", "missing": workdir / "nope" / "model.onnx"}[where]
    rc = _call(compile_main, [bad_files["corrupt_pt"], "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("msfp-compile: error: --out "), err  # nothing loaded
    for s in expected:
        assert s in err[0], err[0]


@pytest.mark.parametrize("flag", ["--save-pt2", "--finetune-checkpoint", "--log-dir"])
def test_error_other_output_paths(capsys, workdir: Path, bad_files, flag: str) -> None:
    out = _out(workdir, "other")
    extra = ["--finetune-steps", "1"] if flag == "--finetune-checkpoint" else []
    target = bad_files["a_file"] / "sub" / "x"
    msg = _expect_error(capsys, [bad_files["corrupt_pt"], "--out", out, flag, target, *extra], out, flag,
                        "somefile.txt is a file")
    assert "Traceback" not in msg


def test_error_log_dir_not_creatable(capsys, workdir: Path, bad_files) -> None:
    out = _out(workdir, "logdir")
    _expect_error(capsys, [bad_files["corrupt_pt"], "--out", out, "--log-dir", "/proc/msfp_logs"], out,
                  "--log-dir /proc/msfp_logs")


@pytest.mark.parametrize("keep,expected", [
    ("first,nosuchlayer", ("--keep-8bit: unknown layer 'nosuchlayer'",)),
    ("down_blocks.0.resnet.0.conv1", ("did you mean down_blocks.0.resnets.0.conv1",)),
])
def test_error_unknown_layer_names(capsys, workdir: Path, model_pt: Path, keep: str, expected: tuple) -> None:
    out = _out(workdir, "keep")
    _expect_error(capsys, [model_pt, "--out", out, "--keep-8bit", keep, "-q", *FAST], out, *expected)


def test_error_w8a8_finetune_without_8bit_loras(capsys, workdir: Path, model_pt: Path) -> None:
    """Every layer at 8 bits with --no-lora-8bit leaves fine-tuning nothing to train: one line naming the flag,
    exit code 2, no output file (not autograd's "does not require grad")."""
    out = _out(workdir, "w8a8")
    _expect_error(capsys, [model_pt, "--out", out, "--keep-8bit", "*", "--finetune-steps", "1", "--no-lora-8bit",
                           "-q", *FAST], out, "no 4-bit weight to attach a LoRA to", "--no-lora-8bit")


def test_keep_8bit_by_module_path(full_run) -> None:
    """full_run's --keep-8bit first,last,down_blocks.0.resnets.0.conv1: the named conv (weight and input) is 8-bit
    next to the default first and last layers; the input of its sibling conv2 stays 4-bit."""
    assert full_run["rc"] == 0, full_run["stderr"]
    rows = {r[0]: r for r in (ln.split() for ln in full_run["stdout"].splitlines()) if len(r) > 3 and r[1] in
            ("act", "weight")}
    for layer in ("down_blocks.0.resnets.0.conv1", "conv_in", "conv_out"):
        assert rows[f"{layer}.weight"][2:4] == ["int8", "8"] and rows[f"{layer}.input"][3] == "8", layer
    assert rows["down_blocks.0.resnets.0.conv2.input"][3] == "4"


def test_failed_check_prints_fail_exits_1_and_writes_nothing(workdir: Path, model_pt: Path, capsys,
                                                             monkeypatch) -> None:
    import onnx
    from onnx import numpy_helper

    import msfp_compiler.export.onnx as lowering

    real = lowering.lower_to_onnx

    def buggy(*a, **k):  # a lowering bug in one layer: one activation scale 1.5x too large
        model, counts = real(*a, **k)
        (nd,) = [n for n in model.graph.node if n.domain == "msfp" and n.op_type.startswith("Quantize")][2:3]
        (t,) = [t for t in model.graph.initializer if t.name == nd.input[1]]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        return model, counts

    monkeypatch.setattr(lowering, "lower_to_onnx", buggy)
    out = _out(workdir, "failcheck")
    before = sorted(p.name for p in out.parent.iterdir())
    rc = _call(compile_main, [model_pt, "--out", out, "--check", "-q", *FAST])
    cap = capsys.readouterr()
    assert rc == 1, cap.err
    assert re.search(r"^check FAIL at \S+\.input \(quantize\S*\): .*not on this quantizer's", cap.out, re.M), cap.out
    assert "not written" in cap.err and not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == before
    del onnx


def test_activation_summary_names_formats_not_fp4() -> None:
    from types import SimpleNamespace

    from msfp_compiler.cli import _act_formats_line
    from msfp_compiler.compile import LayerSummary

    def act(fmt, bits=4):
        return LayerSummary("n", "act", fmt, bits, not fmt.startswith("u"), False, 0.0, 0.0, [])

    int4 = SimpleNamespace(layers=[act("uint4")] * 3 + [act("uint8", 8)])
    assert _act_formats_line(int4) == "3 unsigned (uint4 3), 1 at 8 bits"
    msfp = SimpleNamespace(layers=[act("ue2m2"), act("e2m1"), act("ue3m1"), act("e2m1")])
    assert _act_formats_line(msfp) == "2 unsigned (ue2m2 1, ue3m1 1), 2 signed (e2m1 2)"


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from msfp_compiler.cli import compile_parser, sample_parser; compile_parser(); "
            "sample_parser(); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_scheme_names_and_lora_rank_match_config() -> None:
    from msfp_compiler.cli import LORA_RANK, SCHEME_NAMES, TRAJECTORIES
    from msfp_compiler.config import SCHEME_NAMES as CONFIG_SCHEME_NAMES
    from msfp_compiler.config import TRAJECTORIES as CONFIG_TRAJECTORIES
    from msfp_compiler.config import FinetuneConfig

    assert sorted(SCHEME_NAMES) == sorted(CONFIG_SCHEME_NAMES)
    assert LORA_RANK == FinetuneConfig.rank
    assert TRAJECTORIES == CONFIG_TRAJECTORIES


def test_library_field_names_become_flags() -> None:
    from msfp_compiler.cli import flag_message

    assert flag_message("QuantConfig.keep_8bit: unknown layer 'x'") == "--keep-8bit: unknown layer 'x'"
    assert flag_message("CalibConfig.num_samples must be >= 1") == "--calib-samples must be >= 1"


@pytest.fixture(scope="module")
def cond_onnx(workdir: Path) -> Path:
    """An ONNX that takes encoder_hidden_states (the sampler's argument checks read only the inputs)."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 1, 8, 8]),
           helper.make_tensor_value_info("timestep", TensorProto.INT64, ["batch"]),
           helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", 1, 16])]
    g = helper.make_graph([helper.make_node("Identity", ["sample"], ["noise_pred"])], "g", ins,
                          [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", 1, 8, 8])])
    p = workdir / "cond.onnx"
    onnx.save(helper.make_model(g), str(p))
    return p


@pytest.mark.parametrize("which,extra,expected", [
    ("uncond", ["--labels", "1,2"], ("--labels", "unconditional")),
    ("uncond", ["--class-embedding", "EMB"], ("--class-embedding", "unconditional")),
    ("cond", ["--labels", "1,2"], ("--labels needs --class-embedding", "encoder_hidden_states")),
    ("cond", ["--labels", "one"], ("--labels: expected integers",)),
    ("cond", ["--steps", "0"], ("--steps must be >= 1",)),
    ("cond", ["-n", "0"], ("-n/--num must be >= 1",)),
    ("cond", ["--class-embedding", "missing.safetensors"], ("--class-embedding missing.safetensors", "no such file")),
])
def test_sample_argument_errors(capsys, workdir: Path, full_run, cond_onnx, bad_files, which, extra, expected) -> None:
    model = full_run["out"] if which == "uncond" else cond_onnx
    extra = [str(bad_files["a_file"]) if a == "EMB" else a for a in extra]
    png = workdir / "args.png"
    _expect_error(capsys, [model, "--out", png, *extra], png, *expected, prog=sample_main)


def test_finetune_trajectories_scale_with_the_model_and_holdout_is_logged(workdir: Path, model_pt: Path, unet) -> None:
    # no --finetune-samples: the size follows the model (distillation.default_finetune_samples), with its rule logged
    from msfp_compiler.capture import signature_of
    from msfp_compiler.distillation import default_finetune_samples

    out, logs = workdir / "ft" / "model.onnx", workdir / "ft_logs"
    out.parent.mkdir()
    lg = logging.getLogger("msfp")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = _call(compile_main, [model_pt, "--out", out, "--log-dir", logs, "--finetune-steps", "2",
                                      "--finetune-sampler-steps", "4", "--finetune-holdout", "2", "--no-pack", *FAST])
    finally:
        lg.handlers[:], lg.level, lg.propagate = saved
    assert rc == 0 and out.is_file()
    rows = {r["pass"]: r for r in map(json.loads, (logs / "passes.jsonl").read_text().splitlines())}
    ft = rows["finetune"]
    n, rule = default_finetune_samples(sum(p.numel() for p in unet.parameters()), 4, signature_of(unet).sample_size)
    assert ft["samples"] == n == 256 and ft["samples_rule"] == rule
    assert ft["holdout_samples"] == 2 and ft["holdout_final_loss"] > 0 and ft["holdout_initial_loss"] > 0
    assert "held-out trajectories" in (logs / "passes.log").read_text()
