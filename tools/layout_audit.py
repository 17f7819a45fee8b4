"""Where build_fast's graph moves data against its natural order: every Inductor node (before fusion) of the tiny
cond UNet compiled on the CPU whose loads or stores are strided along the node's innermost loop (a transposed read or
write), with the post-grad fx nodes it came from, their lines in fast.py / diffusers and the fused kernel that holds
it (docs/triton.md "Session 15 (CPU): layout copies in the fast graph").

The per-node loop order and index expressions are the scheduler's before fusion (the same code decides them for the
CPU and GPU backends from one IR); the fusion into kernels is the CPU backend's, which can group nodes differently
from Triton. A strided access here is a graph fact; what it costs on the GPU (Triton may tile a transposing
pointwise kernel in 2-D and read both sides coalesced) is not known from the CPU::

    python tools/layout_audit.py results/layout_audit_tiny_b8.json --batch 8   # ~6 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]


def _where(trace: str) -> list[str]:
    """The stack trace's frames in fast.py and diffusers as 'file:line func' (innermost last)."""
    out = []
    for m in re.finditer(r'File "([^"]+)", line (\d+), in (\w+)', trace or ""):
        f = m.group(1)
        if f.endswith("export/triton/fast.py") or "/diffusers/" in f:
            out.append(f"{Path(f).name}:{m.group(2)} {m.group(3)}")
    return out


def _stride(expr: Any, var: Any, variables: list) -> int | None:
    """expr(var=1) - expr(var=0), every other loop variable at 0 (None: not a constant step, e.g. an indirection)."""
    import sympy

    zero = {v: 0 for v in variables if v != var}
    try:
        d = sympy.simplify(expr.subs({**zero, var: 1}) - expr.subs({**zero, var: 0}))
    except Exception:  # noqa: BLE001  (an index sympy cannot evaluate: reported as unknown)
        return None
    free = d.free_symbols
    return int(d) if not free else None


def audit_nodes(nodes: list) -> list[dict]:
    """One record per SchedulerNode: loop sizes, each access's buffer, dtype, elements and step along the innermost
    pointwise / reduction variable, and the fx origins."""
    from torch._inductor.loop_body import MemoryUsageType
    from torch._inductor.virtualized import V

    def numel_dtype(name: str) -> tuple[int, str]:
        buf = V.graph.try_get_buffer(name) if hasattr(V.graph, "try_get_buffer") else None
        if buf is None:
            buf = V.graph.graph_inputs.get(name) or V.graph.constants.get(name)
        try:
            size = buf.get_size() if hasattr(buf, "get_size") else list(buf.shape)
            n = 1
            for s in size:
                n *= int(s)
            dt = buf.get_dtype() if hasattr(buf, "get_dtype") else buf.dtype
            return n, str(dt).replace("torch.", "")
        except Exception:  # noqa: BLE001
            return -1, "?"

    out = []
    for node in nodes:
        body = getattr(node, "_body", None)
        if body is None:
            continue
        sizes = [[int(s) for s in part] for part in node._sizes]
        variables = list(body.var_ranges)
        npw = len(sizes[0])
        inner_pw = variables[npw - 1] if npw else None
        inner_red = variables[-1] if len(variables) > npw else None
        accesses = []
        for kind, types in (("load", (MemoryUsageType.LOAD,)),
                            ("store", (MemoryUsageType.STORE, MemoryUsageType.STORE_REDUCTION))):
            for t in types:
                for e in body.memory_usage[t]:
                    expr = body.indexing_exprs[e.index_name]
                    n, dt = numel_dtype(e.buffer_name)
                    accesses.append({
                        "kind": kind, "buffer": e.buffer_name, "dtype": dt, "numel": n, "index": str(expr),
                        "step_inner": None if inner_pw is None else _stride(expr, inner_pw, variables),
                        "step_inner_reduction": None if inner_red is None else _stride(expr, inner_red, variables)})
        origins = sorted(node.node.get_origins(), key=lambda o: o.name) if node.node is not None else []
        out.append({
            "op": node.get_name(), "buffers": [b.get_name() for b in node.get_outputs()], "sizes": sizes,
            "reduction": len(variables) > npw, "accesses": accesses,
            "origins": [{"node": o.name, "target": str(o.target), "where": _where(o.meta.get("stack_trace", ""))[-3:]}
                        for o in origins if o.op == "call_function"]})
    return out


def strided(rec: dict, min_share: float = 0.25) -> list[dict]:
    """The accesses of one node that step by more than one element along its innermost loop (reductions: the
    reduction loop) over a buffer of at least ``min_share`` of the node's iterations (broadcast operands left out)."""
    total = 1
    for s in rec["sizes"][0] + rec["sizes"][1]:
        total *= s
    key = "step_inner_reduction" if rec["reduction"] else "step_inner"
    return [a for a in rec["accesses"] if a["numel"] >= min_share * total and (a[key] is None or abs(a[key]) > 1)]


