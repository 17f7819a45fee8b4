#!/usr/bin/env python
"""Train a tiny DDPM UNet on 16x16 scikit-learn digits, time-budgeted, single-threaded.

  --kind uncond: diffusers UNet2DModel (one self-attention down/up stage + attention mid block).
  --kind cond:   diffusers UNet2DConditionModel (SD1.5-style CrossAttn blocks, scaled down); the
                 condition is a learned nn.Embedding(11, D) row fed as encoder_hidden_states [B,1,D].
                 Row 10 is a null class: 10% of training labels are replaced by it, so the model
                 also learns the unconditional score and classifier-free guidance is possible.
                 Plain conditional sampling (guidance 1.0) just uses rows 0..9.

Both use DDPMScheduler(1000 steps, linear betas, epsilon prediction), eps-MSE loss, AdamW, and an
EMA of the weights; the EMA weights are what gets saved (diffusers folder + training.json).

Example:
  OMP_NUM_THREADS=1 python tools/train_tiny_ddpm.py --kind uncond --out examples/digits-uncond --minutes 15
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msfp_compiler.digits import NULL_CLASS, load_digit_images  # noqa: E402
from msfp_compiler.sampling import make_scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpm_training import DDPMTrainer, save_trained, with_class_embedding  # noqa: E402

CROSS_ATTENTION_DIM = 64


def build_unet(kind: str, size: int) -> nn.Module:
    """The tiny UNet for `kind`; 3 stages at size, size/2, size/4 with (32, 64, 64) channels."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    common = dict(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                  block_out_channels=(32, 64, 64), norm_num_groups=8)
    if kind == "uncond":
        return UNet2DModel(
            **common,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=32,  # real per-head dim here: 2 heads at 64 channels
        )
    if kind == "cond":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CROSS_ATTENTION_DIM,
            # UNet2DConditionModel reads attention_head_dim as the number of heads (diffusers
            # naming quirk): 4 heads of 16 channels at 64 channels.
            attention_head_dim=4,
        )
    raise ValueError(f"unknown kind {kind!r}")


def build_scheduler():
    """DDPM training scheduler shared by both models (saved next to the UNet): the linear schedule, eps-prediction,
    x0 clipped (diffusers' DDPMScheduler defaults)."""
    return make_scheduler("ddpm")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("uncond", "cond"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    ap.add_argument("--max-steps", type=int, default=None, help="optional step cap (for smoke tests)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (keep 1 on shared machines)")
    return ap.parse_args(argv)


def train_for(tr: DDPMTrainer, minutes: float, max_steps: int | None, desc: str) -> tuple[list[float], float]:
    """Step ``tr`` until the wall-clock budget (or ``max_steps``) is spent, with a progress bar of the seconds;
    returns (per-step losses, wall seconds)."""
    budget = minutes * 60.0
    t0 = time.perf_counter()
    losses: list[float] = []
    smooth = None
    bar = tqdm(total=int(budget), unit="s", desc=desc, dynamic_ncols=True, mininterval=5.0)
    last_tick = 0
    while time.perf_counter() - t0 < budget and (max_steps is None or tr.steps < max_steps):
        losses.append(tr.step().item())
        smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
        now = int(time.perf_counter() - t0)
        if now > last_tick:
            bar.update(min(now, int(budget)) - last_tick)
            last_tick = min(now, int(budget))
            bar.set_postfix(step=tr.steps, loss=f"{smooth:.4f}", refresh=False)
    bar.close()
    return losses, time.perf_counter() - t0


def training_record(args: argparse.Namespace, ema: nn.ModuleDict, n_images: int, steps: int, losses: list[float],
                    wall: float) -> dict:
    """training.json: the run's length, loss and sizes, its options and where the data and schedule come from."""
    ema_unet = ema["unet"]
    tail = losses[-200:]
    final_loss = sum(tail) / max(len(tail), 1)
    return {
        "kind": args.kind,
        "unet_class": type(ema_unet).__name__,
        "steps": steps,
        "final_loss": round(final_loss, 5) if math.isfinite(final_loss) else final_loss,
        "final_loss_note": "mean eps-MSE over the last 200 training steps (online weights)",
        "wall_time_s": round(wall, 1),
        "steps_per_s": round(steps / wall, 3),
        "seed": args.seed,
        "unet_params": count_params(ema_unet),
        "class_embedding_params": ema["class_embedding"].weight.numel() if "class_embedding" in ema else 0,
        "size_bytes": folder_size(args.out),
        "hparams": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "data": f"sklearn load_digits, all {n_images} images, bilinear 8->{args.size}, [-1,1]",
        "scheduler": "DDPMScheduler(1000, linear 1e-4..0.02, epsilon, clip_sample)",
        "ema": f"decay min({args.ema_decay}, (1+s)/(10+s)); saved weights are the EMA weights",
        "null_class": (f"row {NULL_CLASS} of class_embedding, label dropout {args.cond_dropout}"
                       if args.kind == "cond" else None),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digit_images(args.size)
    unet = build_unet(args.kind, args.size).train()
    scheduler = build_scheduler()
    # +1 embedding row: the null class used for label dropout.
    tr = DDPMTrainer(with_class_embedding(unet, CROSS_ATTENTION_DIM if args.kind == "cond" else None), scheduler,
                     images, labels, gen, args.lr, args.warmup_steps, args.batch_size, args.ema_decay,
                     args.cond_dropout)
    losses, wall = train_for(tr, args.minutes, args.max_steps, f"train {args.kind}")
    save_trained(tr.ema, scheduler, args.out)
    record = training_record(args, tr.ema, images.shape[0], tr.steps, losses, wall)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("steps", "final_loss", "wall_time_s", "unet_params", "size_bytes")}))

if __name__ == "__main__":
    main()
