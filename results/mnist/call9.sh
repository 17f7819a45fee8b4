# Device call 9 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=310 STEPS=300 BUDGET=80 bash results/mnist/call9.sh      (<= 350 s command on nvidia-h200-x2)
# Seven eval_mnist runs launched together at t = 0 (17 processes on 2 x H200), all on mnist-cond except the last:
#   r32  MSFP + TALoRA + DFA, strict W4A4, LoRA rank 32 (EfficientDM's rank; uncond gained 60-115 FID per seed in
#        call 8), 3 seeds;
#   r4   the same with rank 4 (the default), 3 seeds: r32's paired baseline;
#   il   INT4 + LoRA, 3 seeds;             } the cond rows never measured; with r4 they form an ablation at one
#   mt   MSFP + TALoRA, 3 seeds;           } fixed step count, computed in one call
#   fp4  FP4 signed PTQ, 3 seeds (the cond cell of the goal "MSFP PTQ below signed-FP4 PTQ");
#   i2   INT4 PTQ seed 2 (call 4 measured seeds 0 and 1 only);
#   u2   uncond FP4 signed PTQ seed 2 (call 4 measured seeds 0 and 1 only).
# Every fine-tuned task runs exactly STEPS steps (BUDGET only as a safety: a task slower than STEPS/BUDGET steps/s
# fits its cosine schedule to fewer steps, and its JSON says so), so the step count no longer varies with the seed or
# the GPU sharing. All tasks start together so that every calibration runs before any fine-tuning (call 8: a
# calibration next to fine-tuning processes took 27-80 s instead of 4-7 s). GPU placement: eval_mnist spreads a run's
# seeds round-robin over CUDA_VISIBLE_DEVICES, so half the runs list the GPUs as "1,0": 6 fine-tuning processes and
# 8-9 tasks per GPU. Sampling slots are shared by all runs (each run's lock files are links into one folder): at most
# SLOTS tasks sample on a GPU at once, so tasks finish one after another and a time limit cuts whole tasks.
# Every task writes its task_*.json when it finishes, so a cut returns the finished tasks; the parent merges them at
# LIMIT (stopping the tasks still running: up to 10 s, then the merge, a few seconds); should the outer timeout
# (LIMIT + 30 s) kill it before, run `eval_mnist.py ... --merge-only` on the returned folder here. DEV/SAMPLES/... override the
# device settings for a CPU dry run (see results/mnist/device_runs.md, call 9).
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L || true
R=${R:-/tmp/r}
RUNS="r32 r4 il mt fp4 i2 u2"
mkdir -p $R/slots
for d in $RUNS; do
  mkdir -p $R/$d
  for g in 0 1; do for k in $(seq 0 $(( ${SLOTS:-4} - 1 ))); do ln -sf $R/slots/.gpu${g}_slot$k.lock $R/$d/.gpu${g}_slot$k.lock; done; done
done
L=${LIMIT:-310}
N=${STEPS:-300}
E="--device ${DEV:-cuda} --threads 1 --gpu-slots ${SLOTS:-4} --samples ${SAMPLES:-2500} --batch ${SAMPLES:-2500} \
   --steps ${DDIM:-50} --calib-samples ${CALIB:-16} --calib-steps ${CALIB_STEPS:-25} --finetune-samples ${FT_SAMPLES:-128} \
   --finetune-batch ${FT_BATCH:-64} --log-every ${LOG_EVERY:-25} --check-seeds= --launch-margin 20 --jobs 3"
F="--finetune-steps $N --finetune-time-budget ${BUDGET:-80}"
S=${SEEDS:-0,1,2}
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  timeout $(( L + 30 )) python3 tools/eval_mnist.py $E --time-limit $L --out $R/$d "$@" > $R/$d/eval.log 2>&1
  echo "$d done $(( $(date +%s) - T0 ))s"
}
G="${GPUS:-0,1}"; GR="${GPUS_REV:-1,0}"
CUDA_VISIBLE_DEVICES=$G run r32 --models cond --seeds $S --rows msfp+talora+dfa $F --lora-rank 32 &
CUDA_VISIBLE_DEVICES=$GR run r4 --models cond --seeds $S --rows msfp+talora+dfa $F &
CUDA_VISIBLE_DEVICES=$G run il --models cond --seeds $S --rows int4+lora $F &
CUDA_VISIBLE_DEVICES=$GR run mt --models cond --seeds $S --rows msfp+talora $F &
CUDA_VISIBLE_DEVICES=$G run fp4 --models cond --seeds $S --rows fp4 &
CUDA_VISIBLE_DEVICES=${GPU_I2:-1} run i2 --models cond --seeds ${SEED2:-2} --rows int4 &
CUDA_VISIBLE_DEVICES=${GPU_U2:-0} run u2 --models uncond --seeds ${SEED2:-2} --rows fp4 &
wait
echo "eval done $(( $(date +%s) - T0 ))s"
for d in $RUNS; do echo "== $d"; cat $R/$d/quality_mnist.md; grep -h "stage calibrate\|stage finetune" $R/$d/log_*.txt | cut -c1-200; done
cd $R && tar czf ${OUT:-/tmp}/call9.tar.gz --exclude '*.pt' --exclude '.gpu*' $RUNS
ls -la ${OUT:-/tmp}
echo "total $(( $(date +%s) - T0 ))s"
