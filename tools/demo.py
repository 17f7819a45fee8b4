"""`make demo`: compile a small diffusers UNet end to end and run it in onnxruntime.

Uses the project's trained digits model (examples/digits-uncond) when present, else a random-weight UNet2DModel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_out"


def main() -> int:
    from diffusers import UNet2DModel

    from msfp_compiler.load import load_model, save_checkpoint

    OUT.mkdir(exist_ok=True)
    trained = ROOT / "examples" / "digits-uncond"
    if (trained / "config.json").is_file():
        loaded = load_model(trained)
        unet, sched = loaded.unet, loaded.scheduler_config
        print(f"demo: trained digits UNet from {trained.relative_to(ROOT)}")
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        sched = None
        print("demo: random-weight UNet2DModel (examples/digits-uncond not found)")
    model_pt = save_checkpoint(unet, OUT / "model.pt", sched)
    bin_dir = Path(sys.executable).parent
    compile_cmd = [str(bin_dir / "msfp-compile"), str(model_pt), "--out", str(OUT / "model.onnx"),
                   "--log-dir", str(OUT / "logs"), "--check", "--summary", "--plots"]
    sample_cmd = [str(bin_dir / "msfp-sample"), str(OUT / "model.onnx"), "--steps", "50", "-n", "64",
                  "--out", str(OUT / "samples.png")]
    for cmd in (compile_cmd, sample_cmd):
        print("$", " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
        rc = subprocess.call(cmd)
        if rc:
            return rc
    print(f"demo: pass log in {OUT / 'logs' / 'passes.log'}, samples in {OUT / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
