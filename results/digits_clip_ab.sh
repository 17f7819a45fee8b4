# Session 21 (CPU, 2 cores): does DDIM's x0 clipping amplify the W4A4 error? The digits rows at the digits A/B's
# settings (results/digits_data_ab.sh: DDIM 20, 1000 samples, 200 fine-tuning steps, LoRA rank 4, 32 trajectories),
# sampled without clipping (--no-clip-sample): FP32, MSFP PTQ and MSFP + TALoRA + DFA, seeds 0-2, both models. The
# clipped FP32 and fine-tuned rows are digits_data_ab.json's fp_n32 runs (same settings). Two runs at a time,
# ~8-12 min each; then the merge into results/digits_clip_ab.json:
#   bash results/digits_clip_ab.sh [OUT]
# What ran (session 21): uncond seeds 0-2 and cond seeds 0-1, stopped there (cond seed 1 after its MSFP PTQ row,
# uncond seed 2 after its MSFP PTQ row): the unclipped W4A4 trajectories had diverged on 3 of those 5 seeds. The
# merge below reads whatever rows each run finished.
set -e
export OUT=${1:-/tmp/digits_clip}
mkdir -p "$OUT"
for seed in 0 1 2; do for m in uncond cond; do echo "$m $seed"; done; done |
  xargs -P 2 -L 1 sh -c 'OMP_NUM_THREADS=1 .venv/bin/python tools/eval_quality.py --models $0 \
    --rows fp32,msfp,msfp+talora+dfa --samples 1000 --steps 20 --finetune-steps 200 --lora-rank 4 \
    --finetune-samples 32 --seed $1 --threads 1 --no-clip-sample --out "$OUT/$0_noclip_s$1" \
    > "$OUT/$0_noclip_s$1.log" 2>&1'
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ab = json.loads(Path("results/digits_data_ab.json").read_text())["runs"]
runs = {}
for model in ("uncond", "cond"):
    for seed in (0, 1, 2):
        q = out / f"{model}_noclip_s{seed}" / "quality.json"
        if not q.exists():
            continue
        rows = json.loads(q.read_text())[model]
        clipped = next(r for r in ab[model]["fp_n32"] if r["seed"] == seed)
        runs.setdefault(model, []).append({"seed": seed, "unclipped": {
            name: {"fid": round(r["fid_digits"], 2), "psnr": None if name == "FP32" else round(r["psnr_vs_fp32"], 2)}
            for name, r in rows.items()},
            "clipped (results/digits_data_ab.json fp_n32)": {"FP32": {"fid": clipped["fp32_fid"]},
                                                              "MSFP + TALoRA + DFA": {"fid": clipped["fid"],
                                                                                      "psnr": clipped["psnr"]}}})
note = " ".join(ln[2:].strip() for ln in open("results/digits_clip_ab.sh").read().splitlines()[:9])
Path("results/digits_clip_ab.json").write_text(json.dumps({"note": note, "runs": runs}, indent=1))
PY
