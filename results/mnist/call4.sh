# Device call 4 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=270 SAMPLES=2500 FT=400 bash results/mnist/call4.sh
# After the skip-concatenation split (QuantConfig.split_concat): the priority rows (FP32, MSFP PTQ, MSFP + LoRA,
# MSFP + TALoRA + DFA) for 2 models x 3 seeds, then INT4 / FP4 signed PTQ (--late-rows: cut first); calibration
# 16 x 25, no onnxruntime check on the device (checked on the CPU), cut at LIMIT seconds; results under $OUT.
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L
NG=$(nvidia-smi -L | wc -l)
R=/tmp/r; mkdir -p $R
J=$(( NG > 1 ? 24 : 12 ))
E="--device cuda --jobs $J --threads 1 --gpu-slots 3 --samples ${SAMPLES:-2500} --batch 2500 --calib-samples 16 \
   --calib-steps 25 --finetune-steps ${FT:-400} --finetune-samples 64 --finetune-batch 32 --log-every 25 \
   --rows fp32,msfp,msfp+lora,msfp+talora+dfa,int4,fp4 --late-rows int4,fp4 --check-seeds= --out $R"
timeout $(( ${LIMIT:-270} + 25 )) python3 tools/eval_mnist.py $E --time-limit ${LIMIT:-270} > $R/eval.log 2>&1 \
  || timeout 40 python3 tools/eval_mnist.py $E --merge-only > $R/merge.log 2>&1
echo "eval done $(( $(date +%s) - T0 ))s"
nvidia-smi --query-gpu=name,memory.used --format=csv
tail -5 $R/eval.log; cat $R/quality_mnist.md
cp $R/quality_mnist.json $R/quality_mnist.md $OUT/; cp $R/loss_curves.png $OUT/
cd $R && tar czf $OUT/grids.tar.gz samples_*.png && tar czf $OUT/logs.tar.gz *.log log_*.txt task_*.json
ls -la $OUT
