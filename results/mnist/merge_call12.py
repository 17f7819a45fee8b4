# How call 12 (results/mnist/call12/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the tarballs of the call's two commands into results/mnist/call12/ without the logs; results/mnist/
# device_runs.md, call 12). gu / gc: the strict W4A4 goal row (MSFP + TALoRA + DFA, LoRA rank 32, fixed 1800 / 1500
# steps) rerun on one H200 with the 5000 samples per seed and the onnxruntime check of seed 0.
# - gu (3 seeds, ORT check PASS) becomes the uncond goal row with "fid" = the FID of each seed's first 2500 samples
#   (the table's sample count, comparable with every other row) and "fid_5000" = all 5000 (as call 10); call 11's
#   uncond goal row moves to "variants".
# - gc came back with seeds 1 and 2 only (seed 0 was cut at the command's time limit during its ORT check): the cond
#   goal row stays call 11's (3 seeds, 2500 samples) and gc enters "variants".
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


def row(folder: str, model: str) -> tuple[dict, dict]:
    j = json.load(open(C / folder / "quality_mnist.json"))
    r = dict(j[model][GOAL])
    r["fid_5000"], r["fid"] = r["fid"], r.pop("fid_first_2500")
    return {**r, "call": 12}, j["settings"]


new, st = row("gu", "uncond")
v["uncond"][f"{GOAL}, call 11 (2500 samples, no ORT check; the goal row until call 12)"] = d["uncond"][GOAL]
d["uncond"][GOAL] = new
d["settings"]["call12_gu"] = st
new, st = row("gc", "cond")
v["cond"][f"{GOAL}, call 12 rerun at 5000 samples (seeds 1, 2; seed 0 cut during its ORT check)"] = new
d["settings"]["call12_gc"] = st
d["settings"]["call12"] = {"note": (
    "results/mnist/call12.sh on one H200 (RUNS='gu gc'): uncond / cond MSFP + TALoRA + DFA, strict W4A4, LoRA rank "
    "32, fixed 1800 / 1500 steps, 3 seeds, in two commands (gu, then gc) on one warm machine, 3 fine-tuning "
    "processes on the one GPU each, 5000 samples per seed ('fid' = first 2500, 'fid_5000' = all), onnxruntime check "
    "of seed 0 ('onnx_check'); gc's seed 0 was cut at the command's 315 s limit during its ORT check; settings under "
    "call12_<run>")}
v["note"] += ("; call 12: the goal row rerun with 5000 samples and the ORT check of seed 0: uncond replaces call 11's "
              "(kept as a variant), cond (seeds 1, 2 only) is a variant")
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
