# How call 12 (results/mnist/call12/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call12/ without the logs; results/mnist/device_runs.md, call 12).
# gu / gc: the strict W4A4 goal row (MSFP + TALoRA + DFA, LoRA rank 32, fixed 1800 / 1500 steps, 3 seeds) rerun on
# one H200 with the 5000 samples per seed and the onnxruntime check of seed 0. They become the goal row with
# "fid" = the FID of each seed's first 2500 samples (the table's sample count, comparable with every other row) and
# "fid_5000" = all 5000 (as call 10); call 11's goal rows (the same setup at 2500 samples) move to "variants".
import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call12")
GOAL = "MSFP + TALoRA + DFA"
d = json.load(open(P))
v = d["variants"]
for model, folder in (("uncond", "gu"), ("cond", "gc")):
    j = json.load(open(C / folder / "quality_mnist.json"))
    new = dict(j[model][GOAL])
    new["fid_5000"], new["fid"] = new["fid"], new.pop("fid_first_2500")
    old = d[model][GOAL]
    v[model][f"{GOAL}, call 11 (2500 samples, no ORT check; the goal row until call 12)"] = old
    d[model][GOAL] = {**new, "call": 12}
    d["settings"][f"call12_{folder}"] = j["settings"]
d["settings"]["call12"] = {"note": (
    "results/mnist/call12.sh on one H200 (RUNS='gu gc'): uncond / cond MSFP + TALoRA + DFA, strict W4A4, LoRA rank "
    "32, fixed 1800 / 1500 steps, 3 seeds, all 6 fine-tuning processes on the one GPU, 5000 samples per seed "
    "('fid' = first 2500, 'fid_5000' = all), onnxruntime check of seed 0 ('onnx_check'); settings under call12_<run>")}
v["note"] += "; call 12: the goal row rerun with 5000 samples and the ORT check of seed 0 (call 11's kept as variants)"
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
