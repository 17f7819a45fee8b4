"""OrtUNet: an onnxruntime session with the diffusers UNet interface, dropped into diffusers pipelines.

- DDIMPipeline on a tiny UNet2DModel lowered to FP32 (``lower_fp32``, what ``--scheme fp32`` writes): the same images
  as the pipeline with the torch UNet; on a compiled tiny UNet2DModel: the same images as the torch quantized graph.
- StableDiffusionPipeline built from configs (tiny CLIP text model, tiny tokenizer written here, tiny VAE), its
  UNet replaced by the compiled ONNX: runs with classifier-free guidance and matches the torch quantized graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msfp_compiler.export.ort import OrtUNet, session_from_model


class TorchUNet:
    """The torch quantized graph behind the same diffusers interface (the reference for OrtUNet)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, cm, config):
        self.cm, self.config = cm, config

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **_):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        args = (sample, t) + ((encoder_hidden_states,) if encoder_hidden_states is not None else ())
        out = self.cm(*args)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _ddim(unet, steps: int = 4):
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_ddim_pipeline_on_the_fp32_onnx(fp32_min, tmp_path: Path) -> None:
    from msfp_compiler.export.onnx import save_atomic

    unet, fp32 = fp32_min
    save_atomic(fp32, tmp_path / "fp32.onnx")
    ort_unet = OrtUNet(tmp_path / "fp32.onnx")  # the diffusers config comes from the ONNX metadata
    assert ort_unet.config.sample_size == unet.config.sample_size and ort_unet.config.in_channels == 1
    out = ort_unet(torch.randn(3, 1, unet.config.sample_size, unet.config.sample_size), torch.tensor(10))
    assert type(out).__name__ == "UNet2DOutput" and out.sample.shape[0] == 3  # a scalar timestep broadcasts
    with torch.no_grad():
        ref = _ddim(unet)
    got = _ddim(ort_unet)
    assert got.shape == ref.shape == (2, unet.config.sample_size, unet.config.sample_size, 1)
    assert np.abs(got - ref).max() < 1e-4


def test_ddim_pipeline_on_a_compiled_model(compiled_unet2d) -> None:
    cm = compiled_unet2d
    ort_unet = OrtUNet(session_from_model(cm.onnx_model))
    got, ref = _ddim(ort_unet), _ddim(TorchUNet(cm, ort_unet.config))
    assert np.isfinite(got).all() and got.shape == (2, 8, 8, 1)
    assert np.abs(got - ref).max() < 1e-3
    assert ort_unet(torch.randn(1, 1, 8, 8), 5, return_dict=False)[0].shape == (1, 1, 8, 8)
    with pytest.raises(Exception, match="takes no timestep_cond"):
        ort_unet(torch.randn(1, 1, 8, 8), 5, timestep_cond=torch.zeros(1))


def _tiny_tokenizer(folder: Path):
    """A CLIPTokenizer over a 30-token vocabulary written here (the real one is a hub download)."""
    from transformers import CLIPTokenizer

    words = ["a", "digit", "photo", "of", "cat", "dog", "the", "red", "blue"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab.setdefault(f"{w}</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def test_stable_diffusion_pipeline_with_the_compiled_unet(compiled_cond, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="StableDiffusionPipeline needs transformers (the [test] extra)")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    cm = compiled_cond
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=64, projection_dim=16)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    path = tmp_path / "unet.onnx"
    cm.save(path)
    ort_unet = OrtUNet(path)
    assert ort_unet.config.cross_attention_dim == 16

    def pipe(unet):
        p = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=_tiny_tokenizer(tmp_path), unet=unet,
                                    scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        return p("a photo of a red cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    with torch.no_grad():
        got = pipe(ort_unet)
        ref = pipe(TorchUNet(cm, ort_unet.config))
    assert got.shape == (1, 16, 16, 3) and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 1e-3
