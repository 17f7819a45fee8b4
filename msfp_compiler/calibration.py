"""Calibration data: (x_t, t, cond) inputs recorded along FP sampler trajectories, grouped by timestep.

The FP UNet is run with a diffusers scheduler (DDIM by default, or the scheduler config shipped in the model
folder) for N steps on M noise samples. Every step's UNet input is kept; steps are grouped into timestep buckets so
statistics and the format search see every part of the trajectory, not only the last steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .capture import UNetSignature, UNetWrapper
from .errors import MsfpError
from .sampling import make_scheduler, sample

__all__ = ["CalibBatch", "TimestepGroup", "CalibrationSet", "collect", "make_cond"]


@dataclass
class CalibBatch:
    sample: torch.Tensor
    timestep: torch.Tensor
    cond: torch.Tensor | None = None

    @property
    def args(self) -> tuple:
        return (self.sample, self.timestep) + ((self.cond,) if self.cond is not None else ())


@dataclass
class TimestepGroup:
    t_lo: int
    t_hi: int
    batches: list[CalibBatch] = field(default_factory=list)


@dataclass
class CalibrationSet:
    groups: list[TimestepGroup]
    holdout: list[CalibBatch] = field(default_factory=list)  # same trajectories' distribution, unseen by the search

    @property
    def batches(self) -> list[CalibBatch]:
        return [b for g in self.groups for b in g.batches]


def make_cond(sig: UNetSignature, n: int, generator: torch.Generator, class_embedding: torch.Tensor | None = None):
    """Conditioning for calibration: class-embedding rows when the model ships a table, random labels or states."""
    if sig.cond is None:
        return None
    if sig.cond == "class_labels":
        return torch.randint(0, max(sig.num_classes, 1), (n,), generator=generator)
    if class_embedding is not None:
        labels = torch.randint(0, min(10, class_embedding.shape[0]), (n,), generator=generator)
        return class_embedding[labels].unsqueeze(1).float()
    return torch.randn(n, sig.cond_len, sig.cond_dim, generator=generator)


@torch.no_grad()
def collect(unet: torch.nn.Module, sig: UNetSignature, num_samples: int = 8, num_steps: int = 10, seed: int = 0,
            scheduler=None, num_groups: int = 4, holdout_samples: int = 2,
            class_embedding: torch.Tensor | None = None, progress: bool | None = None) -> CalibrationSet:
    """Run the FP model along sampler trajectories and keep every step's inputs, grouped by timestep."""
    if num_samples < 1 or num_steps < 1:
        raise MsfpError(f"CalibConfig.num_samples and CalibConfig.num_steps must be >= 1 (got {num_samples}, {num_steps})")
    scheduler = scheduler or make_scheduler()
    g = torch.Generator().manual_seed(seed)
    model = UNetWrapper(unet, sig).eval()
    total = num_samples + holdout_samples
    x = torch.randn(total, sig.in_channels, sig.sample_size, sig.sample_size, generator=g)
    cond = make_cond(sig, total, g, class_embedding)
    # Drawn on the CPU, run on the model's device: a CPU and a GPU calibration start from the same numbers.
    device = next(unet.parameters()).device
    x = x.to(device)
    cond = cond.to(device) if cond is not None else None
    steps: list[CalibBatch] = []
    holdout: list[CalibBatch] = []

    def eps_fn(inp: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        """The FP prediction, keeping every step's input (the first num_samples rows for the search)."""
        eps = model(inp, tt, cond)
        if not torch.isfinite(eps).all():
            raise MsfpError(f"non-finite noise prediction during calibration at timestep {int(tt[0])} (check the weights)")
        c = cond[:num_samples] if cond is not None else None
        steps.append(CalibBatch(inp[:num_samples].clone(), tt[:num_samples], c))
        if holdout_samples:
            hc = cond[num_samples:] if cond is not None else None
            holdout.append(CalibBatch(inp[num_samples:].clone(), tt[num_samples:], hc))
        return eps

    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=num_steps, desc="calibration", disable=not show, leave=False) as bar:
        sample(eps_fn, x, scheduler, num_steps, on_step=bar.update)
    num_groups = max(1, min(num_groups, len(steps)))
    bounds = torch.linspace(0, len(steps), num_groups + 1).round().long().tolist()
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ts = [int(s.timestep[0]) for s in steps[a:b]]
        groups.append(TimestepGroup(min(ts), max(ts), steps[a:b]))
    return CalibrationSet(groups, holdout)
