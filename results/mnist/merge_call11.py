# How call 11 (results/mnist/call11/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call11/ without the logs).
# gu / gc sampled 5000 per seed: as in call 10, a row's "fid" is the FID of its first 2500 samples (comparable with
# the table's other rows) and "fid_5000" the full one. They become the goal row (the same setup as call 10's, run
# longer: fixed 2500 / 1800 steps); call 10's goal rows move to "variants". kp (MSFP PTQ with the shortcut convs at
# 8 bits) and sp (strict MSFP PTQ, seed 0, this call's baseline for kp) sampled 2500 and enter "variants".
import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call11")
GOAL = "MSFP + TALoRA + DFA"
PTQ = "MSFP PTQ"
d = json.load(open(P))


def row(folder: str, model: str, name: str) -> tuple[dict, dict]:
    j = json.load(open(C / folder / "quality_mnist.json"))
    r = dict(j[model][name])
    if "fid_first_2500" in r:
        r["fid_5000"], r["fid"] = r["fid"], r.pop("fid_first_2500")
    return {**r, "call": 11}, j["settings"]


v = d["variants"]
for model, folder in (("uncond", "gu"), ("cond", "gc")):
    old = d[model][GOAL]
    span = f"{min(old['steps'])}-{max(old['steps'])}"
    v[model][f"{GOAL}, call 10 ({span} steps; the goal row until call 11)"] = old
    new, st = row(folder, model, GOAL)
    d[model][GOAL] = new
    d["settings"][f"call11_{folder}"] = st
    kp, stk = row("kp", model, PTQ)
    v[model][f"{PTQ}, shortcut convs 8-bit (first,last,*.conv_shortcut; call 11)"] = kp
    sp, _ = row("sp", model, PTQ)
    v[model][f"{PTQ}, strict, seed 0 (call 11: kp's baseline, the table's row rerun)"] = sp
d["settings"]["call11_kp"] = stk
d["settings"]["call11"] = {"note": (
    "results/mnist/call11.sh: four eval_mnist runs started together on two H200s: gu/gc uncond/cond MSFP + TALoRA + "
    "DFA, strict W4A4, LoRA rank 32, fixed 2500/1800 steps, 3 fine-tuning processes per GPU, 5000 samples per seed "
    "(fid: first 2500, fid_5000: all); kp MSFP PTQ with --keep-8bit 'first,last,*.conv_shortcut', 3 seeds, 2500 "
    "samples; sp strict MSFP PTQ, seed 0, 2500 samples; settings of each run under call11_<run>")}
v["note"] += ("; call 11: the goal row fine-tuned longer (2500 / 1800 fixed steps; call 10's rows kept as variants), "
              "MSFP PTQ with the shortcut convs at 8 bits and a same-call strict MSFP PTQ seed")
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
