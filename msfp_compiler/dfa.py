"""DFA (denoising-factor alignment): the distillation loss at step t is weighted by gamma_t.

gamma_t is the magnitude of the coefficient of the predicted noise in the sampler update (DDIM:
sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t); DDPM: beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))),
normalized to mean 1 over the sampler's steps, so an error in eps costs what it costs the sample.
"""

from __future__ import annotations

from .sampling import eps_coefficient

__all__ = ["dfa_weights"]


def dfa_weights(scheduler, num_steps: int, kind: str = "ddim") -> dict[int, float]:
    """gamma_t per sampler timestep: |coefficient of eps in the update|, normalized to mean 1 over the steps."""
    scheduler.set_timesteps(num_steps)
    gam = {int(t): abs(eps_coefficient(scheduler, int(t), num_steps, kind)) for t in scheduler.timesteps}
    mean = sum(gam.values()) / len(gam)
    return {t: g / mean for t, g in gam.items()}
