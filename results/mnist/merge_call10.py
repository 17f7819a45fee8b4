# How call 10 (results/mnist/call10/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call10/ without the logs).
# Call 10 sampled 5000 per seed; the table's other rows have 2500, so a call-10 row's "fid" is the FID of its first
# 2500 samples (the same noise as a 2500-sample run: call 10's FP32 first halves equal call 4's FP32 FIDs to 0.01)
# and "fid_5000" the full one. The goal row becomes the library default (LoRA rank 32, call 10); the rows it
# replaces move to "variants", next to call 10's paired rank-4 runs and the 5000-sample FP32 reference.
import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call10")
GOAL = "MSFP + TALoRA + DFA"
d = json.load(open(P))


def row(folder: str, model: str, name: str) -> tuple[dict, dict]:
    j = json.load(open(C / folder / "quality_mnist.json"))
    r = dict(j[model][name])
    r["fid_5000"], r["fid"] = r["fid"], r.pop("fid_first_2500")
    return {**r, "call": 10}, j["settings"]


v = d["variants"]
old = {"uncond": d["uncond"][GOAL], "cond": d["cond"][GOAL]}
v["uncond"][f"{GOAL}, rank 4 (call 6; the goal row until call 10)"] = old["uncond"]
v["cond"][f"{GOAL}, rank 4 (call 8; the goal row until call 10)"] = old["cond"]
# the rank-32 variant of call 8 keeps its name; call 10's runs are named by what they are
for model, f4, f32 in (("uncond", "u4", "u32"), ("cond", "c4", "c32")):
    r32, st = row(f32, model, GOAL)
    r4, _ = row(f4, model, GOAL)
    fp, stf = row("fp", model, "FP32")
    span = f"{min(r4['steps'] + r32['steps'])}-{max(r4['steps'] + r32['steps'])}"
    d[model][GOAL] = r32
    v[model][f"{GOAL}, rank 4, call 10 (rank 32's paired baseline, {span} steps)"] = r4
    v[model]["FP32, 5000 samples (call 10)"] = fp
d["settings"]["call10"] = {**st, "note": (
    "results/mnist/call10.sh: five eval_mnist runs started together on two H200s (18 processes, 12 fine-tuning, 6 per "
    "GPU): u4/u32 uncond and c4/c32 cond MSFP + TALoRA + DFA at LoRA rank 4/32 (rank 4 and 32 of one seed on the same "
    "GPU), 1500 steps asked, the 250 s safety budget cut most (uncond 1307-1500, cond 859-970 run); fp FP32 of both "
    "models; 5000 samples per seed (fid: first 2500, fid_5000: all); settings of run c32 (the others: their rank)")}
v["note"] += ("; call 10: the goal row at LoRA rank 4 and rank 32 (rank 32 became the goal row and the library "
              "default), paired per seed and GPU, and FP32 at 5000 samples")
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
