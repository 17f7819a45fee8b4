# How calls 15-17 (session 21, results/mnist/call15..17/) entered results/quality_mnist.json: run once from the
# repository root after unpacking each call's tarball into results/mnist/callNN/ (results/mnist/device_runs.md).
# All three ran results/mnist/call14.sh on one H200 at the strict goal row's settings (MSFP + TALoRA + DFA, LoRA rank
# 32, 1800 uncond / 1500 cond steps at batch 64, 32 held-out trajectories, 2500 samples), every run its full steps:
#   call 15  c2k          cond, 2048 FP trajectories, seeds 0-2
#   call 16  u4k / vu4k   uncond, 4096 trajectories, seeds 1-2 (seed 0 is call 14's) / the labelled variant "last
#                         decoder block at 8 bits" at 4096 trajectories, seeds 0-2
#   call 17  vu4kl / u4kl vu4k with learned activation scales, seeds 0-2 / u4k with learned scales, seed 0
# Every row enters "variants"; the goal rows (3 seeds, 128 trajectories, 5000 samples, ORT-checked) are unchanged.
# Idempotent. (Rewritten in session 22 onto results/mnist/merge_rows.py; the same table.)
from merge_rows import add_note, call_row, load_table, save_table

ROW = "MSFP + TALoRA + DFA"
d = load_table()
v = d["variants"]


def row(call: int, folder: str, model: str) -> dict:
    return call_row(d, call, folder, model, ROW)


def joined(a: dict, b: dict) -> dict:
    """Two runs of the same configuration on different seeds as one row: a's seeds, then b's (every per-seed list
    extended; the same fields on both sides). Call 14 drew its held-out trajectories after the training ones, calls
    15-17 from a seed of their own, so a's held-out losses are left out (None): they are not the same set."""
    assert set(a) == set(b), set(a) ^ set(b)
    out = {k: a[k] + b[k] for k in a if isinstance(a[k], list)}
    for k in ("holdout_initial_loss", "holdout_final_loss"):
        out[k] = [None] * len(a["seeds"]) + b[k]
    out["calls"] = [a["call"]] * len(a["seeds"]) + [b["call"]] * len(b["seeds"])
    out["call"] = f"{a['call']}+{b['call']}"
    return out


LAST3 = "last decoder block 8-bit (first,last,up_blocks.3.*)"
v["cond"][f"{ROW}, 2048 FP trajectories (call 15)"] = row(15, "c2k", "cond")
u4k = joined(row(14, "u4k", "uncond"), row(16, "u4k", "uncond"))  # row(14, ...) rewrites call14_u4k's settings as-is
v["uncond"][f"{ROW}, 4096 FP trajectories (seed 0: call 14, seeds 1-2: call 16)"] = u4k
v["uncond"][f"{ROW}, {LAST3}, 4096 FP trajectories (call 16)"] = row(16, "vu4k", "uncond")
v["uncond"][f"{ROW}, {LAST3}, 4096 FP trajectories, learned activation scales (call 17)"] = row(17, "vu4kl", "uncond")
v["uncond"][f"{ROW}, 4096 FP trajectories, learned activation scales, seed 0 (call 17)"] = row(17, "u4kl", "uncond")
d["settings"]["call15_17"] = {"note": (
    "results/mnist/call14.sh on one H200 (session 21): call 15 RUNS=c2k CSEEDS=0,1,2 LIMIT=480 BUDGET=320 (370 s); "
    "call 16 RUNS='u4k vu4k' USEEDS=1,2 VSEEDS=0,1,2 LIMIT=530 BUDGET=330 (482 s); call 17 RUNS='vu4kl u4kl' "
    "VSEEDS=0,1,2 USEEDS=0 LIMIT=450 BUDGET=300 (422 s). Every run finished its 1800 / 1500 steps with the CUDA graph; "
    "2500 samples; no ORT check")}
add_note(d, "; calls 15-17: the goal row on 2048 (cond) / 4096 (uncond) FP trajectories, 3 seeds; the last-block "
            "variant at 4096 trajectories, with and without learned activation scales")
save_table(d)
