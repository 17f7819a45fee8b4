"""Calibration data: (x_t, t, cond) inputs recorded along FP sampler trajectories, grouped by timestep.

The FP UNet is run with a diffusers scheduler (DDIM by default, or the scheduler config shipped in the model
folder) for N steps on M noise samples. Every step's UNet input is kept; steps are grouped into timestep buckets so
statistics and the format search see every part of the trajectory, not only the last steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import UNetSignature, UNetWrapper
from .errors import MsfpError
from .progress import Progress
from .sampling import make_scheduler, sample

__all__ = ["CalibBatch", "TimestepGroup", "CalibrationSet", "collect", "make_cond", "CALIB_BUDGET",
           "default_calibration"]

# The default calibration size scales with the model: samples x steps x parameters <= CALIB_BUDGET. Every UNet up to
# 150M parameters (the digit models, a CIFAR-10 DDPM) gets the full 8 samples x 10 steps; larger ones keep 2 samples
# and as many steps as fit, but never fewer steps than timestep groups. SD1.5 (860M): 2 x 6. The cost of calibration
# and of the statistics pass is one FP forward per sample and step, so this bounds both (results/bench_compile.json,
# row sd15-defaults).
CALIB_BUDGET = 8 * 10 * 150e6
DEFAULT_SAMPLES, DEFAULT_STEPS, MIN_SAMPLES = 8, 10, 2


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


def default_calibration(num_params: int, num_groups: int = 4, samples: int | None = None,
                        steps: int | None = None) -> tuple[int, int, int, str]:
    """(samples, steps, groups, the rule in words) for a model of ``num_params`` parameters; ``samples`` / ``steps``
    given by the user are kept as they are. See CALIB_BUDGET."""
    fits = int(CALIB_BUDGET // max(num_params, 1))  # sample-steps the budget allows
    given = samples is not None, steps is not None
    if not any(given) and DEFAULT_SAMPLES * DEFAULT_STEPS <= fits:
        limit = CALIB_BUDGET / (DEFAULT_SAMPLES * DEFAULT_STEPS) / 1e6
        return (DEFAULT_SAMPLES, DEFAULT_STEPS, num_groups,
                f"the default for models up to {limit:.0f}M parameters; this one has {num_params / 1e6:.1f}M")
    if samples is None:
        samples = DEFAULT_SAMPLES if steps is None else max(MIN_SAMPLES, min(DEFAULT_SAMPLES, fits // steps))
        if steps is None:
            samples = max(MIN_SAMPLES, min(DEFAULT_SAMPLES, fits // DEFAULT_STEPS))
    if steps is None:
        steps = max(num_groups, min(DEFAULT_STEPS, fits // samples))
    groups = min(num_groups, steps)
    if all(given):
        rule = "as given"
    else:
        rule = (f"{'samples' if not given[0] else ''}{' and ' if not any(given) else ''}"
                f"{'steps' if not given[1] else ''} scaled to the model: samples x steps x parameters <= "
                f"{CALIB_BUDGET:.2g} ({num_params / 1e6:.0f}M parameters)")
    return samples, steps, groups, rule


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
    # The calibration samples are drawn first and the held-out ones after them, and the two sets run as separate
    # batches (a batch's float results depend on its size), so the calibration data and the compiled model do not
    # depend on how many samples are held out (msfp-compile holds out only for --check).
    shape = (sig.in_channels, sig.sample_size, sig.sample_size)
    x = torch.randn(num_samples, *shape, generator=g)
    cond = make_cond(sig, num_samples, g, class_embedding)
    xh = torch.randn(holdout_samples, *shape, generator=g) if holdout_samples else None
    ch = make_cond(sig, holdout_samples, g, class_embedding) if holdout_samples else None
    # Drawn on the CPU, run on the model's device: a CPU and a GPU calibration start from the same numbers.
    device = next(unet.parameters()).device
    steps: list[CalibBatch] = []
    holdout: list[CalibBatch] = []

    def run(x0: torch.Tensor, c0: torch.Tensor | None, keep: list[CalibBatch], bar: Progress) -> None:
        x0 = x0.to(device)
        c0 = c0.to(device) if c0 is not None else None

        def eps_fn(inp: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            """The FP prediction, keeping every step's input."""
            eps = model(inp, tt, c0)
            if not torch.isfinite(eps).all():
                raise MsfpError(f"non-finite noise prediction during calibration at timestep {int(tt[0])} "
                                "(check the weights)")
            keep.append(CalibBatch(inp.clone(), tt, c0))
            return eps

        sample(eps_fn, x0, scheduler, num_steps, on_step=bar.update)

    with Progress(num_steps * (2 if holdout_samples else 1), f"calibration ({total} samples x {num_steps} steps)",
                  progress, unit="steps") as bar:
        run(x, cond, steps, bar)
        if holdout_samples:
            run(xh, ch, holdout, bar)
    num_groups = max(1, min(num_groups, len(steps)))
    bounds = torch.linspace(0, len(steps), num_groups + 1).round().long().tolist()
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ts = [int(s.timestep[0]) for s in steps[a:b]]
        groups.append(TimestepGroup(min(ts), max(ts), steps[a:b]))
    return CalibrationSet(groups, holdout)
