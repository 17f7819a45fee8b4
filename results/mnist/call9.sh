# Device call 9 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=170 STEPS=300 BUDGET=45 bash results/mnist/call9.sh      (~200 s command on nvidia-h200-x2)
# Three eval_mnist runs of mnist-cond launched together at t = 0 (9 processes on 2 x H200), 3 seeds each:
#   r32  MSFP + TALoRA + DFA, strict W4A4, LoRA rank 32 (EfficientDM's rank; uncond gained 60-115 FID per seed in
#        call 8);
#   r4   the same with rank 4 (the default): r32's paired baseline AND the fixed-step run: both run exactly STEPS
#        fine-tuning steps on every seed (BUDGET only as a safety: a task slower than STEPS/BUDGET steps/s fits its
#        cosine schedule to fewer steps, and its JSON says so), so the step count no longer varies with the seed;
#   fp4  FP4 signed PTQ (the cond cell of the goal "MSFP PTQ below signed-FP4 PTQ"; no fine-tuning), on GPU 1 only,
#        since r32 and r4 put seeds 0 and 2 on GPU 0 and seed 1 on GPU 1.
# Only 9 processes (call 7: 30 processes stretched cond calibration from 4-7 s to 120-190 s). Time per cond task in
# call 8: ~125 s besides training (imports, capture 14 s, calibration 4-7 s, search 3 s, FP trajectories + graph
# capture 10 s, passes 10 s, sampling 2500 x 50 steps 45-75 s, FID), so LIMIT - 130 s is left for training.
# Every task writes its file when it finishes, so a cut returns the finished tasks. DEV/SAMPLES/... override the
# device settings for a CPU dry run (see results/mnist/device_runs.md, call 9).
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L || true
R=${R:-/tmp/r}; mkdir -p $R/r32 $R/r4 $R/fp4
L=${LIMIT:-170}
N=${STEPS:-300}
E="--device ${DEV:-cuda} --threads 1 --gpu-slots 4 --samples ${SAMPLES:-2500} --batch ${SAMPLES:-2500} \
   --steps ${DDIM:-50} --calib-samples ${CALIB:-16} --calib-steps ${CALIB_STEPS:-25} --finetune-samples ${FT_SAMPLES:-128} \
   --finetune-batch ${FT_BATCH:-64} --log-every ${LOG_EVERY:-25} --check-seeds= --launch-margin 20 --jobs 3 \
   --seeds ${SEEDS:-0,1,2} --models cond"
F="--finetune-steps $N --finetune-time-budget ${BUDGET:-45}"
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  timeout $(( L + 12 )) python3 tools/eval_mnist.py $E --time-limit $L --out $R/$d "$@" > $R/$d/eval.log 2>&1 \
    || timeout 20 python3 tools/eval_mnist.py $E --time-limit $L --out $R/$d "$@" --merge-only > $R/$d/merge.log 2>&1
  echo "$d done $(( $(date +%s) - T0 ))s"
}
run r32 --rows msfp+talora+dfa $F --lora-rank 32 &
run r4 --rows msfp+talora+dfa $F &
CUDA_VISIBLE_DEVICES=${FP4_GPU:-1} run fp4 --rows fp4 &
wait
echo "eval done $(( $(date +%s) - T0 ))s"
for d in r32 r4 fp4; do echo "== $d"; cat $R/$d/quality_mnist.md; grep -h "stage finetune" $R/$d/log_*.txt | cut -c1-230; done
cd $R && tar czf ${OUT:-/tmp}/call9.tar.gz --exclude '*.pt' --exclude '.gpu*' r32 r4 fp4
ls -la ${OUT:-/tmp}
echo "total $(( $(date +%s) - T0 ))s"
