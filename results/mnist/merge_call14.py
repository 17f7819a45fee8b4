# How call 14 (session 20, results/mnist/call14/) entered results/quality_mnist.json: run once from the repository
# root after unpacking the call's tarball into results/mnist/call14/ (results/mnist/device_runs.md, call 14).
# The strict goal row (MSFP + TALoRA + DFA, LoRA rank 32, 1800 uncond / 1500 cond steps at batch 64) trained on
# 128 (as every earlier row), 1024 or 4096 FP trajectories, seed 0, with 32 held-out trajectories
# (FinetuneConfig.holdout_samples). Uncond rows enter "variants"; the cond runs were cut at the command's limit while
# sampling (no FID), so their fine-tuning facts, read from the task logs, go into the settings only. The goal rows
# (3 seeds) are unchanged. Idempotent.
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call14")
d = json.load(open(P))
v = d["variants"]
for folder in ("u128", "u1k", "u4k"):
    j = json.load(open(C / folder / "quality_mnist.json"))
    st = j["settings"]
    r = j["uncond"]["MSFP + TALoRA + DFA"]
    v["uncond"][f"MSFP + TALoRA + DFA, {st['finetune_samples']} FP trajectories, seed 0 (call 14)"] = {**r, "call": 14}
    d["settings"][f"call14_{folder}"] = st
FACT = re.compile(r"(initial_loss|final_loss|holdout_initial_loss|holdout_final_loss|steps)=([0-9.]+)")
for folder in ("c128", "c2k"):
    st = json.load(open(C / folder / "quality_mnist.json"))["settings"]
    log = C / folder / "log_cond_0_msfp_talora_dfa.txt"
    lines = log.read_text().splitlines() if log.exists() else []
    line = next((ln for ln in lines if ln.startswith("stage finetune")), "")
    st["finetune_facts_seed0"] = {k: float(x) for k, x in FACT.findall(line)} or None
    d["settings"][f"call14_{folder}"] = st
d["settings"]["call14"] = {"note": (
    "results/mnist/call14.sh on one H200 (session 20, RUNS='c128 c2k u128 u1k u4k' LIMIT=470 BUDGET=320, one "
    "command, 493 s): the strict goal row's seed 0 fine-tuned on 128 / 1024 / 4096 (uncond) and 128 / 2048 (cond) FP "
    "trajectories with 32 held out (FinetuneConfig.holdout_samples); 2500 samples. Both cond runs were cut at the "
    "limit (cond calibration took 87-90 s beside the fine-tuning processes): c128 after its fine-tuning (its losses "
    "are in call14_c128.finetune_facts_seed0), c2k after its 1500 steps, before the probe")}
NOTE = "; call 14: the goal row's seed 0 on 128 / 1024 / 4096 FP trajectories (uncond; held-out losses)"
if NOTE not in v["note"]:
    v["note"] += NOTE
write_json(P, d, indent=1)
