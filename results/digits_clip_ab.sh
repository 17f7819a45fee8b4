# Session 21 (CPU, 2 cores): does DDIM's x0 clipping amplify the W4A4 error? The digits rows at the digits A/B's
# settings (results/digits_data_ab.sh: DDIM 20, 1000 samples, 200 fine-tuning steps, LoRA rank 4, 32 trajectories),
# seeds 0-2, both models: FP32, MSFP PTQ and MSFP + TALoRA + DFA sampled without clipping (--no-clip-sample), and
# MSFP PTQ with clipping (the clipped FP32 and fine-tuned rows are digits_data_ab.json's fp_n32 runs). Two runs at a
# time, ~3-9 min each; then the merge into results/digits_clip_ab.json:
#   bash results/digits_clip_ab.sh [OUT]
# What ran (session 21): the unclipped runs of uncond seeds 0-2 and cond seeds 0-1 (cond seed 1 and uncond seed 2
# without their fine-tuned row), then it was stopped: the unclipped W4A4 trajectories diverged on 3 of those 5 seeds.
# results/digits_clip_ab.json was merged from their logs next to digits_data_ab.json's clipped runs, not by the
# merge below.
set -e
export OUT=${1:-/tmp/digits_clip}
mkdir -p "$OUT"
{ for seed in 0 1 2; do for m in uncond cond; do echo "$m $seed noclip fp32,msfp,msfp+talora+dfa --no-clip-sample"; done; done
  for seed in 0 1 2; do for m in uncond cond; do echo "$m $seed clip msfp"; done; done; } |
  xargs -P 2 -L 1 sh -c 'OMP_NUM_THREADS=1 .venv/bin/python tools/eval_quality.py --models $0 --rows $3 \
    --samples 1000 --steps 20 --finetune-steps 200 --lora-rank 4 --finetune-samples 32 --seed $1 --threads 1 $4 \
    --out "$OUT/$0_$2_s$1" > "$OUT/$0_$2_s$1.log" 2>&1'
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), {}
for model in ("uncond", "cond"):
    for clip in ("noclip", "clip"):
        for seed in (0, 1, 2):
            q = json.loads((out / f"{model}_{clip}_s{seed}" / "quality.json").read_text())[model]
            runs.setdefault(model, {}).setdefault(clip, []).append(
                {"seed": seed, **{row: {"fid": r["fid_digits"], "psnr": r["psnr_vs_fp32"],
                                        "label_accuracy": r.get("label_accuracy"), "settings": r["settings"]}
                                  for row, r in q.items()}})
note = " ".join(ln[2:].strip() for ln in open("results/digits_clip_ab.sh").read().splitlines()[:5]).rstrip(":")
Path("results/digits_clip_ab.json").write_text(json.dumps({"note": note, "runs": runs}, indent=1))
PY
