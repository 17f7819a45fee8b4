# How call 9 (results/mnist/call9/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call9/ without the logs). Rows absent from the call are skipped.
import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call9")
d = json.load(open(P))


def row(folder: str, model: str, name: str):
    f = C / folder / "quality_mnist.json"
    if not f.exists():
        return None, None
    j = json.load(open(f))
    r = j.get(model, {}).get(name)
    return ({**r, "call": 9} if r else None), j["settings"]


def add_seeds(old: dict, new: dict) -> dict:
    """old's seeds followed by new's: every per-seed list extended (None where one side lacks the field)."""
    n_old, n_new = len(old["seeds"]), len(new["seeds"])
    out = {}
    for k in dict.fromkeys([*old, *new]):
        a, b = old.get(k), new.get(k)
        if isinstance(a, list) or isinstance(b, list):
            out[k] = (a if isinstance(a, list) else [None] * n_old) + (b if isinstance(b, list) else [None] * n_new)
    out["calls"] = [old["call"]] * n_old + [9] * n_new
    out["call"] = f"{old['call']}+9"
    return out


got = {}
fp4, st = row("fp4", "cond", "FP4 signed PTQ")
if fp4:
    d["cond"]["FP4 signed PTQ"] = fp4
for folder, name in (("il", "INT4 + LoRA"), ("mt", "MSFP + TALoRA")):
    r, _ = row(folder, "cond", name)
    if r:
        d["cond"][name] = r
    got[folder] = bool(r)
for folder, model, name in (("i2", "cond", "INT4 PTQ"), ("u2", "uncond", "FP4 signed PTQ")):
    r, _ = row(folder, model, name)
    old = d[model][name]
    if r and old.get("call") == 4 and 2 not in old["seeds"]:
        d[model][name] = add_seeds(old, r)
    got[folder] = bool(r)
ORDER = ["FP32", "INT4 PTQ", "FP4 signed PTQ", "MSFP PTQ", "INT4 + LoRA", "MSFP + LoRA", "MSFP + TALoRA",
         "MSFP + TALoRA + DFA"]  # the digits table's rows
for model in ("uncond", "cond"):
    d[model] = {k: d[model][k] for k in sorted(d[model], key=ORDER.index)}
r32, st32 = row("r32", "cond", "MSFP + TALoRA + DFA")
r4, st4 = row("r4", "cond", "MSFP + TALoRA + DFA")
n = (st32 or st4 or {}).get("finetune_steps")
# The 80 s safety budget cut most tasks below the n steps asked (~3 steps/s with 12 processes fine-tuning): name the
# variants by the steps run; each rank-32 seed ran within 14 steps of its rank-4 pair.
ran = [s for r in (r32, r4) if r for s in r["steps"]]
span = f"{min(ran)}-{max(ran)}" if ran else n
d["settings"]["call9"] = {**(st32 or st4 or st or {}), "note": (
    "results/mnist/call9.sh: seven eval_mnist runs started together on two H200s (17 processes; sampling slots shared "
    "by all runs), cond unless said: r32 MSFP + TALoRA + DFA with LoRA rank 32; r4 the same at rank 4; il INT4 + LoRA; "
    f"mt MSFP + TALoRA (every fine-tuned task asked for {n} steps; the 80 s safety budget cut most: 232-300 run); "
    "fp4 FP4 signed PTQ; "
    "i2 INT4 PTQ seed 2; u2 uncond FP4 signed PTQ seed 2; settings of run r32 (the others: their row, rank 4)")}
v = d["variants"]
v["note"] += (f"; call 9: cond MSFP + TALoRA + DFA with LoRA rank 32 and rank 4, {n} steps asked on every seed, "
              f"{span} run (the 80 s safety budget cut them; each seed's pair within 14 steps), next to cond INT4 + "
              "LoRA and MSFP + TALoRA from the same call in the main table")
if r32:
    v["cond"][f"MSFP + TALoRA + DFA, LoRA rank 32, {span} steps"] = r32
if r4:
    v["cond"][f"MSFP + TALoRA + DFA, rank 4, {span} steps (baseline)"] = r4
write_json(P, d, indent=1)
print({"fp4": bool(fp4), "r32": bool(r32), "r4": bool(r4), **got, "steps": n, "ran": span})
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
