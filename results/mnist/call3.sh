# Device call 3 of issue 12 (run from the repository root on the GPU machine, after the wheel/pip installs):
#   LIMIT=340 SAMPLES=2500 FT=400 bash results/mnist/call3.sh
# The whole table in one command: 2 models x 8 rows x 3 seeds, every task a process (tools/eval_mnist.py), cut at
# LIMIT seconds (tasks still running are stopped, what finished is merged); results under $OUT.
set -x
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
T0=$(date +%s)
nvidia-smi -L
NG=$(nvidia-smi -L | wc -l)
R=/tmp/r; mkdir -p $R
J=$(( NG > 1 ? 30 : 16 ))
E="--device cuda --jobs $J --threads 1 --gpu-slots 3 --samples ${SAMPLES:-2500} --batch 2500 --calib-samples 32 \
   --calib-steps 25 --finetune-steps ${FT:-400} --finetune-samples 64 --finetune-batch 32 --log-every 25 \
   --check-seeds 0 --out $R"
timeout $(( ${LIMIT:-340} + 25 )) python3 tools/eval_mnist.py $E --time-limit ${LIMIT:-340} > $R/eval.log 2>&1 \
  || timeout 40 python3 tools/eval_mnist.py $E --merge-only > $R/merge.log 2>&1
echo "eval done $(( $(date +%s) - T0 ))s"
nvidia-smi --query-gpu=name,memory.used --format=csv
tail -5 $R/eval.log; cat $R/quality_mnist.md
cp $R/quality_mnist.json $R/quality_mnist.md $OUT/; cp $R/loss_curves.png $OUT/
cd $R && tar czf $OUT/grids.tar.gz samples_*.png && tar czf $OUT/logs.tar.gz *.log log_*.txt task_*.json
ls -la $OUT
