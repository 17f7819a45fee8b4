# Device call 10 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=520 STEPS=1500 BUDGET=230 bash results/mnist/call10.sh      (<= 580 s command on nvidia-h200-x2)
# The goal row at a FIXED step count on both models, LoRA rank 4 vs rank 32, 5000 samples per seed (the issue's
# count; every task also reports the FID of its first 2500 samples, comparable with the tables of calls 4-9):
#   u4 / u32  uncond MSFP + TALoRA + DFA, strict W4A4, LoRA rank 4 / 32, 3 seeds;
#   c4 / c32  cond, the same;
#   fp        FP32 of both models, 3 seeds (the 5000-sample reference; its samples give the others' PSNR).
# 18 processes started together (12 fine-tuning, 6 per GPU). Pairs share a GPU: u4/u32 list the GPUs "0,1", c4/c32
# "1,0", so rank 4 and rank 32 of one seed always run side by side at the same step rate. Each fine-tuning task
# runs exactly STEPS steps; BUDGET only as a safety (a task slower than STEPS/BUDGET steps/s fits its cosine
# schedule to fewer steps and its JSON says so). Sampling slots (SLOTS per GPU) are shared by all runs (lock-file
# links into one folder), so tasks finish one after another and a time limit cuts whole tasks; every task writes its
# task_*.json when it finishes. The parent merges at LIMIT; should the outer timeout (LIMIT + 25 s) kill it first,
# run `eval_mnist.py ... --merge-only` on the returned folder here. DEV/SAMPLES/... override the device settings for
# a CPU dry run (results/mnist/device_runs.md, call 10).
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L || true
R=${R:-/tmp/r}
RUNS="fp u4 u32 c4 c32"
mkdir -p $R/slots
for d in $RUNS; do
  mkdir -p $R/$d
  for g in 0 1; do for k in $(seq 0 $(( ${SLOTS:-4} - 1 ))); do ln -sf $R/slots/.gpu${g}_slot$k.lock $R/$d/.gpu${g}_slot$k.lock; done; done
  # FP32's samples (written by run fp when it finishes) give every other run's PSNR vs FP32 at its merge
  [ $d = fp ] || for m in uncond cond; do for s in 0 1 2; do ln -sf $R/fp/samples_${m}_${s}_fp32.pt $R/$d/; done; done
done
L=${LIMIT:-520}
N=${STEPS:-1500}
NS=${SAMPLES:-5000}
E="--device ${DEV:-cuda} --threads 1 --gpu-slots ${SLOTS:-4} --samples $NS --batch ${BATCH:-2500} \
   --steps ${DDIM:-50} --calib-samples ${CALIB:-16} --calib-steps ${CALIB_STEPS:-25} --finetune-samples ${FT_SAMPLES:-128} \
   --finetune-batch ${FT_BATCH:-64} --log-every ${LOG_EVERY:-100} --check-seeds= --launch-margin 20"
F="--rows msfp+talora+dfa --finetune-steps $N --finetune-time-budget ${BUDGET:-230} --jobs 3"
S=${SEEDS:-0,1,2}
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  timeout $(( L + 25 )) python3 tools/eval_mnist.py $E --time-limit $L --out $R/$d "$@" > $R/$d/eval.log 2>&1
  echo "$d done $(( $(date +%s) - T0 ))s"
}
G="${GPUS:-0,1}"; GR="${GPUS_REV:-1,0}"
CUDA_VISIBLE_DEVICES=$G run fp --models uncond,cond --seeds $S --rows fp32 --jobs 6 &
CUDA_VISIBLE_DEVICES=$G run u4 --models uncond --seeds $S $F &
CUDA_VISIBLE_DEVICES=$G run u32 --models uncond --seeds $S $F --lora-rank 32 &
CUDA_VISIBLE_DEVICES=$GR run c4 --models cond --seeds $S $F &
CUDA_VISIBLE_DEVICES=$GR run c32 --models cond --seeds $S $F --lora-rank 32 &
wait
echo "eval done $(( $(date +%s) - T0 ))s"
for d in $RUNS; do echo "== $d"; cat $R/$d/quality_mnist.md; grep -h "stage calibrate\|stage finetune\|: FID" $R/$d/log_*.txt | cut -c1-220; done
cd $R && tar czf ${OUT:-/tmp}/call10.tar.gz --exclude '*.pt' --exclude '.gpu*' $RUNS
ls -la ${OUT:-/tmp}
echo "total $(( $(date +%s) - T0 ))s"
