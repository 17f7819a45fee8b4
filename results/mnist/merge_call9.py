# How call 9 (results/mnist/call9/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call9/ without the logs).
import json, sys
sys.path.insert(0, "tools")
from quality_rows import write_json
from pathlib import Path
P = Path("results/quality_mnist.json")
C = Path("results/mnist/call9")
d = json.load(open(P))
def row(folder, name):
    f = C / folder / "quality_mnist.json"
    if not f.exists():
        return None, None
    j = json.load(open(f))
    r = j.get("cond", {}).get(name)
    return ({**r, "call": 9} if r else None), j["settings"]
fp4, st = row("fp4", "FP4 signed PTQ")
if fp4:
    d["cond"]["FP4 signed PTQ"] = fp4
r32, st32 = row("r32", "MSFP + TALoRA + DFA")
r4, st4 = row("r4", "MSFP + TALoRA + DFA")
n = (st32 or st4 or {}).get("finetune_steps")
d["settings"]["call9"] = {**(st32 or st4 or st or {}), "note": (
    "results/mnist/call9.sh: three eval_mnist runs of mnist-cond at once (r32: MSFP + TALoRA + DFA with LoRA rank 32; "
    f"r4: the same at rank 4; both fixed at {n} fine-tuning steps on every seed, the time budget only a safety; "
    "fp4: FP4 signed PTQ on GPU 1); settings of run r32 (r4: lora_rank 4; fp4: no fine-tuning)")}
v = d["variants"]
v["note"] += (f"; call 9: cond MSFP + TALoRA + DFA with LoRA rank 32 and rank 4, both {n} steps on every seed "
              "(fixed step count: separates step count from seed)")
if r32:
    v["cond"][f"MSFP + TALoRA + DFA, LoRA rank 32, {n} steps"] = r32
if r4:
    v["cond"][f"MSFP + TALoRA + DFA, rank 4, {n} steps (baseline)"] = r4
write_json(P, d, indent=1)
print({"fp4": bool(fp4), "r32": bool(r32), "r4": bool(r4), "steps": n})
from finetune_convergence import main as convergence  # refresh results/mnist/finetune_convergence.* with call 9
convergence([])
