"""scikit-learn digits as a tiny image benchmark: data, a feature classifier, DDIM sampling.

Used by the evaluation harness: the classifier supplies features for a digits-FID and an
accuracy check of class-conditional samples; `ddim_sample_torch` is the FP32 torch reference
sampler for the tiny DDPM UNets in examples/digits-{uncond,cond}/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sampling import make_scheduler, sample

#: Number of digit classes; a conditional model may carry one extra "null" row (index 10).
NUM_CLASSES = 10
NULL_CLASS = 10


def load_digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as float32 [N,1,size,size] in [-1,1] and int64 labels [N].

    The 8x8 originals (integer intensities 0..16) are upsampled with *bilinear* interpolation
    (align_corners=False). Bilinear, not bicubic, because it cannot overshoot, so the images stay
    exactly inside [-1,1], the range the DDPM schedulers clip predicted samples to.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1)  # [N,1,8,8]
    images = images / 16.0 * 2.0 - 1.0
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    return images.contiguous(), labels


class DigitClassifier(nn.Module):
    """Small CNN for 16x16 digits: two conv stages, a `feature_dim` bottleneck, a linear head."""

    def __init__(self, size: int = 16, channels: tuple[int, int] = (32, 64), feature_dim: int = 64,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"size must be divisible by 4, got {size}")
        c1, c2 = channels
        self.config: dict[str, Any] = {"size": size, "channels": [c1, c2], "feature_dim": feature_dim,
                                       "num_classes": num_classes}
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(c2 * (size // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) features [B, feature_dim], used for the digits-FID."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.dropout(self.features(x)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Classifier training augmentation: random rotation (+-10 deg), scale (0.9..1.1) and shift (+-1 px) of
    [B, 1, H, W] digits in [-1, 1]; the background stays -1. ``gen`` lives on x's device."""
    b, _, h, _ = x.shape
    dev = x.device
    ang = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, generator=gen, device=dev)
    shift = (torch.rand(b, 2, generator=gen, device=dev) * 2 - 1) * (2.0 / h)  # 1 px in normalized coords
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x+1 so that padding (zeros) equals the background value -1 after shifting back.
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def save_classifier(model: DigitClassifier, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Save weights to `path` (safetensors, config in its metadata) plus a sibling .json."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(model.config)})
    path.with_suffix(".json").write_text(json.dumps({"config": model.config, **(extra or {})}, indent=2) + "\n")


def load_classifier(path: str | Path) -> DigitClassifier:
    """Load a `DigitClassifier` saved by `save_classifier`, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta["config"]) if "config" in meta else {}
    model = DigitClassifier(size=config.get("size", 16), channels=tuple(config.get("channels", (32, 64))),
                            feature_dim=config.get("feature_dim", 64),
                            num_classes=config.get("num_classes", NUM_CLASSES))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_tiny_ddpm(folder: str | Path) -> tuple[nn.Module, Any, torch.Tensor | None]:
    """Load (unet, DDPM scheduler, class-embedding table or None) from an examples/digits-* folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    cls_name = json.loads((folder / "config.json").read_text())["_class_name"]
    unet_cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}[cls_name]
    unet = unet_cls.from_pretrained(str(folder)).eval()
    scheduler = DDPMScheduler.from_pretrained(str(folder))
    emb_path = folder / "class_embedding.safetensors"
    class_embedding = load_file(str(emb_path))["weight"] if emb_path.exists() else None
    return unet, scheduler, class_embedding


@torch.no_grad()
def ddim_sample_torch(unet: nn.Module, scheduler: Any, n: int, steps: int = 50, seed: int = 0,
                      labels: torch.Tensor | None = None, class_embedding: torch.Tensor | nn.Module | None = None,
                      guidance_scale: float = 1.0, batch_size: int = 256, eta: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM sampling in torch (FP32 reference); returns [n,C,H,W] clamped to [-1,1].

    `scheduler` is any diffusers scheduler; its config is reused for a `DDIMScheduler` (for the
    example folders: linear betas, "leading" spacing -> t = 980, 960, ..., 0 for 50 steps,
    set_alpha_to_one=True, x0 clipped to [-1,1]); a re-implementation must match these. The
    initial noise is drawn for all `n` samples at once from a CPU generator seeded with `seed`, so
    results do not depend on `batch_size`. For a conditional UNet pass `labels` [n] and the
    `class_embedding` table [num_classes(+1), D]; the condition is fed as encoder_hidden_states
    [B,1,D]. `guidance_scale != 1` applies classifier-free guidance against the null row (index 10),
    which needs the table to have that row.
    """
    cfg = unet.config
    shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)

    conditional = labels is not None
    if conditional:
        if class_embedding is None:
            raise ValueError("labels given without class_embedding")
        table = class_embedding.weight if isinstance(class_embedding, nn.Module) else class_embedding
        table = table.detach().float()
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if guidance_scale != 1.0 and table.shape[0] <= NULL_CLASS:
            raise ValueError("classifier-free guidance needs a null-class row (index 10)")

    device = next(unet.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size].to(device)
        b = x.shape[0]
        cond = uncond = None
        if conditional:
            cond = table[labels[start:start + b]].unsqueeze(1).to(device)
            if guidance_scale != 1.0:
                uncond = table[NULL_CLASS].expand(b, 1, -1).to(device)
        def eps_fn(x: torch.Tensor, tt: torch.Tensor, cond=cond, uncond=uncond) -> torch.Tensor:
            if not conditional:
                return unet(x, tt).sample
            if uncond is None:
                return unet(x, tt, encoder_hidden_states=cond).sample
            both = unet(torch.cat([x, x]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = both.chunk(2)
            return e_u + guidance_scale * (e_c - e_u)

        # Each batch gets its own generator, only used when eta > 0.
        step_gen = torch.Generator().manual_seed(seed + 1 + start)
        x = sample(eps_fn, x, make_scheduler("ddim", scheduler.config), steps, eta, step_gen)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
