# Device call 8 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=440 BUDGET=120 DELAY=60 bash results/mnist/call8.sh   (as run: 379 s command, 414 s of device time)
# Four eval_mnist runs (2 x H200), each its own folder, 3 seeds each:
#   a  cond MSFP + TALoRA + DFA, strict W4A4 (never measured: calls 3, 4, 6 and 7 cut it): launched FIRST, at t = 0;
#   e  cond MSFP + TALoRA + DFA in EfficientDM's scope (as call 7's uncond "e"), also at t = 0: 6 cond processes
#      calibrate alone (call 6: 85 s with 12 processes; call 7: 120-173 s with 30);
#   r  uncond MSFP + TALoRA + DFA with LoRA rank 32 (EfficientDM's rank; ours is 4), launched at t = DELAY;
#   c  uncond MSFP + TALoRA + DFA with rank 4, the same-call baseline of r (same GPU sharing), at t = DELAY.
# Fine-tuning as calls 6/7 (batch 64, 128 FP trajectories, cosine schedule fitted to BUDGET s). No FP32 rows (call 4's
# stand). Every task writes its file when it finishes, so a cut returns the finished tasks.
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L
R=/tmp/r; mkdir -p $R/a $R/e $R/r $R/c
L=${LIMIT:-450}
E="--device cuda --threads 1 --gpu-slots 3 --samples 2500 --batch 2500 --calib-samples 16 --calib-steps 25 \
   --finetune-steps 4000 --finetune-time-budget ${BUDGET:-120} --finetune-samples 128 --finetune-batch 64 \
   --log-every 100 --check-seeds= --launch-margin 60 --rows msfp+talora+dfa --jobs 3"
run() {  # folder, time limit, then eval_mnist arguments
  d=$1; l=$2; shift 2
  timeout $(( l + 30 )) python3 tools/eval_mnist.py $E --time-limit $l --out $R/$d "$@" > $R/$d/eval.log 2>&1 \
    || timeout 30 python3 tools/eval_mnist.py $E --time-limit $l --out $R/$d "$@" --merge-only > $R/$d/merge.log 2>&1
}
D=${DELAY:-60}
set -f  # the --keep-8bit patterns are not file globs
run a $L --models cond &
run e $L --models cond --keep-8bit 'first,last,time_embedding.*,*.conv_shortcut,*.downsamplers.*' --float-attention &
sleep $D
run r $(( L - D )) --models uncond --lora-rank 32 &
run c $(( L - D )) --models uncond &
wait
set +f
echo "eval done $(( $(date +%s) - T0 ))s"
for d in a e r c; do echo "== $d"; cat $R/$d/quality_mnist.md; grep -h "stage finetune" $R/$d/log_*.txt | cut -c1-220; done
cd $R && tar czf $OUT/call8.tar.gz --exclude '*.pt' --exclude '.gpu*' a e r c
ls -la $OUT
echo "total $(( $(date +%s) - T0 ))s"