@contextlib.contextmanager
def recording() -> Iterator[tuple[list[dict], dict[str, str]]]:
    """While open, every Inductor compile appends ``audit_nodes`` of its scheduler nodes before fusion to the first
    list and maps each node to its fused kernel's descriptive name in the dict."""
    import torch._inductor.debug as idebug
    from torch._inductor.utils import get_fused_kernel_name

    pre: list[dict] = []
    kernels: dict[str, str] = {}
    log_pre, log_post = idebug.log_ir_pre_fusion, idebug.log_ir_post_fusion

    def on_pre(nodes: list) -> None:
        pre.extend(audit_nodes(nodes))
        log_pre(nodes)

    def on_post(nodes: list) -> None:
        for n in nodes:  # each fused node's kernel name, as Inductor's descriptive names build it
            snodes = n.get_nodes()
            if all(getattr(s, "_body", None) is not None for s in snodes):
                name = get_fused_kernel_name(snodes, "original_aten")
                for s in snodes:
                    kernels[s.get_name()] = name
        log_post(nodes)

    idebug.log_ir_pre_fusion, idebug.log_ir_post_fusion = on_pre, on_post
    try:
        yield pre, kernels
    finally:
        idebug.log_ir_pre_fusion, idebug.log_ir_post_fusion = log_pre, log_post


_QUANT_FRAMES = ("_bit_rne", "grid_round", "grid_fast", "fake_quant", "_scaled ", "forward", "__call__")


def compact(rec: dict) -> dict:
    """A flagged node for the summary file: its strided accesses, the aten targets and the model lines it came from
    (fast.py's quantizer helpers left out: every quantizer has them)."""
    where = sorted({w for o in rec["origins"] for w in o["where"] if not any(q in w + " " for q in _QUANT_FRAMES)})
    return {"op": rec["op"], "sizes": rec["sizes"], "kernel": rec["kernel"],
            "strided": [{k: a[k] for k in ("kind", "buffer", "dtype", "numel", "step_inner", "index")}
                        for a in rec["strided"]],
            "targets": sorted({o["target"].replace("aten.", "").replace(".default", "") for o in rec["origins"]}),
            "where": where}


def _sd15_mini() -> Any:
    """SD1.5's UNet layout (CrossAttnDown x3 + Down, mid, Up + CrossAttnUp x3, 2 layers per block: 16 transformer
    blocks, 12 skip concatenations) at toy widths."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=8).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="JSON summary (strided nodes only, with their kernels)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cat-nhwc", action=argparse.BooleanOptionalAction, default=True,
                    help="build_fast(cat_nhwc=...): on by default, as build_fast's own default since session 16; "
                    "--no-cat-nhwc for the aten.cat graph")
    ap.add_argument("--model", default="tiny", choices=["tiny", "sd15-mini"], help="tiny: conftest.make_unet_cond; "
                    "sd15-mini: SD1.5's block layout (4 levels, 2 layers per block, 3 cross-attention levels) with "
                    "16 / 32 channels, 16x16 latents (slower: ~3x the nodes)")
    args = ap.parse_args(argv)
    import torch
    import torch._inductor.config as icfg

    sys.path.insert(0, str(ROOT / "tests"))
    import conftest

    import msfp_compiler.export.triton.fast as FA
    from msfp_compiler.compile import compile as msfp_compile

    cm = msfp_compile(conftest.make_unet_cond() if args.model == "tiny" else _sd15_mini(), conftest.FAST_CONFIG,
                      progress=False)
    x = [torch.cat([a] * args.batch)[:args.batch] for a in cm.calibration.batches[0].args]
    # as on CUDA: the implicit conv and the CUDA-at-bf16 defaults (split_concat, grid_fast, ...)
    fast = FA.build_fast(cm.graph_module, "cpu", implicit_conv=True, cat_nhwc=args.cat_nhwc,
                         **FA.CUDA_BF16_DEFAULTS)
    icfg.force_disable_caches = True  # a cache hit would skip the scheduler
    with torch.no_grad(), recording() as (pre, kernels):
        y = torch.compile(fast, dynamic=False)(*x)
    flagged = [compact({**rec, "strided": acc, "kernel": kernels.get(rec["op"])})
               for rec in pre if (acc := strided(rec))]
    summary = {"batch": args.batch, "cat_nhwc": args.cat_nhwc, "report": str(fast.report),
               "output_sha256": hashlib.sha256(y.float().numpy().tobytes()).hexdigest(),
               "model": args.model,
               "torch": torch.__version__, "scheduler_nodes": len(pre), "strided_nodes": len(flagged),
               "flagged": flagged}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "flagged"}, indent=1))
    for f in flagged:
        print(f["op"], f["sizes"], f["kernel"])
        for a in f["strided"]:
            print("   ", a["kind"], a["buffer"], a["dtype"], a["numel"], a["step_inner"], a["index"])
        print("    where:", f["where"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
