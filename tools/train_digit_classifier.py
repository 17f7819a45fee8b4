#!/usr/bin/env python
"""Train the DigitClassifier (feature extractor for digits-FID / label accuracy) on 16x16 digits.

Stratified 80/20 hold-out split with a fixed seed; light augmentation (small random affine);
reports hold-out accuracy and saves examples/digit_classifier.safetensors + .json.

  OMP_NUM_THREADS=1 python tools/train_digit_classifier.py --out examples/digit_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msfp_compiler.digits import DigitClassifier, augment, load_digit_images, save_classifier  # noqa: E402


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/digit_classifier.safetensors"))
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from sklearn.model_selection import train_test_split

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digit_images(args.size)
    idx_tr, idx_te = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=args.seed,
                                      stratify=labels.numpy())
    x_tr, y_tr = images[idx_tr], labels[idx_tr]
    x_te, y_te = images[idx_te], labels[idx_te]

    model = DigitClassifier(size=args.size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_tr) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs), desc="classifier")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(perm), args.batch_size):
            b = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_tr[b], gen)), y_tr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", test_acc=f"{accuracy(model, x_te, y_te):.4f}")
    test_acc = accuracy(model, x_te, y_te)
    train_acc = accuracy(model, x_tr, y_tr)
    all_acc = accuracy(model, images, labels)
    info = {"test_accuracy": round(test_acc, 5), "train_accuracy": round(train_acc, 5),
            "all_accuracy": round(all_acc, 5), "n_train": len(y_tr), "n_test": len(y_te),
            "split": f"sklearn train_test_split(test_size=0.2, stratify=labels, random_state={args.seed})",
            "data": f"sklearn load_digits, bilinear 8->{args.size}, [-1,1]",
            "augmentation": "random affine: rot +-10deg, scale 0.9..1.1, shift +-1px",
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "params": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, args.out, extra=info)
    print(json.dumps(info))
    if test_acc < 0.97:
        print(f"WARNING: hold-out accuracy {test_acc:.4f} < 0.97", file=sys.stderr)


if __name__ == "__main__":
    main()
