"""Tests for msfp_compiler.digits: classifier I/O, DDIM reference sampler, committed example folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msfp_compiler.digits import (DigitClassifier, ddim_sample_torch, load_classifier, load_tiny_ddpm,
                                  save_classifier)

ROOT = Path(__file__).resolve().parents[1]


def _tiny_unet(cond: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                  block_out_channels=(8, 16), norm_num_groups=4)
    if cond:
        return UNet2DConditionModel(**common, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    cross_attention_dim=8, attention_head_dim=2).eval()
    return UNet2DModel(**common, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def test_classifier_roundtrip(tmp_path: Path) -> None:
    model = DigitClassifier(size=16, channels=(8, 16), feature_dim=12).eval()
    path = tmp_path / "clf.safetensors"
    save_classifier(model, path, extra={"test_accuracy": 0.5})
    loaded = load_classifier(path)
    x = torch.randn(3, 1, 16, 16)
    assert loaded.features(x).shape == (3, 12)
    torch.testing.assert_close(loaded(x), model(x))
    assert json.loads(path.with_suffix(".json").read_text())["config"]["feature_dim"] == 12


def test_ddim_uncond_deterministic_and_batch_independent(scheduler) -> None:
    unet = _tiny_unet(cond=False)
    a = ddim_sample_torch(unet, scheduler, n=5, steps=4, seed=3, batch_size=5)
    b = ddim_sample_torch(unet, scheduler, n=5, steps=4, seed=3, batch_size=2)
    c = ddim_sample_torch(unet, scheduler, n=5, steps=4, seed=4, batch_size=5)
    assert a.shape == (5, 1, 8, 8)
    assert a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c)


def test_ddim_cond_uses_labels_and_guidance(scheduler) -> None:
    unet = _tiny_unet(cond=True)
    table = torch.randn(11, 8, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.tensor([0, 1, 2, 3])
    a = ddim_sample_torch(unet, scheduler, 4, 4, seed=0, labels=labels, class_embedding=table)
    b = ddim_sample_torch(unet, scheduler, 4, 4, seed=0, labels=labels.flip(0), class_embedding=table)
    g = ddim_sample_torch(unet, scheduler, 4, 4, seed=0, labels=labels, class_embedding=table, guidance_scale=3.0)
    emb = torch.nn.Embedding.from_pretrained(table)
    a2 = ddim_sample_torch(unet, scheduler, 4, 4, seed=0, labels=labels, class_embedding=emb)
    torch.testing.assert_close(a, a2)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, g)
    with pytest.raises(ValueError):
        ddim_sample_torch(unet, scheduler, 4, 4, labels=labels)
    with pytest.raises(ValueError):
        ddim_sample_torch(unet, scheduler, 4, 4, labels=labels, class_embedding=table[:10], guidance_scale=2.0)


@pytest.mark.parametrize("name", ["digits-uncond", "digits-cond"])
def test_committed_example_folders(name: str) -> None:
    folder = ROOT / "examples" / name
    if not (folder / "config.json").exists():
        pytest.fail(f"committed example missing: {folder}")
    unet, sched, table = load_tiny_ddpm(folder)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 * 2 ** 20
    if name == "digits-cond":
        assert table is not None and table.shape == (11, unet.config.cross_attention_dim)
    else:
        assert table is None
    info = json.loads((folder / "training.json").read_text())
    assert info["steps"] > 0 and "sanity" in info


def test_augment_keeps_background_and_moves_digits():
    from msfp_compiler.digits import augment

    x = torch.full((4, 1, 16, 16), -1.0)
    x[:, :, 4:12, 7:9] = 1.0  # a vertical stroke
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape  # seeded
    assert torch.allclose(augment(torch.full_like(x, -1.0), torch.Generator().manual_seed(0)), torch.full_like(x, -1.0))
    assert not torch.allclose(a, x, atol=1e-3)  # the strokes moved
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5
