"""Sampling: the one DDIM/scheduler module (schedule constants, schedulers, the eps coefficient, the sampling loop).

Every sampler of the project runs ``sample``: the onnxruntime sampler (export/ort.py), the Triton GPU runner
(export/triton/runtime.py) and the FP32 torch reference (digits.py). Calibration, distillation and DFA take their
schedulers from ``make_scheduler``. The scheduler is a diffusers scheduler, or ``TorchDDIM`` where diffusers is not
installed (the GPU image): the same DDIM update in the same float32 operations, so both give the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import MsfpError

__all__ = ["NUM_TRAIN_TIMESTEPS", "BETA_START", "BETA_END", "make_scheduler", "linear_alphas_cumprod", "TorchDDIM",
           "eps_coefficient", "sample"]

# The linear beta schedule of DDPM (Ho et al.) and diffusers' DDPMScheduler/DDIMScheduler defaults; the example
# models were trained with it and a model folder without a scheduler config is assumed to use it.
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def make_scheduler(kind: str = "ddim", config: dict | None = None):
    """A diffusers scheduler: the model folder's scheduler config if given, else the linear schedule above."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(kind)
    if cls is None:
        raise MsfpError(f"unknown scheduler {kind!r} (expected ddim or ddpm)")
    if config:
        return cls.from_config(config)
    return cls(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=BETA_START,
               beta_end=BETA_END)


def linear_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                          beta_end: float = BETA_END) -> torch.Tensor:
    """abar_t of the linear beta schedule, float32 as diffusers computes it."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor


class TorchDDIM:
    """DDIM (Song et al.) with diffusers' DDIMScheduler defaults, in plain torch: linear betas, "leading" timesteps
    (t = T/steps * i), x0 clipped to [-1, 1], final abar = 1. The subset of the diffusers scheduler interface that
    ``sample`` uses; the arithmetic is diffusers' operation for operation (``** 0.5``, not sqrt)."""

    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                 beta_end: float = BETA_END, clip_sample: bool = True, set_alpha_to_one: bool = True):
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.clip_sample = clip_sample
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self._ratio = 1

    def set_timesteps(self, steps: int) -> None:
        self._ratio = self.num_train_timesteps // steps
        self.timesteps = (torch.arange(steps) * self._ratio).flip(0)

    def scale_model_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        return x

    def step(self, eps: torch.Tensor, t: Any, x: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> _StepOutput:
        t = int(t)
        eps = eps.to(x.dtype)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t - self._ratio] if t - self._ratio >= 0 else self.final_alpha_cumprod
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = eta * var**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        return _StepOutput(x)


def eps_coefficient(scheduler, t: int, num_steps: int, kind: str = "ddim") -> float:
    """d x_prev / d eps of one sampler update at timestep t (DDIM with eta = 0, or DDPM's posterior mean).

    DDIM: sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t); DDPM:
    beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)). ``scheduler`` is a diffusers scheduler (float64 math here).
    """
    abar = scheduler.alphas_cumprod.double()
    if kind == "ddim":
        prev = t - scheduler.config.num_train_timesteps // num_steps
        a_prev = abar[prev] if prev >= 0 else scheduler.final_alpha_cumprod.double()
        g = (1 - a_prev).sqrt() - a_prev.sqrt() * (1 - abar[t]).sqrt() / abar[t].sqrt()
    elif kind == "ddpm":
        beta = scheduler.betas.double()[t]
        g = beta / ((1 - beta).sqrt() * (1 - abar[t]).sqrt())
    else:
        raise MsfpError(f"unknown sampler {kind!r} (expected ddim or ddpm)")
    return float(g)


def sample(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, scheduler,
           steps: int, eta: float = 0.0, generator: torch.Generator | None = None,
           on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Run ``scheduler`` for ``steps`` steps from ``noise`` with ``eps_fn(x, t) -> eps`` (t int64 [B] on x's device,
    one timestep per batch as samplers give it); ``generator`` draws the eta > 0 noise; returns x_0."""
    scheduler.set_timesteps(steps)
    # DDPMScheduler.step takes no eta; DDIM's default is eta = 0.
    kwargs: dict[str, Any] = {"eta": eta} if eta else {}
    if generator is not None:
        kwargs["generator"] = generator
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        eps = eps_fn(scheduler.scale_model_input(x, t), tt)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if on_step is not None:
            on_step()
    return x
