# Session 20 (CPU, 2 cores): the digits-uncond MSFP + TALoRA + DFA row (the digits table's settings: 1000 samples,
# DDIM 20, 200 fine-tuning steps, LoRA rank 4) fine-tuned on 32 FP trajectories (FinetuneConfig.samples' default, as
# the table) or 256, seeds 0-2, two runs at a time, ~6 min each; then the merge into results/digits_data_ab.json:
#   bash results/digits_data_ab.sh [OUT]
set -e
OUT=${1:-/tmp/digits_ab}
for seed in 0 1 2; do for n in 32 256; do echo "$seed $n"; done; done | xargs -P 2 -n 2 sh -c \
  'OMP_NUM_THREADS=1 .venv/bin/python tools/eval_quality.py --models uncond --rows msfp+talora+dfa --samples 1000 \
     --steps 20 --finetune-steps 200 --lora-rank 4 --finetune-samples $1 --seed $0 --threads 1 \
     --out '"$OUT"'/n$1_s$0 > '"$OUT"'/n$1_s$0.log 2>&1' 
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), {}
for n in (32, 256):
    for seed in (0, 1, 2):
        q = json.loads((out / f"n{n}_s{seed}" / "quality.json").read_text())["uncond"]
        r, fp = q["MSFP + TALoRA + DFA"], q["FP32"]
        rows.setdefault(str(n), []).append({"seed": seed, "fid": r["fid_digits"], "fp32_fid": fp["fid_digits"],
                                            "ratio": r["fid_digits"] / fp["fid_digits"], "psnr": r["psnr_vs_fp32"],
                                            "distill_loss": r.get("distill_loss"), "settings": r["settings"]})
Path("results/digits_data_ab.json").write_text(json.dumps({"note": open("results/digits_data_ab.sh").readline()[2:].strip(), "trajectories": rows}, indent=1))
PY
