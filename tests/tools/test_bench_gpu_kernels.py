"""tools/bench_gpu_kernels.py's command line (the benches themselves need a GPU)."""

import sys
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
