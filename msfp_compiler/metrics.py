"""Image-quality metrics for comparing quantized vs. FP32 samples: Frechet distance, PSNR, MSE, accuracy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn


def _as_f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _gaussian_fit(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = _as_f64(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix via eigh; negative eigenvalues -> 0."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(c1: np.ndarray, c2: np.ndarray) -> float:
    """Tr sqrt(C1 C2) = Tr sqrt(S C2 S) with S = C1^(1/2): the argument is symmetric PSD, so eigh is exact."""
    s = _sqrtm_psd(c1)
    m = s @ c2 @ s
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_scipy(c1: np.ndarray, c2: np.ndarray, eps: float = 1e-6) -> float:
    """Tr sqrtm(C1 C2) with scipy, as in pytorch-fid (adds eps*I when the product is near-singular)."""
    from scipy import linalg

    # Singular covariances are normal here (e.g. dead ReLU feature units); sqrtm then warns although
    # the trace is still accurate. Failures are caught by the finiteness / imaginary-part checks.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(c1 @ c2)
        if not np.isfinite(covmean).all():
            offset = np.eye(c1.shape[0]) * eps
            covmean = linalg.sqrtm((c1 + offset) @ (c2 + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts come from round-off; a large one means sqrtm really failed.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
            return _trace_sqrt_product_eigh(c1, c2)
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                     method: str = "auto") -> float:
    """Frechet distance between Gaussian fits (mean, covariance) of two feature sets [N, D].

    d^2 = |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)), computed in float64.
    method: "scipy" (scipy.linalg.sqrtm), "eigh" (symmetric eigen route), or "auto" (scipy if
    importable, else eigh). The result is clamped at 0 since round-off can make it slightly negative.
    """
    mu_a, c_a = _gaussian_fit(feats_a)
    mu_b, c_b = _gaussian_fit(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dims differ: {mu_a.shape} vs {mu_b.shape}")
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401
            method = "scipy"
        except ImportError:
            method = "eigh"
    if method == "scipy":
        tr_covmean = _trace_sqrt_product_scipy(c_a, c_b)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(c_a, c_b)
    else:
        raise ValueError(f"unknown method {method!r}")
    diff = mu_a - mu_b
    d = float(diff @ diff + np.trace(c_a) + np.trace(c_b) - 2.0 * tr_covmean)
    return max(d, 0.0)


def mse(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean squared error over all elements (float64 accumulation)."""
    a64, b64 = _as_f64(a), _as_f64(b)
    if a64.shape != b64.shape:
        raise ValueError(f"shape mismatch: {a64.shape} vs {b64.shape}")
    return float(np.mean((a64 - b64) ** 2))


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements; inf for identical inputs.

    data_range defaults to 2.0 for images in [-1, 1].
    """
    err = mse(a, b)
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / err)


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of `classifier.features` for images [N,1,H,W] in [-1,1], eval mode."""
    was_training = classifier.training
    classifier.eval()
    feats = [classifier.features(images[i:i + batch_size].float()) for i in range(0, images.shape[0], batch_size)]
    classifier.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of images whose argmax class equals `labels`."""
    was_training = classifier.training
    classifier.eval()
    preds = torch.cat([classifier(images[i:i + batch_size].float()).argmax(1)
                       for i in range(0, images.shape[0], batch_size)])
    classifier.train(was_training)
    return (preds.cpu() == torch.as_tensor(labels).cpu()).float().mean().item()


def fid_digits(classifier: nn.Module, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between the classifier's penultimate features of two image sets."""
    return frechet_distance(classifier_features(classifier, images_a), classifier_features(classifier, images_b))
