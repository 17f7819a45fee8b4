"""tools/bench_ort_conv.py: the four lowerings of one conv it times compute the same conv (3x3 and 1x1)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_ort_conv as BC  # noqa: E402


@pytest.mark.parametrize("k", [3, 1])
def test_every_variant_is_the_conv(k: int) -> None:
    models, feeds, exact = BC.variants(12, 5, 6, k, np.random.default_rng(0))
    assert set(models) == {"conv", "dq_conv", "conv_integer", "integer_gemm"}
    for name, m in models.items():
        (y,) = BC._session(m, 1).run(None, feeds[name])
        assert y.shape == (1, 5, 6, 6), name
        assert np.abs(y[0] - exact).max() <= 1e-6 * np.abs(exact).max(), name
