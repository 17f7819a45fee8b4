"""Collect the output-code modules Inductor wrote to its cache directory (one Python file per compiled graph, every
Triton kernel's source inline) into one .tar.gz, keeping those that contain a pattern: how a GPU run brings back
the generated code of a step it compiled (run the step with TORCHINDUCTOR_CACHE_DIR=DIR first).

    python tools/inductor_code.py DIR --grep _scaled_mm --out $OUT/inductor_code.tgz
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path


def collect(cache: Path, pattern: str, out: Path) -> list[str]:
    """Add each ``*.py`` under cache that defines ``def call(`` (an output-code module) and contains pattern to the
    tarball out; returns their paths relative to cache, largest first."""
    found = sorted((p for p in cache.rglob("*.py") if p.is_file()), key=lambda p: -p.stat().st_size)
    keep = []
    for p in found:
        text = p.read_text(errors="replace")
        if "def call(" in text and pattern in text:
            keep.append(p)
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in keep:
            tar.add(p, arcname=str(p.relative_to(cache)))
    tmp.replace(out)
    return [str(p.relative_to(cache)) for p in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", type=Path, help="TORCHINDUCTOR_CACHE_DIR of the run")
    ap.add_argument("--grep", default="", help="keep only modules containing this text (default: all)")
    ap.add_argument("--out", type=Path, required=True, help="the .tar.gz to write")
    args = ap.parse_args(argv)
    if not args.cache.is_dir():
        print(f"inductor_code: {args.cache}: no such directory", file=sys.stderr)
        return 2
    names = collect(args.cache, args.grep, args.out)
    for name in names:
        print(name)
    if not names:
        print(f"inductor_code: no output-code module under {args.cache} contains {args.grep!r} (empty {args.out})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
