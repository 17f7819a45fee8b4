# How calls 18-21 (session 22, results/mnist/call18..21/) entered results/quality_mnist.json: run once from the
# repository root (`.venv/bin/python results/mnist/merge_call18_21.py`) after unpacking each call's tarball into
# results/mnist/callNN/ (results/mnist/device_runs.md).
# All ran results/mnist/call18.sh on one H200 at the goal row's settings (LoRA rank 32, 1800 uncond / 1500 cond steps
# at batch 64 with the cosine schedule fitted to BUDGET s, 128 FP trajectories, 2500 samples, no ORT check): the
# 8-bit frontier, i.e. how much of the UNet at 8 bits (weights and activations) MSFP + TALoRA + DFA needs.
#   call 18  ufr / ul2 / u8   uncond: full-resolution path / last two up blocks at 8 bits (MSFP PTQ and + TALoRA +
#                             DFA), every layer at 8 bits (W8A8 PTQ), seeds 0-2
#   call 19  c8f / u8f        W8A8 PTQ, cond and uncond (uncond repeats call 18's u8); their fine-tuning failed
#                             (LoRA went on 4-bit weights only: none in W8A8), fixed before call 20
#   call 20  u8f / vu         uncond W8A8 + TALoRA + DFA; the last-block variant with LoRA on its 8-bit block too
#   call 21  c8f              cond W8A8 + TALoRA + DFA: seeds 1-2 (seed 0 was cut while sampling)
# Every row enters "variants". Idempotent.
from merge_rows import add_note, call_row, load_table, save_table

PTQ, FT = "MSFP PTQ", "MSFP + TALoRA + DFA"
FR = "full-resolution path 8-bit (first,last,down_blocks.0.*,up_blocks.3.*; 24% of the MACs)"
L2 = "last two up blocks 8-bit (first,last,up_blocks.2.*,up_blocks.3.*; 47% of the MACs)"
W8 = "every layer 8-bit (W8A8, --keep-8bit '*')"
LB = "last decoder block 8-bit (first,last,up_blocks.3.* as last_block), LoRA on the 8-bit block too"

d = load_table()
u, c = d["variants"]["uncond"], d["variants"]["cond"]
for folder, scope in (("ufr", FR), ("ul2", L2)):
    for row in (PTQ, FT):
        u[f"{row}, {scope} (call 18)"] = call_row(d, 18, folder, "uncond", row)
u[f"{PTQ}, {W8} (call 18)"] = call_row(d, 18, "u8", "uncond", PTQ)
u[f"{FT}, {W8} (call 20)"] = call_row(d, 20, "u8f", "uncond", FT)
u[f"{FT}, {LB} (call 20)"] = call_row(d, 20, "vu", "uncond", FT)
c[f"{PTQ}, {W8} (call 19)"] = call_row(d, 19, "c8f", "cond", PTQ)
c[f"{FT}, {W8}, seeds 1-2 (call 21; seed 0 cut)"] = call_row(d, 21, "c8f", "cond", FT)
call_row(d, 19, "u8f", "uncond", PTQ)  # only its settings: call 18's u8 again, the same FIDs to 1e-3
d["settings"]["call18_21"] = {"note": (
    "results/mnist/call18.sh on one H200 (session 22): call 18 RUNS='ufr ul2 u8' LIMIT=535 BUDGET=330 (496 s); "
    "call 19 RUNS='c8f u8f' LIMIT=515 BUDGET=300 (139 s; the fine-tuned tasks failed at start: no 4-bit weight "
    "for a LoRA); call 20 FTROWS=msfp+talora+dfa RUNS='vu u8f' LIMIT=490 BUDGET=330 (477 s); call 21 "
    "FTROWS=msfp+talora+dfa RUNS=c8f LIMIT=300 BUDGET=190 (325 s; seed 0 cut while sampling, merged on the CPU "
    "with eval_mnist --merge-only). Fine-tuning with the CUDA graph; the budget cut steps to 1656-1800 (uncond) / "
    "1432-1460 (cond, the two seeds that finished); 2500 samples; no ORT check. Before call 20 LoRAs went on "
    "4-bit weights only (the 8-bit layers frozen; --no-lora-8bit); calls 20-21 put them on every quantized "
    "weight. Shares of weights / MACs at 8 bits: results/mnist/frontier_shares.json")}
add_note(d, "; calls 18-21: the 8-bit frontier (full-resolution path, last two up blocks, every layer at 8 bits: "
            "W8A8 PTQ and fine-tuned) and the last-block variant with LoRA on its 8-bit block")
save_table(d)
