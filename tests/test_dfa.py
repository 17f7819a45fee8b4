"""DFA: gamma_t is the eps coefficient of the sampler update, mean-normalized."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from msfp_compiler.dfa import dfa_weights


@pytest.mark.parametrize("steps", [10, 25])
def test_dfa_gamma_is_ddim_eps_coefficient(steps):
    """gamma_t is |d x_prev / d eps| of the DDIM update (measured by stepping the scheduler), mean-normalized."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    gam = dfa_weights(copy.deepcopy(sched), steps, "ddim")
    sched.set_timesteps(steps)
    measured = {}
    for t in sched.timesteps:
        out = sched.step(torch.ones(1), t, torch.zeros(1)).prev_sample  # x_t = 0, eps = 1 -> the eps coefficient
        measured[int(t)] = abs(float(out))
    mean = sum(measured.values()) / len(measured)
    assert set(gam) == set(measured)
    for t in gam:
        assert gam[t] == pytest.approx(measured[t] / mean, rel=1e-5)
    assert abs(sum(gam.values()) / len(gam) - 1) < 1e-9
    # The weighting is not flat: late (small t) steps use eps far less than early ones in DDIM.
    assert max(gam.values()) / min(gam.values()) > 2


def test_dfa_gamma_ddpm_formula():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    gam = dfa_weights(sched, 1000, "ddpm")
    b = sched.betas.double()
    abar = sched.alphas_cumprod.double()
    raw = {t: float(b[t] / ((1 - b[t]).sqrt() * (1 - abar[t]).sqrt())) for t in gam}
    mean = sum(raw.values()) / len(raw)
    for t in (0, 10, 500, 999):
        assert gam[t] == pytest.approx(raw[t] / mean, rel=1e-9)
