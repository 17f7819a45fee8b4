"""Count the sm_90 SASS instructions of an Inductor-generated Triton kernel on a machine without a GPU.

A GPU run brings back Inductor's output code (``tools/inductor_code.py``); this compiles one of its kernels with
Triton's own compiler for sm_90 (Hopper), disassembles it with the nvdisasm Triton ships, and reports the
instructions per element and by opcode. Pointwise kernels that issue more instructions per element than the H200
moves bytes for are instruction-bound (docs/triton.md session 18: ~1e12 warp instructions/s against 4.19 TB/s).

    python tools/sass_count.py OUTPUT_CODE.py --kernel where_9 [--block x=1024] [--warps 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

_KERNEL = re.compile(r"(\w+) = async_compile\.triton\('(\w+)', '''(.*?)'''", re.S)


def kernels(path: Path) -> dict[str, str]:
    """name -> Triton source of every kernel in an output-code module (or in each module of a .tar.gz of them)."""
    texts = []
    if path.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path) as tar:
            texts = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()]
    else:
        texts = [path.read_text()]
    return {name: body for text in texts for _, name, body in _KERNEL.findall(text)}


def _meta(src: str) -> dict:
    """The ``triton_meta`` dict of the kernel's decorator (signature and divisibility configs)."""
    start = src.index("triton_meta=") + len("triton_meta=")
    depth, i = 0, start
    while True:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
        if depth == 0:
            break
    text = re.sub(r"DeviceProperties\(.*?\)", "None", src[start:i])
    return ast.literal_eval(text)


def compile_sm90(src: str, name: str, blocks: dict[str, int], warps: int) -> bytes:
    """The kernel's cubin for sm_90, its block sizes fixed to ``blocks`` (XBLOCK, YBLOCK, R0_BLOCK ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = _meta(src)
    body = src[src.index("@triton.jit"):]
    mod_src = ("import triton\nimport triton.language as tl\nfrom torch._inductor.runtime import triton_helpers\n"
               "from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math\n" + body)
    sig = dict(meta["signature"])
    missing = [k for k, v in sig.items() if v == "constexpr" and k not in blocks]
    if missing:
        raise ValueError(f"kernel {name}: give --block {missing[0]}=N")
    const = {k: blocks[k] for k, v in sig.items() if v == "constexpr"}
    attrs = {}
    for cfg in meta.get("configs", []):
        attrs.update(cfg)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # triton.jit reads the source file
        f.write(mod_src)
    try:
        ns: dict = {"__name__": "sass_kernel", "__file__": f.name}
        exec(compile(mod_src, f.name, "exec"), ns)  # noqa: S102  (generated code of our own run)
        c = triton.compile(ASTSource(ns[name], sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps})
    finally:
        os.unlink(f.name)
    return c.asm["cubin"]


def sass(cubin: bytes) -> list[str]:
    """The instruction lines of the cubin up to its last EXIT (nvdisasm from Triton's NVIDIA backend)."""
    import triton

    nv = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(nv), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    lines = [ln for ln in out.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", ln)]
    last_exit = max((i for i, ln in enumerate(lines) if opcode(ln) == "EXIT"), default=len(lines) - 1)
    return lines[:last_exit + 1]  # not the alignment NOPs and the self-branch after the last EXIT


def opcode(line: str) -> str:
    m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
    return m.group(1) if m else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("code", type=Path, help="Inductor output-code module (.py) or a .tar.gz of them")
    ap.add_argument("--kernel", required=True, help="a substring of one kernel's name (its end: e.g. where_9)")
    ap.add_argument("--block", action="append", default=[], metavar="NAME=N",
                    help="block sizes of the kernel's constexpr parameters (default XBLOCK=1024, YBLOCK=1; a "
                    "persistent reduction's R0_BLOCK is fixed in its code)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args(argv)
    if not args.code.exists():
        print(f"sass_count: {args.code}: no such file", file=sys.stderr)
        return 2
    ks = kernels(args.code)
    hits = [n for n in ks if n.endswith(args.kernel)] or [n for n in ks if args.kernel in n]
    if len(hits) != 1:
        print(f"sass_count: --kernel {args.kernel!r} matches {len(hits)} of {len(ks)} kernels in {args.code}",
              file=sys.stderr)
        return 2
    name = hits[0]
    src = ks[name]
    params = [k for k, v in _meta(src)["signature"].items() if v == "constexpr"]  # XBLOCK, YBLOCK, R0_BLOCK ...
    blocks = {k: v for k, v in (("XBLOCK", 1024), ("YBLOCK", 1)) if k in params}
    for b in args.block:
        k, _, v = b.partition("=")
        key = k.upper() if k.upper().endswith("BLOCK") else f"{k.upper()}{'_' if k[-1:].isdigit() else ''}BLOCK"
        if key not in params or not v.isdigit() or int(v) < 1:
            print(f"sass_count: --block {b!r}: want NAME=N with NAME one of {', '.join(params)} (or x, y, r0)",
                  file=sys.stderr)
            return 2
        blocks[key] = int(v)
    try:
        lines = sass(compile_sm90(src, name, blocks, args.warps))
    except ValueError as e:
        print(f"sass_count: {e}", file=sys.stderr)
        return 2
    r0 = re.search(r"R0_BLOCK: tl.constexpr = (\d+)", src)
    per_program = math.prod(blocks.values()) * (int(r0.group(1)) if r0 else 1)
    per_thread = per_program / (32 * args.warps)
    ops = Counter(opcode(ln) for ln in lines)
    res = {"kernel": name, "blocks": blocks, "warps": args.warps, "sass": len(lines),
           "elements_per_thread": per_thread, "per_element": round(len(lines) / per_thread, 2),
           "opcodes": dict(ops.most_common())}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
