"""Tests for msfp_compiler.metrics (Frechet distance, PSNR/MSE, classifier metrics on digits)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from msfp_compiler.digits import load_classifier, load_digit_images
from msfp_compiler.metrics import classifier_accuracy, frechet_distance, fid_digits, mse, psnr

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ROOT / "examples" / "digit_classifier.safetensors"
METHODS = ["scipy", "eigh"]


def _feats(n: int = 400, d: int = 8, seed: int = 0) -> np.ndarray:
    """Correlated, non-centred Gaussian features."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


@pytest.mark.parametrize("method", METHODS)
def test_fd_self_is_zero(method: str) -> None:
    f = _feats()
    assert frechet_distance(f, f, method=method) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_fd_mean_shift_is_exact_and_monotone(method: str) -> None:
    # A pure mean shift leaves the covariance unchanged, so FD = |shift|^2 exactly.
    f = _feats()
    d = f.shape[1]
    shifts = [0.1, 0.3, 1.0, 3.0]
    fds = [frechet_distance(f, f + c, method=method) for c in shifts]
    for c, fd in zip(shifts, fds):
        assert fd == pytest.approx(c * c * d, rel=1e-6)
    assert all(a < b for a, b in zip(fds, fds[1:]))


@pytest.mark.parametrize("method", METHODS)
def test_fd_scaled_copy_closed_form(method: str) -> None:
    # feats_b = 2 feats_a: C_b = 4 C_a and (C_a C_b)^(1/2) = 2 C_a, so FD = |mu_a|^2 + Tr(C_a).
    f = _feats(d=6, seed=3)
    expected = float(f.mean(0) @ f.mean(0) + np.trace(np.cov(f, rowvar=False)))
    assert frechet_distance(f, 2 * f, method=method) == pytest.approx(expected, rel=1e-6)


def test_fd_noise_monotone_and_methods_agree() -> None:
    f = _feats(n=600, d=10, seed=1)
    rng = np.random.default_rng(7)
    noise = rng.normal(size=f.shape)
    prev = 0.0
    for sigma in [0.1, 0.5, 1.0, 2.0]:
        g = f + sigma * noise
        fd_s = frechet_distance(f, g, method="scipy")
        fd_e = frechet_distance(f, g, method="eigh")
        assert fd_s == pytest.approx(fd_e, rel=1e-5, abs=1e-8)
        assert fd_s > prev
        prev = fd_s


def test_fd_torch_input_rank_deficient_and_errors() -> None:
    # Fewer samples than dims -> singular covariances; must still be finite and symmetric.
    a = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    b = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    fab, fba = frechet_distance(a, b), frechet_distance(b, a)
    assert math.isfinite(fab) and fab > 0
    assert fab == pytest.approx(fba, rel=1e-4)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :8])
    with pytest.raises(ValueError):
        frechet_distance(a[:1], b[:1])


def test_psnr_and_mse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert psnr(x, x) == math.inf
    assert mse(x, x) == 0.0
    # Constant error 0.1 in [-1,1] images: MSE 0.01, PSNR = 10 log10(4 / 0.01).
    assert mse(x, x + 0.1) == pytest.approx(0.01, rel=1e-5)
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(400.0), rel=1e-5)
    assert psnr(x, x + 0.1, data_range=1.0) == pytest.approx(10 * math.log10(100.0), rel=1e-5)
    noise = torch.randn(x.shape, generator=g)
    values = [psnr(x, x + s * noise) for s in (0.01, 0.05, 0.2, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        mse(x, x[:2])


@pytest.fixture(scope="module")
def classifier():
    if not CLASSIFIER.exists():
        pytest.fail(f"committed classifier weights missing: {CLASSIFIER}")
    return load_classifier(CLASSIFIER)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digit_images(16)


def test_load_digit_images(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # background and strokes use the full range
    assert set(y.tolist()) == set(range(10))


def test_classifier_accuracy_on_real_digits(classifier, digits) -> None:
    x, y = digits
    assert classifier_accuracy(classifier, x, y) > 0.95
    # Permuted labels must drop to ~chance, so the metric is not trivially high.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    assert classifier_accuracy(classifier, x, y[perm]) < 0.3


def test_fid_digits_orders_corruptions(classifier, digits) -> None:
    x, _ = digits
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = x[perm[:800]], x[perm[800:1600]]
    assert fid_digits(classifier, a, a) == pytest.approx(0.0, abs=1e-3)
    base = fid_digits(classifier, a, b)
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(1))
    fids = [fid_digits(classifier, a, (b + s * noise).clamp(-1, 1)) for s in (0.3, 0.6, 1.2)]
    assert base < fids[0] < fids[1] < fids[2]
