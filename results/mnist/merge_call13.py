# How call 13 (results/mnist/call13/) entered results/quality_mnist.json (run once from the repository root, after
# unpacking the call's tarball into results/mnist/call13/ without the logs; results/mnist/device_runs.md, call 13).
# vu / vc: the labelled variant "last decoder block at 8 bits" (not strict W4A4; eval_mnist --keep-8bit
# 'first,last,up_blocks.3.*' uncond, 'first,last,up_blocks.2.*' cond), MSFP PTQ and MSFP + TALoRA + DFA at the goal
# row's settings (LoRA rank 32, fixed 1800 / 1500 steps), 3 seeds, 2500 samples. Both enter "variants"; the goal rows
# (strict W4A4) are unchanged. vc's fine-tuned tasks were cut at the command's limit (no row); its
# quality_mnist.json was merged from the task files on the CPU (`eval_mnist --merge-only`), so its device, cut tasks
# and GPU are restored here from the device log.
# fc (call 13c, session 16, one H200, `RUNS=fc LIMIT=300 BUDGET=225 timeout 340 bash results/mnist/call13.sh`): the
# cut cond MSFP + TALoRA + DFA of vc alone (3 seeds, all 1500 steps); its row lands next to the uncond one. The
# script is idempotent (re-running it after fc arrived leaves vu / vc's rows as they were).
# oc (call 13d, session 18, one H200, `RUNS=oc LIMIT=500 BUDGET=260 timeout 565 bash results/mnist/call13.sh`): the
# strict cond goal row's seed 0 rerun alone with its onnxruntime check (call 12 cut it during the check); it enters
# "variants" and the goal row's "onnx_check_rerun" (the goal row itself stays call 11's three seeds).
import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

P = Path("results/quality_mnist.json")
C = Path("results/mnist/call13")
d = json.load(open(P))
v = d["variants"]
LABEL = {"uncond": "first,last,up_blocks.3.*", "cond": "first,last,up_blocks.2.*"}
for folder, model in (("vu", "uncond"), ("vc", "cond"), ("fc", "cond")):
    if not (C / folder).is_dir():
        continue
    j = json.load(open(C / folder / "quality_mnist.json"))
    st = j["settings"]
    if folder == "vc":  # merged on the CPU from the device's task files
        st.update(device="cuda", gpu="NVIDIA H200", gpus=1, wall_seconds=None,
                  cut_at_time_limit=[f"cond:{s}:MSFP + TALoRA + DFA" for s in (0, 1, 2)])
    for row, r in j[model].items():
        name = f"{row}, last decoder block 8-bit ({LABEL[model]}; call {'13c' if folder == 'fc' else 13})"
        v[model][name] = {**r, "call": "13c" if folder == "fc" else 13}
    d["settings"][f"call13_{folder}"] = st
if (C / "oc").is_dir():  # call 13d (session 18): the strict cond goal row's seed 0 again, with its ORT check
    j = json.load(open(C / "oc" / "quality_mnist.json"))
    for row, r in j["cond"].items():
        v["cond"][f"{row}, strict W4A4, seed 0 rerun with the ORT check (call 13d)"] = {**r, "call": "13d"}
        d["cond"][row]["onnx_check_rerun"] = {"call": "13d", "seed": 0, "fid": r["fid"][0], **r["onnx_check"][0]}
    d["settings"]["call13_oc"] = j["settings"]
d["settings"]["call13"] = {"note": (
    "results/mnist/call13.sh on one H200 (RUNS='vu vc', one command, all 12 task processes at once): the last "
    "full-resolution decoder block at 8 bits (eval_mnist --keep-8bit 'first,last,up_blocks.3.*' uncond, "
    "'first,last,up_blocks.2.*' cond; not strict W4A4), MSFP PTQ and MSFP + TALoRA + DFA (LoRA rank 32, fixed "
    "1800 / 1500 steps, fine-tuning budget 340 s), 3 seeds, 2500 samples, no ORT check on the device (the CPU dry "
    "run checked all four configurations: PASS); the cond fine-tuned tasks were cut at the 465 s limit (cond "
    "calibration took 97-123 s with 12 processes time-slicing the GPU); settings under call13_<run>. Call 13c "
    "(session 16, one H200, RUNS=fc LIMIT=300 BUDGET=225, 322 s): the cond MSFP + TALoRA + DFA alone, 3 processes, "
    "every seed 1500 steps (settings under call13_fc). Call 13d (session 18, one H200, RUNS=oc LIMIT=500 "
    "BUDGET=260, 229 s): the strict cond goal row's seed 0 alone at 1500 steps with its onnxruntime check (settings "
    "under call13_oc)")}
OLD = ("; call 13: the last decoder block at 8 bits (labelled variant, not strict W4A4), MSFP PTQ on both "
       "models and MSFP + TALoRA + DFA on uncond (cond's was cut)")
NEW = ("; call 13: the last decoder block at 8 bits (labelled variant, not strict W4A4), MSFP PTQ on both "
       "models and MSFP + TALoRA + DFA on uncond (cond's was cut; call 13c measured it alone)")
if NEW not in v["note"]:
    v["note"] = v["note"].replace(OLD, "") + NEW
write_json(P, d, indent=1)
from finetune_convergence import main as convergence  # noqa: E402  (refresh results/mnist/finetune_convergence.*)

convergence([])
