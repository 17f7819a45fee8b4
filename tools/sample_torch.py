#!/usr/bin/env python
"""FP32 torch DDIM sanity check of a tiny digits DDPM folder (examples/digits-{uncond,cond}).

Writes FOLDER/samples.png (uncond: 8x8 grid; cond: 10 rows x 8, row r = requested label r) and
merges a "sanity" block into FOLDER/training.json:
  * uncond and cond: digits-FID (classifier penultimate features) of generated samples vs. one
    random half of the real digits, next to the real-vs-real FID of the two halves (same sizes,
    so the finite-sample bias is comparable);
  * cond: classifier accuracy of generated digits w.r.t. the requested labels.

  OMP_NUM_THREADS=1 python tools/sample_torch.py examples/digits-cond --n 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from msfp_compiler.digits import (NUM_CLASSES, ddim_sample_torch, load_classifier,  # noqa: E402
                                  load_digit_images, load_tiny_ddpm)
from msfp_compiler.export.ort import save_grid  # noqa: E402
from msfp_compiler.metrics import classifier_accuracy, fid_digits  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--classifier", type=Path, default=Path("examples/digit_classifier.safetensors"))
    ap.add_argument("--n", type=int, default=1000, help="samples for FID / accuracy")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=1.0, help="cond only; 1.0 = plain conditional")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print metrics, do not touch the folder")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    unet, scheduler, table = load_tiny_ddpm(args.folder)
    cond = table is not None
    clf = load_classifier(args.classifier)
    real, _ = load_digit_images(unet.config.sample_size)
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(1234))
    half_a, half_b = real[perm[: len(perm) // 2]], real[perm[len(perm) // 2:]]

    t0 = time.perf_counter()
    kw = {"guidance_scale": args.guidance}
    if cond:
        grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
        grid = ddim_sample_torch(unet, scheduler, len(grid_labels), args.steps, args.seed,
                                 labels=grid_labels, class_embedding=table, **kw)
        labels = torch.arange(args.n) % NUM_CLASSES
        samples = ddim_sample_torch(unet, scheduler, args.n, args.steps, args.seed + 1,
                                    labels=labels, class_embedding=table, **kw)
    else:
        grid = ddim_sample_torch(unet, scheduler, 64, args.steps, args.seed)
        samples = ddim_sample_torch(unet, scheduler, args.n, args.steps, args.seed + 1)
    sample_s = time.perf_counter() - t0

    m = min(len(samples), len(half_b))
    sanity: dict[str, object] = {
        "sampler": f"DDIM {args.steps} steps, eta 0, torch fp32, seed {args.seed + 1}",
        "n_samples": args.n,
        "fid_gen_vs_real_half": round(fid_digits(clf, samples[:m], half_a), 3),
        "fid_real_half_vs_real_half": round(fid_digits(clf, half_b[:m], half_a), 3),
        "fid_gen_vs_all_real": round(fid_digits(clf, samples, real), 3),
        "fid_note": f"digits-FID = Frechet distance of DigitClassifier features; halves of the 1797 real "
                    f"digits ({len(half_a)}/{len(half_b)}), generated set truncated to {m} for the half comparison",
        "sampling_wall_s": round(sample_s, 1),
    }
    if cond:
        sanity["guidance_scale"] = args.guidance
        sanity["cond_accuracy"] = round(classifier_accuracy(clf, samples, labels), 4)
        sanity["grid_cond_accuracy"] = round(classifier_accuracy(clf, grid, grid_labels), 4)
    print(json.dumps(sanity, indent=2))
    if args.no_write:
        return
    save_grid(grid, args.folder / "samples.png", nrow=8)
    rec_path = args.folder / "training.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    rec["sanity"] = sanity
    rec["size_bytes"] = sum(p.stat().st_size for p in args.folder.rglob("*") if p.is_file() and p.name != "training.json")
    rec["size_note"] = "bytes of all files in the folder except training.json"
    rec_path.write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    main()
