# Device call 7 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=330 BUDGET=80 bash results/mnist/call7.sh
# Four eval_mnist runs side by side (2 x H200), each its own folder and time limit, all launched at t = 0, 3 seeds:
#   a  cond MSFP + TALoRA + DFA and MSFP + LoRA (never measured: calls 3, 4, 6 cut them; cond calibration alone
#      takes ~85 s, so they get the whole limit; their fine-tuning starts after the uncond tasks' has ended);
#   b  uncond MSFP + TALoRA + DFA with learned activation scales (FinetuneConfig.learn_act_scales);
#   e  uncond MSFP PTQ and MSFP + TALoRA + DFA in EfficientDM's quantization scope (its quant_model.py): the
#      1x1 shortcut convs ("skip") and downsampler convs ("op"), which EfficientDM leaves in float, and its 8-bit
#      time-embedding MLP, here at 8 bits; attention operands (EfficientDM quantizes conv/linear only) in float;
#   c  uncond INT4 + LoRA, MSFP + TALoRA (no DFA) and MSFP + TALoRA + DFA again (the baseline of b and e in the
#      same call: same GPU sharing, so the same number of fine-tuning steps);
#   s  beside them, tools/sensitivity_mnist.py on mnist-uncond: which quantizer groups cost what.
# No FP32 rows (call 4's stand; their sampling would compete with the cond calibration), so no PSNR vs FP32.
# Every task writes its file when it finishes, so a cut returns the finished tasks. Fine-tuning as call 6 (batch 64, 128 FP trajectories, cosine schedule fitted to BUDGET s).
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L
R=/tmp/r; mkdir -p $R/a $R/b $R/e $R/c $R/s
L=${LIMIT:-330}
E="--device cuda --threads 1 --gpu-slots 3 --samples 2500 --batch 2500 --calib-samples 16 --calib-steps 25 \
   --finetune-steps 3000 --finetune-time-budget ${BUDGET:-80} --finetune-samples 128 --finetune-batch 64 \
   --log-every 100 --check-seeds= --launch-margin 60 --time-limit $L"
run() {  # folder, then eval_mnist arguments
  d=$1; shift
  timeout $(( L + 30 )) python3 tools/eval_mnist.py $E --out $R/$d "$@" > $R/$d/eval.log 2>&1 \
    || timeout 30 python3 tools/eval_mnist.py $E --out $R/$d "$@" --merge-only > $R/$d/merge.log 2>&1
}
A="--models cond --rows msfp+talora+dfa,msfp+lora --jobs 6"
B="--models uncond --rows msfp+talora+dfa --learn-act-scales --jobs 3"
S="--models uncond --rows msfp,msfp+talora+dfa --keep-8bit first,last,time_embedding.*,*.conv_shortcut,*.downsamplers.* --float-attention --jobs 6"
C="--models uncond --rows msfp+talora+dfa,int4+lora,msfp+talora --jobs 9"
CUDA_VISIBLE_DEVICES=0 timeout $(( L + 20 )) python3 tools/sensitivity_mnist.py --device cuda --model uncond \
  --samples 64 --steps 50 --out $R/s > $R/s/uncond.log 2>&1 &
set -f  # the --keep-8bit patterns are not file globs
run a $A & run b $B & run e $S & run c $C &
wait
set +f
echo "eval done $(( $(date +%s) - T0 ))s"
for d in a b e c; do echo "== $d"; cat $R/$d/quality_mnist.md; grep -h "stage finetune" $R/$d/log_*.txt | cut -c1-220; done
tail -3 $R/s/*.log; cat $R/s/*.md
cd $R && tar czf $OUT/call7.tar.gz --exclude '*.pt' --exclude '.gpu*' a b e c s
ls -la $OUT
echo "total $(( $(date +%s) - T0 ))s"
