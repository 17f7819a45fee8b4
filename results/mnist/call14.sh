# Device call 14 of issue 12 (session 20: one nvidia-h200), run from the repository root on the GPU machine after
# the wheel/pip installs:
#   RUNS="u128 u1k u4k c128 c2k" LIMIT=480 BUDGET=330 timeout 520 bash results/mnist/call14.sh
# The question: is the strict goal row (MSFP + TALoRA + DFA, LoRA rank 32, 1800 uncond / 1500 cond steps at batch
# 64) limited by its distillation data? Every row so far trained on 128 FP trajectories x 50 DDIM steps (6400
# inputs; 1800 steps x 64 = 18 passes over them) and reported only the loss on those same inputs. Each run here
# holds 32 more trajectories out of training (FinetuneConfig.holdout_samples; in call 14 drawn after the training
# ones, since commit 7152a1f from a seed of their own; the training data and steps are exactly the goal row's either
# way) and logs their loss before / after, and varies only the number of training trajectories:
#   u128 / c128  the goal row as in calls 11-12 (128 trajectories), seed 0, + the held-out loss
#   u1k / u4k    uncond with 1024 / 4096 trajectories (2.25 / 0.56 passes over the data), seed 0
#   c2k          cond with 2048 trajectories, seed 0
#   u4kb         uncond, 4096 trajectories at batch 256 (4x the data per step), seed 0
#   vu4k         the labelled variant "last decoder block at 8 bits" (not strict W4A4; call 13) with 4096
#                trajectories
#   vu4kl / u4kl vu4k / u4k with the activation scales also learned (--learn-act-scales; call 17)
# SEEDS sets every run's seeds (default 0); USEEDS / CSEEDS / VSEEDS override them for the uncond / cond / variant
# runs. What ran (session 20, results/mnist/device_runs.md): call 14 RUNS="c128 c2k u128 u1k u4k" LIMIT=470
# BUDGET=320 (the cond runs were cut at the limit while sampling: cond calibration took ~90 s beside fine-tuning
# processes). Session 21: call 15 RUNS=c2k CSEEDS=0,1,2 LIMIT=480 BUDGET=320, call 16 RUNS="u4k vu4k" USEEDS=1,2
# VSEEDS=0,1,2 LIMIT=530 BUDGET=330, call 17 RUNS="vu4kl u4kl" VSEEDS=0,1,2 USEEDS=0 LIMIT=450 BUDGET=300.
# 2500 samples per seed (the table's count). SEEDS=0,1,2 runs three seeds per run.
# DEV/SAMPLES/N128/N4K/... override the device settings for a CPU dry run:
#   DEV=cpu SAMPLES=8 BATCH=8 DDIM=4 CALIB=2 CALIB_STEPS=4 USTEPS=3 CSTEPS=3 HOLD=2 N128=4 N1K=6 N2K=6 N4K=8 FT_BATCH=4 \
#     R=/tmp/dry OUT=/tmp RUNS="u128 u4k c2k" LIMIT=400 bash results/mnist/call14.sh
set -xf  # -f: the --keep-8bit patterns stay literal
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L || true
R=${R:-/tmp/r}
RUNS=${RUNS:-u128 u1k u4k c128 c2k}
GPUS=${GPUS:-0}
mkdir -p $R/slots
for d in $RUNS; do
  mkdir -p $R/$d
  for g in ${GPUS//,/ }; do for k in $(seq 0 $(( ${SLOTS:-4} - 1 ))); do ln -sf $R/slots/.gpu${g}_slot$k.lock $R/$d/.gpu${g}_slot$k.lock; done; done
done
L=${LIMIT:-480}
S=${SEEDS:-0}
njobs() { echo $(( $(echo $1 | tr -cd , | wc -c) + 1 )); }
E="--device ${DEV:-cuda} --threads 1 --gpu-slots ${SLOTS:-4} --batch ${BATCH:-2500} --samples ${SAMPLES:-2500} \
   --steps ${DDIM:-50} --calib-samples ${CALIB:-16} --calib-steps ${CALIB_STEPS:-25} --finetune-holdout ${HOLD:-32} \
   --log-every ${LOG_EVERY:-100} --launch-margin 20 --lora-rank 32 --finetune-time-budget ${BUDGET:-330} \
   --rows msfp+talora+dfa --check-seeds= --time-limit $L"
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  CUDA_VISIBLE_DEVICES=$GPUS timeout $(( L + 25 )) python3 tools/eval_mnist.py $E --out $R/$d "$@" > $R/$d/eval.log 2>&1
  echo "$d done $(( $(date +%s) - T0 ))s"
}
on() { case " $RUNS " in *" $1 "*) return 0;; esac; return 1; }
pack() { (cd $R && tar czf ${OUT:-/tmp}/call14_${RUNS// /-}.tar.gz --exclude '*.pt' --exclude '.gpu*' $RUNS); }
trap 'echo "TERM at $(( $(date +%s) - T0 ))s: packing what finished"; pack; exit 124' TERM
US=${USEEDS:-$S}; CS=${CSEEDS:-$S}; VS=${VSEEDS:-$S}
U="--models uncond --finetune-steps ${USTEPS:-1800} --seeds $US --jobs $(njobs $US)"
C="--models cond --finetune-steps ${CSTEPS:-1500} --seeds $CS --jobs $(njobs $CS)"
V="--models uncond --finetune-steps ${USTEPS:-1800} --seeds $VS --jobs $(njobs $VS) --keep-8bit first,last,up_blocks.3.*"
# the cond runs first: they are the slowest (call 13: start the longest fine-tuning first)
B=${FT_BATCH:-64}
on c128 && run c128 $C --finetune-samples ${N128:-128} --finetune-batch $B &
on c2k && run c2k $C --finetune-samples ${N2K:-2048} --finetune-batch $B &
on u128 && run u128 $U --finetune-samples ${N128:-128} --finetune-batch $B &
on u1k && run u1k $U --finetune-samples ${N1K:-1024} --finetune-batch $B &
on u4k && run u4k $U --finetune-samples ${N4K:-4096} --finetune-batch $B &
on u4kb && run u4kb $U --finetune-samples ${N4K:-4096} --finetune-batch $(( B * 4 )) &
on vu4k && run vu4k $V --finetune-samples ${N4K:-4096} --finetune-batch $B &
on vu4kl && run vu4kl $V --finetune-samples ${N4K:-4096} --finetune-batch $B --learn-act-scales &
on u4kl && run u4kl $U --finetune-samples ${N4K:-4096} --finetune-batch $B --learn-act-scales &
wait
echo "eval done $(( $(date +%s) - T0 ))s"
set +f  # the summary globs the task logs
for d in $RUNS; do echo "== $d"; cat $R/$d/quality_mnist.md
  grep -h "stage finetune\|held-out\|distillation loss\|: FID" $R/$d/log_*.txt | cut -c1-240; done
pack
ls -la ${OUT:-/tmp}
echo "total $(( $(date +%s) - T0 ))s"
