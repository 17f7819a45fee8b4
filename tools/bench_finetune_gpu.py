#!/usr/bin/env python
"""Feasibility of TALoRA + DFA fine-tuning at Stable Diffusion size on one GPU: seconds per step and peak memory.

The SD1.5 UNet is built from its config with random weights (tools/unet_configs.py; nothing is downloaded), captured
on the CPU, calibrated on --device with 77-token random text states, given MSFP formats (annotate_sign,
select_format, insert_qdq on the device) and fine-tuned with TALoRA (K LoRAs, rank r, router) + DFA for --steps
steps at --batch on 64x64 latents, distilling the FP teacher along --sampler-steps DDIM steps. Writes a JSON with
per-stage seconds, fine-tuning steps/s and seconds/step, and torch.cuda.max_memory_allocated per stage.

  python tools/bench_finetune_gpu.py --device cuda --steps 200 --batch 4 --out results/bench_finetune_sd15.json
  python tools/bench_finetune_gpu.py --model tiny --device cpu --steps 2 --batch 2 --out /tmp/b.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from unet_configs import SD15_UNET_CONFIG  # noqa: E402

from msfp_compiler.calibration import collect  # noqa: E402
from msfp_compiler.capture import capture, signature_of  # noqa: E402
from msfp_compiler.compile import quantize_passes  # noqa: E402
from msfp_compiler.config import CompileConfig, FinetuneConfig, QuantConfig  # noqa: E402
from msfp_compiler.device import exact_fp32, move_graph, resolve_device  # noqa: E402
from msfp_compiler.distillation import finetune  # noqa: E402
from msfp_compiler.load import model_from_config  # noqa: E402
from msfp_compiler.pass_manager import PassManager  # noqa: E402
from msfp_compiler.sampling import make_scheduler  # noqa: E402

TINY = {**SD15_UNET_CONFIG, "block_out_channels": [32, 32, 64, 64], "cross_attention_dim": 32, "sample_size": 8,
        "attention_head_dim": 2, "norm_num_groups": 8, "layers_per_block": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-loras", type=int, default=2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--sampler-steps", type=int, default=10, help="DDIM steps of the teacher trajectories")
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions while fine-tuning")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


@dataclass
class StageLog:
    """Per-stage rows: wall seconds (after a CUDA sync) and, on CUDA, the stage's peak allocated GPU memory."""

    cuda: bool
    rows: list[dict] = field(default_factory=list)

    def done(self, name: str, t0: float, **extra) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        row = {"name": name, "seconds": round(time.perf_counter() - t0, 2), **extra}
        if self.cuda:
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def quantize_on_device(unet: torch.nn.Module, gm: torch.fx.GraphModule, sig, ft: FinetuneConfig, device: torch.device,
                       calib_steps: int, log: StageLog) -> tuple[torch.fx.GraphModule, object]:
    """Calibration, the teacher trajectories and annotate_sign + select_format + insert_qdq on ``device``, in exact
    FP32; returns (quantized graph, trajectories)."""
    cfg = CompileConfig(quant=QuantConfig(scheme="msfp"), finetune=ft, device=str(device))
    with exact_fp32():
        t0 = time.perf_counter()
        calib = collect(unet, sig, num_samples=2, num_steps=calib_steps, seed=0, scheduler=make_scheduler("ddim"),
                        num_groups=2, holdout_samples=0, progress=False)
        log.done("calibrate", t0)
        t0 = time.perf_counter()
        data = collect(unet, sig, ft.samples, ft.sampler_steps, 1, make_scheduler("ddim"), num_groups=1,
                       holdout_samples=0, progress=False)
        log.done("teacher trajectories", t0)
        gm = move_graph(gm, device)
        pm = PassManager()
        t0 = time.perf_counter()
        gm = pm.run(gm, quantize_passes(cfg, calib))
        log.done("annotate_sign + select_format + insert_qdq", t0,
                 passes={r.name: round(r.seconds, 2) for r in pm.runs})
    return gm, data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        import msfp_compiler.export.triton.runtime  # noqa: F401  (Triton kernels become the CUDA msfp ops)
    log = StageLog(cuda)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = model_from_config(SD15_UNET_CONFIG if args.model == "sd15" else TINY).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    sig = signature_of(unet, cond_len=77)
    log.done("build", t0, params=n_params)
    t0 = time.perf_counter()
    gm, sig = capture(unet, sig)
    log.done("capture (cpu)", t0, nodes=len(gm.graph.nodes))
    unet.to(device)
    ft = FinetuneConfig(steps=args.steps, num_loras=args.num_loras, rank=args.rank, dfa=True, samples=args.batch,
                        sampler_steps=args.sampler_steps, batch_size=args.batch, log_every=max(1, args.steps // 10))
    gm, data = quantize_on_device(unet, gm, sig, ft, device, args.calib_steps, log)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    t0 = time.perf_counter()
    res = finetune(gm, unet, sig, data, ft, make_scheduler("ddim"), progress=False)
    info = res.log_info(ft)
    log.done("finetune (TALoRA + DFA)", t0, steps=args.steps, train_seconds=info["train_seconds"],
             steps_per_s=info["steps_per_s"], seconds_per_step=round(info["train_seconds"] / args.steps, 4),
             loss_curve=info["loss_curve"])
    out = {"model": args.model, "params": n_params, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "batch": args.batch, "latent": [sig.in_channels, sig.sample_size, sig.sample_size], "text": [77, sig.cond_dim],
           "num_loras": args.num_loras, "rank": args.rank, "dfa": True, "tf32": args.tf32, "steps": args.steps,
           "seconds_per_step": round(info["train_seconds"] / args.steps, 4),
           "peak_gpu_gb_finetune": log.rows[-1].get("peak_gpu_gb"), "stages": log.rows,
           "torch": torch.__version__, "loadavg": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "stages"}), flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
