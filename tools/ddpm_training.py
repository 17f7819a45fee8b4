"""The DDPM training step the digits and MNIST training tools share (train_tiny_ddpm.py, train_mnist.py).

eps-MSE on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at uniform t, AdamW with a linear warmup, gradient clipping
at 1.0 and an EMA of the weights with a warmup (so early, bad weights do not dominate a short run). A conditional
model reads its label as a learned class-embedding row fed as encoder_hidden_states [B, 1, D]; a fraction of the
labels is replaced by the null class, so the model also learns the unconditional score.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from msfp_compiler.digits import NULL_CLASS, NUM_CLASSES

__all__ = ["DDPMTrainer", "save_trained", "with_class_embedding"]


def with_class_embedding(unet: nn.Module, dim: int | None) -> nn.ModuleDict:
    """{"unet"[, "class_embedding"]}: with ``dim``, a learned nn.Embedding(NUM_CLASSES + 1, dim), N(0, 1) rows (the
    last row the null class)."""
    trainable = nn.ModuleDict({"unet": unet})
    if dim is not None:
        emb = nn.Embedding(NUM_CLASSES + 1, dim)
        nn.init.normal_(emb.weight, std=1.0)
        trainable["class_embedding"] = emb.to(next(unet.parameters()).device)
    return trainable


@dataclass
class DDPMTrainer:
    """The trainable modules, their EMA copy and AdamW; ``step()`` runs one training step."""

    trainable: nn.ModuleDict  # "unet" and, for a conditional model, "class_embedding"
    scheduler: object  # a diffusers DDPMScheduler (alphas_cumprod, num_train_timesteps)
    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # [N]
    gen: torch.Generator
    lr: float
    warmup_steps: int
    batch_size: int
    ema_decay: float
    cond_dropout: float
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    steps: int = 0
    ema: nn.ModuleDict = field(init=False)

    def __post_init__(self) -> None:
        self.ema = copy.deepcopy(self.trainable).eval().requires_grad_(False)
        self.params, self.ema_params = list(self.trainable.parameters()), list(self.ema.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=1e-2)
        abar = self.scheduler.alphas_cumprod.float().to(self.images.device)
        self.sqrt_ac, self.sqrt_1mac = abar.sqrt(), (1 - abar).sqrt()
        self.n_train = self.scheduler.config.num_train_timesteps

    def step(self) -> torch.Tensor:
        """One optimizer and EMA step; returns the batch loss (detached, not synchronized)."""
        dev, gen, bs = self.images.device, self.gen, self.batch_size
        for g in self.opt.param_groups:  # linear warmup, then constant (the run length is time-based)
            g["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup_steps)
        idx = torch.randint(0, self.images.shape[0], (bs,), generator=gen, device=dev)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.randint(0, self.n_train, (bs,), generator=gen, device=dev)
        xt = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1mac[t].view(-1, 1, 1, 1) * noise
        unet = self.trainable["unet"]
        with self.autocast():
            if "class_embedding" not in self.trainable:
                pred = unet(xt, t).sample
            else:
                y = self.labels[idx].clone()
                y[torch.rand(bs, generator=gen, device=dev) < self.cond_dropout] = NULL_CLASS
                pred = unet(xt, t, encoder_hidden_states=self.trainable["class_embedding"](y).unsqueeze(1)).sample
            loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        decay = min(self.ema_decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params], 1.0 - decay)
        self.steps += 1
        return loss.detach()


def save_trained(ema: nn.ModuleDict, scheduler, out: Path, half: bool = False) -> None:
    """The EMA weights as a diffusers folder (fp16 on disk with ``half``; the loader reads them as FP32), the
    scheduler next to them, and a conditional model's class embedding as class_embedding.safetensors (FP32)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    unet = ema["unet"].to("cpu")
    (unet.half() if half else unet).save_pretrained(str(out), safe_serialization=True)
    scheduler.save_pretrained(str(out))
    if "class_embedding" in ema:
        save_file({"weight": ema["class_embedding"].weight.detach().float().cpu().contiguous()},
                  str(out / "class_embedding.safetensors"))
