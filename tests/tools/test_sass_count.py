"""tools/sass_count.py and tools/inductor_code.py on the CPU: Inductor's generated kernels of session 18's SD1.5
step (results/inductor_code_sd15_b8_session18.tgz) compiled for sm_90 and counted."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import inductor_code  # noqa: E402
import sass_count  # noqa: E402

CODE = ROOT / "results" / "inductor_code_sd15_b8_session18.tgz"


def _run(*args: str) -> subprocess.CompletedProcess:
    """tools/sass_count.py in a process of its own without TRITON_INTERPRET (under the interpreter, which the
    kernel tests of this suite turn on, ``triton.jit`` makes functions Triton cannot compile for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "sass_count.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_counts_an_inductor_kernel(tmp_path: Path) -> None:
    """The GroupNorm + SiLU + quantizer kernel compiles for sm_90 and issues tens of instructions per element (an
    instruction-bound kernel); a 2-D kernel counts YBLOCK x XBLOCK elements per program."""
    pytest.importorskip("triton")
    ks = sass_count.kernels(CODE)
    assert len(ks) > 100 and all("@triton.jit" in v for v in ks.values())
    r = _run(str(CODE), "--kernel", "where_9", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["blocks"] == {"XBLOCK": 1024} and res["elements_per_thread"] == 8
    assert 40 < res["per_element"] < 120 and res["opcodes"]["LDG"] > 0
    r = _run(str(CODE), "--kernel", "where_159", "--block", "y=64", "--block", "x=32",
             "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["blocks"] == {"XBLOCK": 32, "YBLOCK": 64} and res["elements_per_thread"] == 16
    assert res["per_element"] > 40


def test_user_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    """A missing file or a kernel pattern matching none or several kernels: exit 2 with a one-line message."""
    assert sass_count.main(["/nonexistent.py", "--kernel", "x"]) == 2
    assert sass_count.main([str(CODE), "--kernel", "no_such_kernel_name"]) == 2
    assert sass_count.main([str(CODE), "--kernel", "triton_"]) == 2
    assert sass_count.main([str(CODE), "--kernel", "where_9", "--block", "z=4"]) == 2  # not a block of this kernel
    assert sass_count.main([str(CODE), "--kernel", "where_9", "--block", "x=abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and "no such file" in err[0] and "matches 0 of" in err[1] and "matches" in err[2]
    assert all("--block" in e and "XBLOCK" in e for e in err[3:])


def test_inductor_code_collects_output_modules(tmp_path: Path) -> None:
    """Only output-code modules (``def call(``) containing the pattern go into the tarball; a missing cache dir
    exits 2, a pattern no module contains 1."""
    (tmp_path / "c" / "ab").mkdir(parents=True)
    (tmp_path / "c" / "ab" / "keep.py").write_text("def call(args):\n    _scaled_mm\n")
    (tmp_path / "c" / "ab" / "other.py").write_text("def call(args):\n    pass\n")
    (tmp_path / "c" / "ab" / "kernel.py").write_text("_scaled_mm = 1\n")
    out = tmp_path / "code.tgz"
    assert inductor_code.collect(tmp_path / "c", "_scaled_mm", out) == ["ab/keep.py"]
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["ab/keep.py"]
    assert inductor_code.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert inductor_code.main([str(tmp_path / "c"), "--grep", "no_such_text", "--out", str(out)]) == 1
