"""Capture a diffusers UNet as an ATen-level torch.fx graph with torch.export.

torch.fx.symbolic_trace fails on diffusers UNets (data-dependent control flow in the blocks); torch.export traces
them exactly. The UNet is wrapped as ``f(sample, timestep[, encoder_hidden_states | class_labels]) -> noise_pred``
with a dynamic batch dimension (and text length), so the graph inputs are the ONNX inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.export import Dim

from .errors import MsfpError

__all__ = ["UNetSignature", "UNetWrapper", "signature_of", "capture", "example_inputs"]


@dataclass(frozen=True)
class UNetSignature:
    """What the wrapped UNet takes: image shape and the optional conditioning input."""

    in_channels: int
    sample_size: int
    cond: str | None  # "encoder_hidden_states", "class_labels" or None
    cond_dim: int = 0  # cross_attention_dim for encoder_hidden_states
    cond_len: int = 1  # sequence length of encoder_hidden_states in examples
    num_classes: int = 0

    @property
    def input_names(self) -> list[str]:
        return ["sample", "timestep"] + ([self.cond] if self.cond else [])


class UNetWrapper(torch.nn.Module):
    """f(sample, timestep[, cond]) -> noise prediction, the calling convention every stage shares."""

    def __init__(self, unet: torch.nn.Module, sig: UNetSignature):
        super().__init__()
        self.unet = unet
        self.cond = sig.cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {self.cond: cond} if self.cond else {}
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]


def signature_of(unet: torch.nn.Module, cond_len: int = 1) -> UNetSignature:
    cfg = getattr(unet, "config", None)
    if cfg is None:
        raise MsfpError(f"{type(unet).__name__} is not a diffusers model (no .config)")
    size = cfg.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    cond, cond_dim, num_classes = None, 0, 0
    if "cross_attention_dim" in cfg and cfg.get("cross_attention_dim"):
        cond = "encoder_hidden_states"
        cond_dim = cfg["cross_attention_dim"]
        cond_dim = cond_dim[0] if isinstance(cond_dim, (list, tuple)) else cond_dim
    elif cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
        cond, num_classes = "class_labels", int(cfg.get("num_class_embeds") or 0)
    return UNetSignature(cfg["in_channels"], int(size), cond, int(cond_dim), cond_len, num_classes)


def example_inputs(sig: UNetSignature, batch: int = 2, generator: torch.Generator | None = None) -> tuple:
    x = torch.randn(batch, sig.in_channels, sig.sample_size, sig.sample_size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    if sig.cond == "encoder_hidden_states":
        return x, t, torch.randn(batch, sig.cond_len, sig.cond_dim, generator=generator)
    if sig.cond == "class_labels":
        return x, t, torch.randint(0, max(sig.num_classes, 1), (batch,), generator=generator)
    return (x, t)


def capture(unet: torch.nn.Module, sig: UNetSignature | None = None) -> tuple[torch.fx.GraphModule, UNetSignature]:
    """torch.export the wrapped UNet (dynamic batch) and return the ATen GraphModule and the signature."""
    sig = sig or signature_of(unet)
    unet = unet.eval()
    wrapper = UNetWrapper(unet, sig).eval()
    # The text sequence length is symbolic too, so the graph runs on whatever calibration uses (77 CLIP tokens
    # for SD, 1 for a class-embedding row): trace with >= 2 tokens, since export specializes sizes 0 and 1.
    example_sig = replace(sig, cond_len=max(2, sig.cond_len))
    args = example_inputs(example_sig, batch=2, generator=torch.Generator().manual_seed(0))
    # Dim.AUTO rather than a named Dim: diffusers blocks add guards (e.g. an upper bound from the timestep
    # broadcast) that a fixed range would reject; the exported batch dimension stays symbolic either way.
    shapes = [{0: Dim.AUTO} for _ in args]
    if sig.cond == "encoder_hidden_states":
        shapes[2] = {0: Dim.AUTO, 1: Dim.AUTO}
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
        ep = ep.run_decompositions({})
    except Exception as e:  # torch.export raises many types; the user needs the model name and the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MsfpError(f"{type(unet).__name__}: torch.export failed: {first}") from e
    # No input guards on the module: the only one diffusers adds on the batch comes from Upsample2D's
    # `if batch >= 64: x = x.contiguous()` (a memory-layout workaround for an old CUDA kernel), which export
    # specializes to "batch <= 63" from the batch-2 example. Dropping the copy changes no value, and the guard would
    # stop sampling or fine-tuning in batches of 64 and more.
    gm = ep.module(check_guards=False)
    gm._forward_pre_hooks.clear()  # the same bound, checked again as an input range constraint
    return gm, sig
