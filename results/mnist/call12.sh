# Device call 12 of issue 12 (session 12: ONE nvidia-h200), run from the repository root on the GPU machine, after
# the wheel/pip installs, as two commands back to back on the warm machine (one start):
#   RUNS=gu LIMIT=300 BUDGET=240 bash results/mnist/call12.sh      (12a, ~280 s)
#   RUNS=gc LIMIT=320 BUDGET=260 bash results/mnist/call12.sh      (12b, ~300 s)
# gu / gc: the strict W4A4 goal row (MSFP + TALoRA + DFA, LoRA rank 32) exactly as call 11 ran it -- fixed 1800
# (uncond) / 1500 (cond) steps, 3 seeds, 3 fine-tuning processes on the GPU -- with the 5000 samples per seed
# (call 11: 2500; the task JSONs also give the FID of the first 2500, call 11's sample count) and the onnxruntime
# check of seed 0's ONNX (lowered on the device's CPU, compared with the torch quantized graph on held-out samples;
# call 11 had none). A GPU runs ~31 uncond or ~23 cond steps/s in all (calls 10, 11): 3 x 1800 uncond steps ~175 s,
# 3 x 1500 cond ~195 s, plus ~15-20 s of GPU per 5000 samples; one command for both (~550 s of GPU work) would leave
# no margin under the 600 s command limit. BUDGET is a safety only (the schedule is fitted to it when the average
# rate says the steps would not fit).
# Optional runs for a later call (RUNS="ku kc" / "lu lc", each ~200 s of GPU at 3 processes):
#   ku / kc  MSFP + TALoRA + DFA with --keep-8bit 'first,last,*.conv_shortcut' (not strict W4A4), same steps;
#   lu / lc  the strict goal row at LoRA lr 1e-3 x sqrt(4/32) = 3.5e-4 (rsLoRA's scaling from rank 4 to 32).
# GPUS lists the GPUs (never name one twice: CUDA then sees none, and eval_mnist exits 2 on such a list).
# DEV/SAMPLES/... override the device settings for a CPU dry run (results/mnist/device_runs.md, session 12).
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L || true
R=${R:-/tmp/r}
RUNS=${RUNS:-gu gc}
GPUS=${GPUS:-0}
mkdir -p $R/slots
for d in $RUNS; do
  mkdir -p $R/$d
  for g in ${GPUS//,/ }; do for k in $(seq 0 $(( ${SLOTS:-4} - 1 ))); do ln -sf $R/slots/.gpu${g}_slot$k.lock $R/$d/.gpu${g}_slot$k.lock; done; done
done
L=${LIMIT:-500}
E="--device ${DEV:-cuda} --threads 1 --gpu-slots ${SLOTS:-4} --batch ${BATCH:-2500} --samples ${SAMPLES:-5000} \
   --steps ${DDIM:-50} --calib-samples ${CALIB:-16} --calib-steps ${CALIB_STEPS:-25} --finetune-samples ${FT_SAMPLES:-128} \
   --finetune-batch ${FT_BATCH:-64} --log-every ${LOG_EVERY:-100} --check-seeds=${CHECK-0} --launch-margin 20"
F="--rows msfp+talora+dfa --lora-rank 32 --finetune-time-budget ${BUDGET:-400} --jobs 3"
K="--keep-8bit first,last,*.conv_shortcut"
LR="--lora-lr ${LORA_LR:-3.5e-4}"
S=${SEEDS:-0,1,2}
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  CUDA_VISIBLE_DEVICES=$GPUS timeout $(( L + 25 )) python3 tools/eval_mnist.py $E --time-limit $L --out $R/$d "$@" \
    > $R/$d/eval.log 2>&1
  echo "$d done $(( $(date +%s) - T0 ))s"
}
on() { case " $RUNS " in *" $1 "*) return 0;; esac; return 1; }
on gu && run gu --models uncond --seeds $S $F --finetune-steps ${USTEPS:-1800} &
on gc && run gc --models cond --seeds $S $F --finetune-steps ${CSTEPS:-1500} &
on ku && run ku --models uncond --seeds $S $F $K --finetune-steps ${USTEPS:-1800} &
on kc && run kc --models cond --seeds $S $F $K --finetune-steps ${CSTEPS:-1500} &
on lu && run lu --models uncond --seeds $S $F $LR --finetune-steps ${USTEPS:-1800} &
on lc && run lc --models cond --seeds $S $F $LR --finetune-steps ${CSTEPS:-1500} &
wait
echo "eval done $(( $(date +%s) - T0 ))s"
for d in $RUNS; do echo "== $d"; cat $R/$d/quality_mnist.md
  grep -h "stage calibrate\|stage finetune\|ONNX\|onnx\|check\|: FID" $R/$d/log_*.txt | cut -c1-240; done
cd $R && tar czf ${OUT:-/tmp}/call12_${RUNS// /_}.tar.gz --exclude '*.pt' --exclude '.gpu*' $RUNS
ls -la ${OUT:-/tmp}
echo "total $(( $(date +%s) - T0 ))s"
