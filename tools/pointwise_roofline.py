"""Roofline of the W4A4 fast path's norm/pointwise kernels on SD1.5 (docs/triton.md session 13).

Reads a full kernel list written by ``bench_gpu_sd15.py --profile`` (``--log-dir``'s ``profiles.json``, whose entries
carry ``rows``: every kernel's ms and calls per step), sorts the Inductor (``triton_*``) kernels into categories by
the aten ops in their names, and sets each category's time against the bytes it must move at least (bf16 2 bytes,
E4M3 1 byte per element; estimated from the SD1.5 structure, below) at the device copy bandwidth::

    python tools/pointwise_roofline.py results/gpu_sd15_session13_callA_profiles.json --key w4a4_b8 --batch 8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COPY_BW = 4.19e12  # H200 device copy, bytes/s (issue 11)
# transformer blocks (latent side, channels) and resnet blocks (side, output channels) of SD1.5
TRANSFORMERS = [(64, 320)] * 5 + [(32, 640)] * 5 + [(16, 1280)] * 5 + [(8, 1280)]
RESNETS = ([(64, 320)] * 2 + [(32, 640)] * 2 + [(16, 1280)] * 2 + [(8, 1280)] * 7 + [(16, 1280)] * 3
           + [(32, 640)] * 3 + [(64, 320)] * 3)
# every GroupNorm's input (side, channels): down, mid, up (concatenated skips), norm_out
GROUP_NORMS = ([(64, 320)] * 6 + [(32, 320)] + [(32, 640)] * 5 + [(16, 640)] + [(16, 1280)] * 5 + [(8, 1280)] * 9
               + [(8, 2560), (8, 1280)] * 3
               + [(16, 2560), (16, 1280), (16, 1280)] * 2 + [(16, 1920), (16, 1280), (16, 1280)]
               + [(32, 1920), (32, 640), (32, 640), (32, 1280), (32, 640), (32, 640), (32, 960), (32, 640), (32, 640)]
               + [(64, 960), (64, 320), (64, 320)] + [(64, 640), (64, 320), (64, 320)] * 2 + [(64, 320)])
# bytes per (token x channel) of a transformer block, by category:
#   layernorm: LN1 reads proj_in's GEMM output, writes the residual and E4M3 (2 + 2 + 1); LN2, LN3 read the GEMM
#     output and the residual, write the residual and E4M3 (2 + 2 + 2 + 1 each)
#   qkv_quant: self-attention Q/K/V fake quantizers read 3C bf16 and write 3C bf16 (12), cross-attention Q (4); the
#     attention outputs' quantizers read bf16 and write E4M3 (3 each)
#   geglu: reads the [M, 8C] bf16 GEMM output, writes [M, 4C] E4M3
#   other: the FF output's epilogue and residual (2 + 2 read, 2 + 1 written), proj_out's epilogue and residual (6)
PER_TOKEN_CHANNEL = {"layernorm": 19, "qkv_quant": 22, "geglu": 20, "other_pointwise": 13}
RESNET_RESIDUAL = 6  # conv2's output and the shortcut read, the block output written (bf16)


def category(name: str) -> str:
    """The pointwise category of an Inductor kernel, from the aten ops its name lists (or one of our GroupNorm
    statistics kernels, export/triton/gn_stats.py)."""
    if "var_mean" in name or "mean_pow" in name or (("per_" in name or "red_" in name) and "group_norm" in name):
        return "gn_stats"
    if name.startswith("_gn_"):  # our Triton statistics: partials, combine
        return "gn_stats"
    # the apply: rsqrt of Inductor's own statistics; from msfp_fast::gn_stats's output, the select of mean and rstd
    # expanded per channel and the shift -mean * rstd
    if "rsqrt" in name or "group_norm" in name or ("select" in name and "expand" in name and "_neg_" in name):
        return "gn_apply"
    if "select" in name and "unsqueeze" in name and ("sigmoid" in name or "silu" in name):
        return "gn_apply"  # session 19: the [N, C] rows of msfp_fast::gn_scale_shift, then SiLU (resnet epilogues
        # with the time embedding also select and unsqueeze, without SiLU; the transformers' GroupNorms land in other)
    if "sigmoid" in name and "split" in name:  # GEGLU with GELU's tanh form (gelu_fast, a sigmoid; session 18)
        return "geglu"
    for key, cat in (("layer_norm", "layernorm"), ("gelu", "geglu"), ("scaled_dot_product", "qkv_quant")):
        if key in name:
            return cat
    return "other_pointwise"


def min_bytes(batch: int) -> dict[str, float]:
    """Bytes each category must move per step at this batch size (64x64x4 latents)."""
    est = dict.fromkeys(PER_TOKEN_CHANNEL, 0.0)
    for side, c in TRANSFORMERS:
        for k, v in PER_TOKEN_CHANNEL.items():
            est[k] += v * batch * side * side * c
    est["other_pointwise"] += sum(RESNET_RESIDUAL * batch * s * s * c for s, c in RESNETS)
    gn = sum(batch * s * s * c for s, c in GROUP_NORMS)
    est["gn_stats"] = 2.0 * gn  # one bf16 read
    est["gn_apply"] = 3.0 * gn  # one bf16 read, one E4M3 write
    return est


def table(rows: list[dict], batch: int) -> str:
    meas: dict[str, float] = {}
    calls: dict[str, float] = {}
    for r in rows:
        if r["kernel"].startswith(("triton", "_gn_")):
            c = category(r["kernel"])
            meas[c] = meas.get(c, 0.0) + r["ms_per_step"]
            calls[c] = calls.get(c, 0.0) + r["calls_per_step"]
    est = min_bytes(batch)
    lines = ["| category | calls/step | measured ms | min. bytes (MB) | at copy bandwidth (ms) | achieved | ms above |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    tot_ms = tot_roof = tot_b = 0.0
    for k in sorted(meas, key=lambda k: -(meas[k] - est[k] / COPY_BW * 1e3)):
        roof = est[k] / COPY_BW * 1e3
        lines.append(f"| {k} | {calls[k]:.0f} | {meas[k]:.3f} | {est[k] / 1e6:.0f} | {roof:.3f} | "
                     f"{roof / meas[k] * 100:.0f}% | {meas[k] - roof:.3f} |")
        tot_ms, tot_roof, tot_b = tot_ms + meas[k], tot_roof + roof, tot_b + est[k]
    lines.append(f"| all | | {tot_ms:.3f} | {tot_b / 1e6:.0f} | {tot_roof:.3f} | {tot_roof / tot_ms * 100:.0f}% | "
                 f"{tot_ms - tot_roof:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profiles", help="profiles.json of a bench_gpu_sd15 --profile --log-dir run")
    ap.add_argument("--key", default="w4a4_b8")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    print(table(json.loads(Path(args.profiles).read_text())[args.key]["rows"], args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
