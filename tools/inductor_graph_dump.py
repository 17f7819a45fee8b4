"""build_fast's graph of the tiny cond UNet at one batch size, through Dynamo and Inductor on the CPU, for diffing the
graph two commits give (docs/triton.md session 14, continuation: main's batch-1 graph against session 12's).

Writes to OUT: ``build_fast_nodes.json`` (op and target of every node; ``group_norm_auto`` written as the captured
``group_norm`` it wraps), ``dynamo_graph.py`` (the graph Dynamo hands to Inductor), Inductor's debug trace under
``inductor/`` (post-grad graph, IR before and after fusion, output code: the CPU backend's kernels, the same
scheduler's fusion decisions as on the GPU for one IR), ``summary.json`` (sha256 of each, with stack-trace
comments, node names ``group_norm_auto*`` -> ``group_norm*`` and ``F.group_norm(.., eps)`` ->
``aten.group_norm(.., eps, False)`` normalized). Another commit's code: extract its tree (``git archive
COMMIT | tar -x -C DIR``), lay its packages out as msfp_compiler's package-dir does and put that first on PYTHONPATH
(the editable install's finder comes after sys.path)::

    python tools/inductor_graph_dump.py OUT --batch 1     # ~10 min on 2 loaded cores (calibration + Inductor C++)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _normalized(text: str) -> str:
    """Stack-trace comments and group_norm_auto's node names out: what is left is the graph."""
    text = re.sub(r"# File:.*", "", text)
    # group_norm_auto below its batch threshold: F.group_norm, i.e. the captured op with the cudnn flag ATen ignores
    text = re.sub(r"torch\.nn\.functional\.group_norm\((.*?)\);",
                  r"torch.ops.aten.group_norm.default(\1, False);", text)
    return text.replace("group_norm_auto", "group_norm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    import torch._inductor.config as icfg

    sys.path.insert(0, str(ROOT / "tests"))
    import conftest

    import msfp_compiler.export.triton.fast as FA
    from msfp_compiler.compile import compile as msfp_compile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cm = msfp_compile(conftest.make_unet_cond(), conftest.FAST_CONFIG, progress=False)
    x = [torch.cat([a] * args.batch)[:args.batch] for a in cm.calibration.batches[0].args]
    # as on CUDA: the implicit conv and the CUDA-at-bf16 defaults (an older tree has none of them: {})
    fast = FA.build_fast(cm.graph_module, "cpu", implicit_conv=True, **getattr(FA, "CUDA_BF16_DEFAULTS", {}))

    def node_key(n: torch.fx.Node) -> str:
        name = getattr(n.target, "__name__", str(n.target))
        if name == "group_norm_auto" or str(n.target) == "aten.group_norm.default":
            name = "group_norm"
        return f"{n.op}:{name}"

    (out / "build_fast_nodes.json").write_text(json.dumps([node_key(n) for n in fast.gm.graph.nodes], indent=0))
    graphs: list[str] = []

    def backend(gm: torch.fx.GraphModule, ex: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm.print_readable(print_output=False))
        return compile_fx(gm, ex)

    icfg.force_disable_caches = True  # a cache hit would skip the lowering and its debug trace
    icfg.trace.enabled = True
    icfg.trace.debug_dir = str(out / "inductor")
    with torch.no_grad():
        y = torch.compile(fast, backend=backend, dynamic=False)(*x)
    (out / "dynamo_graph.py").write_text("\n".join(graphs))
    files = {"build_fast_nodes.json": out / "build_fast_nodes.json", "dynamo_graph.py": out / "dynamo_graph.py"}
    for f in sorted((out / "inductor").rglob("*")):
        if f.name in ("fx_graph_transformed.py", "ir_pre_fusion.txt", "ir_post_fusion.txt", "output_code.py"):
            files[f.name] = f
    summary = {"fast": FA.__file__, "batch": args.batch, "graphs": len(graphs), "report": str(fast.report),
               "output_sha256": hashlib.sha256(y.float().numpy().tobytes()).hexdigest(),
               "sha256": {k: hashlib.sha256(_normalized(f.read_text()).encode()).hexdigest() for k, f in files.items()},
               "kernels": len(re.findall(r"= async_compile\.\w+\(", files["output_code.py"].read_text()))
               if "output_code.py" in files else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
