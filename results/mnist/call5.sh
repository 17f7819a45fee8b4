# Device call 5 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=420 FT=4000 BUDGET=150 bash results/mnist/call5.sh
# After the CUDA-graph fine-tuning step (msfp_compiler/distillation.py): the goal rows MSFP + LoRA and
# MSFP + TALoRA + DFA for both models and 3 seeds with up to FT steps at batch 64, the cosine schedule fitted to
# BUDGET seconds of fine-tuning per task (128 FP trajectories), FP32 again for the
# PSNR reference, and beside it MSFP + TALoRA + DFA with learned activation scales (uncond, 3 seeds). A gate first:
# the CUDA-graph-vs-eager test; if it fails, fine-tuning falls back to 400 eager steps. Cut at LIMIT s; results
# under $OUT.
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L
timeout 100 python3 -m pytest -x -q -p no:cacheprovider tests/test_distillation.py -k cuda_graph > $OUT/gate.log 2>&1
GATE=$?; tail -3 $OUT/gate.log; FT=${FT:-4000}; [ $GATE = 0 ] || FT=400
echo "gate rc $GATE, FT $FT, $(( $(date +%s) - T0 ))s"
L=$(( ${LIMIT:-420} - $(date +%s) + T0 ))
R=/tmp/r; R2=/tmp/r2; mkdir -p $R $R2
E="--device cuda --threads 1 --gpu-slots 3 --samples 2500 --batch 2500 --calib-samples 16 --calib-steps 25 \
   --finetune-steps $FT --finetune-time-budget ${BUDGET:-150} --finetune-samples 128 --finetune-batch 64 --log-every 100 --check-seeds= --time-limit $L"
timeout $(( L + 25 )) python3 tools/eval_mnist.py $E --jobs 18 --rows fp32,msfp+lora,msfp+talora+dfa --out $R \
  > $R/eval.log 2>&1 &
timeout $(( L + 25 )) python3 tools/eval_mnist.py $E --jobs 3 --models uncond --rows msfp+talora+dfa \
  --learn-act-scales --out $R2 > $R2/eval.log 2>&1 &
wait
for d in $R $R2; do [ -f $d/quality_mnist.json ] || timeout 40 python3 tools/eval_mnist.py $E --out $d --merge-only \
  > $d/merge.log 2>&1; done
echo "eval done $(( $(date +%s) - T0 ))s"
grep -h "steps/s" $R/log_*.txt $R2/log_*.txt | tail -4
cat $R/quality_mnist.md $R2/quality_mnist.md
cp $R/quality_mnist.json $R/quality_mnist.md $R/loss_curves.png $OUT/
cp $R2/quality_mnist.json $OUT/las_quality_mnist.json
mkdir -p $R/las && cp $R2/*.log $R2/log_*.txt $R2/task_*.json $R2/quality_mnist.md $R/las/
cd $R && tar czf $OUT/grids.tar.gz samples_*.png && tar czf $OUT/logs.tar.gz *.log log_*.txt task_*.json las
ls -la $OUT
