"""Paper-style W4A4 quality table on the project's digit models, measured on the deployed ONNX in onnxruntime.

Every row is compiled with the library API (``msfp_compiler.compile``) and sampled with DDIM through an ORT session
from the same initial noise (fixed seed). Metrics: FID in the feature space of the project's digit classifier
(generated vs all 1797 real digits), PSNR / MSE against the FP32 samples from the same noise, and for the
conditional model the classifier accuracy of generated digits against their labels. Results are appended row by
row to results/quality.json (rerunning skips rows already measured with the same settings unless --force), and
results/quality.md holds the markdown table README shows.

    python tools/eval_quality.py                      # both models, all rows
    python tools/eval_quality.py --models uncond --rows fp32,msfp --samples 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from msfp_compiler.sampling import make_scheduler  # noqa: E402
from msfp_compiler.capture import capture, signature_of  # noqa: E402
from msfp_compiler.compile import compile as msfp_compile  # noqa: E402
from msfp_compiler.digits import load_classifier, load_digit_images  # noqa: E402
from msfp_compiler.export.onnx import lower_fp32, save_atomic  # noqa: E402
from msfp_compiler.export.ort import OrtUNet, ddim_sample, open_session, save_grid  # noqa: E402
from msfp_compiler.load import load_model  # noqa: E402
from msfp_compiler.metrics import classifier_accuracy, fid_digits, mse, psnr  # noqa: E402
from quality_rows import (ROWS, Row, add_table_arguments, args_row_config, class_labels, compile_facts,  # noqa: E402
                          parse_rows, sampler_config, slug, write_json)

MODELS = {"uncond": ROOT / "examples" / "digits-uncond", "cond": ROOT / "examples" / "digits-cond"}
# the settings results/quality.json rows used
STORED_DEFAULTS = {"finetune_samples": 32, "finetune_trajectories": "fp", "no_clip_sample": False, "lora_8bit": False}


def build_onnx(row: Row, loaded, args, path: Path) -> dict:
    """Compile one row to ONNX at path; returns compile facts."""
    t0 = time.perf_counter()
    info: dict = {}
    if row.scheme is None:
        save_atomic(lower_fp32(loaded.unet), path)
    else:
        cm = msfp_compile(loaded, args_row_config(row, args, args.seed), progress=True)
        cm.save(path)
        res = cm.check()
        info["check_ok"], info["check_flips"] = res.ok, res.flips
        info["check_end_to_end_rel_rmse"] = max(res.end_to_end_rel_rmse, default=0.0)
        facts = compile_facts(cm)
        if "train_seconds" in facts:
            info["finetune_seconds"] = facts["train_seconds"]
            info["distill_loss"] = [facts["initial_loss"], facts["final_loss"]]
        info.update({k: facts[k] for k in ("talora_table", "unsigned_acts", "signed_acts") if k in facts})
    info["compile_seconds"] = round(time.perf_counter() - t0, 2)
    info["onnx_bytes"] = path.stat().st_size
    return info


def evaluate(model_key: str, rows: list[Row], args, results: dict) -> None:
    loaded = load_model(MODELS[model_key])
    classifier = load_classifier(ROOT / "examples" / "digit_classifier.safetensors")
    real, _ = load_digit_images(16)
    n = args.samples
    labels, cond = class_labels(loaded, n)
    settings = {"samples": n, "steps": args.steps, "seed": args.seed, "finetune_steps": args.finetune_steps,
                "lora_rank": args.lora_rank, "calib_samples": args.calib_samples, "calib_steps": args.calib_steps}
    # recorded only where they differ from what every stored row was measured with, so those rows stay cached
    settings.update({k: getattr(args, k) for k in STORED_DEFAULTS if getattr(args, k) != STORED_DEFAULTS[k]})
    table = results.setdefault(model_key, {})
    ref_path = args.out / f"samples_{model_key}_fp32{'_noclip' if args.no_clip_sample else ''}.pt"
    for row in rows:
        old = table.get(row.name)
        if old and old.get("settings") == settings and not args.force and (row.scheme or ref_path.exists()):
            print(f"[{model_key}] {row.name}: cached", flush=True)
            continue
        print(f"[{model_key}] {row.name}: compiling", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            info = build_onnx(row, loaded, args, path)
            t0 = time.perf_counter()
            unet = OrtUNet(open_session(path, args.threads))
            imgs = ddim_sample(unet, n, args.steps, args.seed, cond, sampler_config(loaded, args), batch_size=125,
                               progress=True)
            info["sample_seconds"] = round(time.perf_counter() - t0, 2)
        if row.scheme is None:
            torch.save(imgs, ref_path)
        ref = torch.load(ref_path)
        info["fid_digits"] = fid_digits(classifier, imgs, real)
        info["psnr_vs_fp32"] = psnr(imgs, ref) if row.scheme else float("inf")
        info["mse_vs_fp32"] = mse(imgs, ref)
        if cond is not None:
            info["label_accuracy"] = classifier_accuracy(classifier, imgs, labels)
        info["settings"] = settings
        table[row.name] = info
        save_grid(imgs[:64], args.out / f"samples_{model_key}_{slug(row.name)}.png", nrow=8)
        write(results, args.out)
        print(f"[{model_key}] {row.name}: FID {info['fid_digits']:.2f}  PSNR {info['psnr_vs_fp32']:.2f} dB  "
              f"compile {info['compile_seconds']:.0f}s  sample {info['sample_seconds']:.0f}s", flush=True)


def write(results: dict, out: Path) -> None:
    write_json(out / "quality.json", results, indent=1, sort_keys=True)
    lines = []
    for model_key, table in results.items():
        cond = any("label_accuracy" in r for r in table.values())
        lines += [f"### digits-{model_key} (W4A4, first/last conv 8-bit)", "",
                  "| method | FID (digit features) ↓ | PSNR vs FP32 (dB) ↑ |" + (" label acc ↑ |" if cond else "")
                  + " compile (s) | ONNX size (KB) |",
                  "|---|---|---|" + ("---|" if cond else "") + "---|---|"]
        for name in ROWS:
            r = table.get(name)
            if not r:
                continue
            acc = f" {100 * r['label_accuracy']:.1f}% |" if cond else ""
            p = "—" if r["psnr_vs_fp32"] == float("inf") else f"{r['psnr_vs_fp32']:.2f}"
            lines.append(f"| {name} | {r['fid_digits']:.2f} | {p} |{acc} {r['compile_seconds']:.0f} | "
                         f"{r['onnx_bytes'] / 1024:.0f} |")
        s = next(iter(table.values()))["settings"]
        lines += ["", f"{s['samples']} samples, DDIM {s['steps']} steps, seed {s['seed']}; fine-tuning "
                  f"{s['finetune_steps']} steps, LoRA rank {s['lora_rank']}"
                  f"{'; sampled without x0 clipping' if s.get('no_clip_sample') else ''}.", ""]
    (out / "quality.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_arguments(p, samples=1000, steps=25, calib_samples=16, calib_steps=25, finetune_steps=300,
                        finetune_samples=32, out=ROOT / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="recompute rows already in quality.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime threads (1 avoids spin-wait collapse when the CPU is shared)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "quality.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    rows = parse_rows(args.rows)
    if rows[0].scheme is not None and ROWS["FP32"] not in rows:
        rows = [ROWS["FP32"]] + rows  # PSNR needs the FP32 reference from the same noise
    t0 = time.perf_counter()
    for m in args.models.split(","):
        evaluate(m.strip(), rows, args, results)
    print(f"done in {time.perf_counter() - t0:.0f}s -> {args.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
