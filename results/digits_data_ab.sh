# Session 20 (CPU, 2 cores): the digits-uncond MSFP + TALoRA + DFA row at the digits table's settings (1000 samples,
# DDIM 20, 200 fine-tuning steps, LoRA rank 4), seeds 0-2, fine-tuned on 32 FP trajectories (the table's count),
# 256 FP trajectories, 32 of the quantized graph's own trajectories (--finetune-trajectories student) or both
# (mixed); two runs at a time, ~6 min each; then the merge into results/digits_data_ab.json:
#   bash results/digits_data_ab.sh [OUT]
set -e
export OUT=${1:-/tmp/digits_ab}
mkdir -p "$OUT"
for seed in 0 1 2; do for run in 32:fp 256:fp 32:student 32:mixed; do echo "$seed ${run%:*} ${run#*:}"; done; done |
  xargs -P 2 -n 3 sh -c 'OMP_NUM_THREADS=1 .venv/bin/python tools/eval_quality.py --models uncond \
    --rows msfp+talora+dfa --samples 1000 --steps 20 --finetune-steps 200 --lora-rank 4 --finetune-samples $1 \
    --finetune-trajectories $2 --seed $0 --threads 1 --out "$OUT/$2_n$1_s$0" > "$OUT/$2_n$1_s$0.log" 2>&1'
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), {}
for key in ("fp_n32", "fp_n256", "student_n32", "mixed_n32"):
    for seed in (0, 1, 2):
        q = json.loads((out / f"{key}_s{seed}" / "quality.json").read_text())["uncond"]
        r, fp = q["MSFP + TALoRA + DFA"], q["FP32"]
        traj, n = key.split("_n")
        runs.setdefault(key, []).append({"seed": seed, "trajectories": traj, "finetune_samples": int(n),
                                         "fid": r["fid_digits"], "fp32_fid": fp["fid_digits"],
                                         "ratio": r["fid_digits"] / fp["fid_digits"], "psnr": r["psnr_vs_fp32"],
                                         "distill_loss": r.get("distill_loss"), "settings": r["settings"]})
note = " ".join(ln[2:].strip() for ln in open("results/digits_data_ab.sh").read().splitlines()[:4]).rstrip(":")
Path("results/digits_data_ab.json").write_text(json.dumps({"note": note, "runs": runs}, indent=1))
PY
