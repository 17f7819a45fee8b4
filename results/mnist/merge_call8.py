# How call 8 (results/mnist/call8/) entered results/quality_mnist.json (run once from the repository root).
import json, sys
sys.path.insert(0, "tools")
from quality_rows import write_json
from pathlib import Path
P = Path("results/quality_mnist.json")
d = json.load(open(P))
def row(folder, model):
    j = json.load(open(f"results/mnist/call8/{folder}/quality_mnist.json"))
    return {**j[model]["MSFP + TALoRA + DFA"], "call": 8}, j["settings"]
r, st = row("a", "cond")
d["cond"]["MSFP + TALoRA + DFA"] = r
d["settings"]["call8"] = {**st, "note": "results/mnist/call8.sh: four eval_mnist runs (a: cond strict, e: cond EfficientDM scope, r: uncond rank 32, c: uncond rank 4), fine-tuning fitted to 120 s; settings of run a (e: keep_8bit/float_attention as the variant says; r: lora_rank 32)"}
v = d["variants"]
v["note"] += ("; call 8: cond MSFP + TALoRA + DFA in EfficientDM's scope, and uncond MSFP + TALoRA + DFA with LoRA rank 32 "
              "(eval_mnist --lora-rank 32; EfficientDM's rank) next to its same-call rank-4 baseline")
v.setdefault("cond", {})["MSFP + TALoRA + DFA, EfficientDM scope"] = row("e", "cond")[0]
v["uncond"]["MSFP + TALoRA + DFA (call 8 rerun, rank 4)"] = row("c", "uncond")[0]
v["uncond"]["MSFP + TALoRA + DFA, LoRA rank 32"] = row("r", "uncond")[0]
write_json(P, d, indent=1)
