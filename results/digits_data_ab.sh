# Session 20 (CPU, 2 cores): the digits MSFP + TALoRA + DFA row at the digits table's fine-tuning settings (DDIM 20,
# 200 fine-tuning steps, LoRA rank 4; 1000 samples), seeds 0-2. uncond: fine-tuned on 32 FP trajectories (the
# table's count), 256, 32 of the quantized graph's own trajectories (--finetune-trajectories student) or both (mixed);
# cond: 32 or 256 FP trajectories. Two runs at a time, ~6-9 min each; then the merge into results/digits_data_ab.json:
#   bash results/digits_data_ab.sh [OUT]
set -e
export OUT=${1:-/tmp/digits_ab}
mkdir -p "$OUT"
{ for seed in 0 1 2; do for run in 32:fp 256:fp 32:student 32:mixed; do echo "uncond $seed ${run%:*} ${run#*:}"; done
  for n in 32 256; do echo "cond $seed $n fp"; done; done; } |
  xargs -P 2 -n 4 sh -c 'OMP_NUM_THREADS=1 .venv/bin/python tools/eval_quality.py --models $0 \
    --rows msfp+talora+dfa --samples 1000 --steps 20 --finetune-steps 200 --lora-rank 4 --finetune-samples $2 \
    --finetune-trajectories $3 --seed $1 --threads 1 --out "$OUT/$0_$3_n$2_s$1" > "$OUT/$0_$3_n$2_s$1.log" 2>&1'
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), {}
for model, keys in (("uncond", ("fp_n32", "fp_n256", "student_n32", "mixed_n32")), ("cond", ("fp_n32", "fp_n256"))):
    for key in keys:
        for seed in (0, 1, 2):
            q = json.loads((out / f"{model}_{key}_s{seed}" / "quality.json").read_text())[model]
            r, fp = q["MSFP + TALoRA + DFA"], q["FP32"]
            traj, n = key.split("_n")
            runs.setdefault(model, {}).setdefault(key, []).append(
                {"seed": seed, "trajectories": traj, "finetune_samples": int(n), "fid": r["fid_digits"],
                 "fp32_fid": fp["fid_digits"], "ratio": r["fid_digits"] / fp["fid_digits"],
                 "psnr": r["psnr_vs_fp32"], "label_accuracy": r.get("label_accuracy"),
                 "distill_loss": r.get("distill_loss"), "settings": r["settings"]})
note = " ".join(ln[2:].strip() for ln in open("results/digits_data_ab.sh").read().splitlines()[:4]).rstrip(":")
Path("results/digits_data_ab.json").write_text(json.dumps({"note": note, "runs": runs}, indent=1))
PY
