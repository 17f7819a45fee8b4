# How call 11 (results/mnist/call11/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the tarballs of the call's two commands into results/mnist/call11/ without the logs: kp and sp from the
# first, gu and gc from the second; results/mnist/device_runs.md, call 11).
# gu / gc (strict W4A4, LoRA rank 32, fixed 1800 / 1500 steps, every task reached them, 2500 samples per seed) become
# the goal row: the same setup as call 10's, run longer on fewer processes per GPU; call 10's goal rows move to
# "variants". kp (MSFP PTQ with the shortcut convs at 8 bits, 3 seeds) and sp (strict MSFP PTQ, seed 0: kp's
# baseline in the same call, equal to call 4's seed-0 row) enter "variants". A row with more than 2500 samples would
# keep "fid" = its first 2500 and "fid_5000" (as call 10); none of call 11's has.
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
    "results/mnist/call11.sh in two commands on two H200s. First (call 11a): kp MSFP PTQ with --keep-8bit "
    "'first,last,*.conv_shortcut', 3 seeds, and sp strict MSFP PTQ, seed 0, 2500 samples; its gu/gc failed at start "
    "(CUDA_VISIBLE_DEVICES naming a GPU twice hides every GPU). Second (call 11b, RUNS='gu gc'): gu/gc uncond/cond "
    "MSFP + TALoRA + DFA, strict W4A4, LoRA rank 32, fixed 1800/1500 steps (225 s safety budget, not reached), 3 "
    "fine-tuning processes per GPU, 2500 samples per seed; settings of each run under call11_<run>")}
v["note"] += ("; call 11: the goal row fine-tuned longer on 3 processes per GPU (1800 / 1500 fixed steps, all "
              "reached; call 10's rows kept as variants), MSFP PTQ with the shortcut convs at 8 bits and a same-call "
              "strict MSFP PTQ seed")
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
