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
# warp-instruction issue rate of an H200 (132 SMs x 4 schedulers x 1.98 GHz) and its measured copy bandwidth
H200_WARP_INSTR_PER_S = 132 * 4 * 1.98e9
H200_COPY_BYTES_PER_S = 4.19e12


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
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # triton.jit reads the source file
        f.write(mod_src)
    ns: dict = {"__name__": "sass_kernel", "__file__": f.name}
    exec(compile(mod_src, f.name, "exec"), ns)  # noqa: S102  (generated code of our own run)
    fn = ns[name]
    sig = dict(meta["signature"])
    const = {}
    for k in list(sig):
        if sig[k] == "constexpr":
            if k not in blocks:
                raise SystemExit(f"sass_count: kernel {name}: give --block {k}=N")
            const[k] = blocks[k]
    attrs = {}
    for cfg in meta.get("configs", []):
        attrs.update({k: v for k, v in cfg.items()})
    target = GPUTarget("cuda", 90, 32)
    c = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=target,
                       options={"num_warps": warps})
    os.unlink(f.name)
    return c.asm["cubin"]


def sass(cubin: bytes) -> list[str]:
    """The instruction lines of the cubin (nvdisasm from Triton's NVIDIA backend)."""
    import triton

    nv = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([str(nv), "-c", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    return [ln for ln in out.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]


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
    blocks = {"XBLOCK": 1024, "YBLOCK": 1}
    for b in args.block:
        k, _, v = b.partition("=")
        blocks[k.upper() if k.upper().endswith("BLOCK") else f"{k.upper()}BLOCK"] = int(v)
    src = ks[name]
    used = {k: v for k, v in blocks.items() if k in _meta(src)["signature"]}  # the kernel's own block parameters
    lines = sass(compile_sm90(src, name, used, args.warps))
    r0 = re.search(r"R0_BLOCK: tl.constexpr = (\d+)", src)
    per_program = math.prod(used.values()) * (int(r0.group(1)) if r0 else 1)
    per_thread = per_program / (32 * args.warps)
    ops = Counter(opcode(ln) for ln in lines)
    res = {"kernel": name, "blocks": used, "warps": args.warps, "sass": len(lines),
           "elements_per_thread": per_thread, "per_element": round(len(lines) / per_thread, 2),
           "opcodes": dict(ops.most_common())}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
