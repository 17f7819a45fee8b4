# Session 13 (CPU): with the last decoder block at 8 bits (--keep-8bit 'first,last,up_blocks.3.*', call 13's uncond
# variant, 1.64x FP32 after TALoRA + DFA), which remaining group of quantizers costs the most? A targeted run of
# tools/sensitivity_mnist.py's measurement: for each group (in priority order), W4A4 with that group left in float
# ("all but"), so the gain from keeping it at higher precision next; 8 DDIM-50 samples vs FP32 (PSNR) and the one-step
# eps rel-RMSE at the probe timesteps (the robust number at 8 samples). Saves after every group.
#   nice python results/mnist/next_block_probe.py [--samples 8] [--out results/mnist/next_block_probe.json]
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from sensitivity_mnist import (MODELS, build_parser, bypassed, load_model, prepare,  # noqa: E402
                               quantizer_groups)

ORDER = ["block:up_blocks.2", "kind:skip_concat", "kind:attn_qkv", "kind:resnet_conv2", "block:up_blocks.1",
         "block:up_blocks.0", "block:mid_block", "kind:resnet_conv1", "kind:attn_linear"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("results/mnist/next_block_probe.json"))
    a = ap.parse_args()
    args = build_parser().parse_args(["--model", "uncond", "--samples", str(a.samples),
                                      "--keep-8bit", "first,last,up_blocks.3.*"])
    torch.manual_seed(0)  # as sensitivity_mnist.main: the same noise, so W4A4 repeats its 22.46 dB
    t0 = time.perf_counter()
    gm, qs, pr = prepare(load_model(MODELS["uncond"]), args, torch.device("cpu"))
    groups = quantizer_groups(qs, True)
    every = {q["node"] for q in qs}
    res = {"settings": {"samples": a.samples, "keep_8bit": args.keep_8bit, "calib": [args.calib_samples,
                                                                                        args.calib_steps]},
           "compile_seconds": round(time.perf_counter() - t0), "all_but": {}}
    for name in ORDER:
        m = pr.measure(bypassed(gm, every - groups[name]))
        res["all_but"][name] = {"quantizers": len(groups[name]), **m}
        print(f"all but {name:<22} n={len(groups[name]):3d} {m['psnr']:6.2f} dB  eps {m['eps_rel_rmse_mean']:.4f}",
              flush=True)
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
