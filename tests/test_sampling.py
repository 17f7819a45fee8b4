"""sampling: the one DDIM module; TorchDDIM (for machines without diffusers) matches diffusers' DDIMScheduler."""

from __future__ import annotations

import pytest
import torch

from msfp_compiler.sampling import TorchDDIM, make_scheduler, sample


def _eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + torch.sin(t.float() / 100).view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (7, 0.0), (10, 0.5)])
def test_torch_ddim_matches_diffusers_bit_for_bit(steps: int, eta: float) -> None:
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = sample(_eps, noise, TorchDDIM(), steps, eta, torch.Generator().manual_seed(1))
    ref = sample(_eps, noise, make_scheduler("ddim"), steps, eta, torch.Generator().manual_seed(1))
    assert torch.equal(ours, ref)


def test_sample_feeds_one_timestep_per_batch_in_scheduler_order() -> None:
    seen = []

    def eps(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    sample(eps, torch.zeros(2, 1, 2, 2), make_scheduler("ddpm"), 4)
    assert seen == [[t, t] for t in (750, 500, 250, 0)]
