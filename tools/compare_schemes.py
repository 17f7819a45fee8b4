"""Per-layer quantization MSE of each scheme on the same calibration data (why one scheme beats another).

    python tools/compare_schemes.py examples/digits-uncond --out results/scheme_mse_uncond.json \
        --variant msfp+ue1m3=e1m2,e2m1,e3m0,ue1m3,ue2m2,ue3m1,ue4m0

``--variant NAME=FORMATS`` adds a candidate set of activation formats (weights as in msfp) next to the schemes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msfp_compiler.calibration import collect  # noqa: E402
from msfp_compiler.sampling import make_scheduler  # noqa: E402
from msfp_compiler.capture import capture, signature_of  # noqa: E402
from msfp_compiler.config import SCHEMES, QuantConfig  # noqa: E402
from msfp_compiler.load import load_model  # noqa: E402
from msfp_compiler.passes.annotate_sign import AnnotateSign  # noqa: E402
from msfp_compiler.passes.select_format import SelectFormat  # noqa: E402
from msfp_compiler.record import records  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--out", type=Path)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=25)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FORMATS",
                   help="an extra activation candidate set, e.g. msfp+ue1m3=e1m2,e2m1,ue1m3,ue2m2")
    args = p.parse_args(argv)
    configs = {scheme: QuantConfig(scheme=scheme) for scheme in SCHEMES}
    for v in args.variant:
        name, sep, fmts = v.partition("=")
        if not sep or not name or not fmts:
            p.error(f"--variant {v!r}: expected NAME=FORMAT,FORMAT,...")
        configs[name] = QuantConfig(act_formats=tuple(fmts.split(",")))
    lm = load_model(args.model)
    sig = signature_of(lm.unet)
    calib = collect(lm.unet, sig, args.calib_samples, args.calib_steps, 0,
                    make_scheduler("ddim", lm.scheduler_config), class_embedding=lm.class_embedding)
    gm, _ = capture(lm.unet, sig)
    AnnotateSign(calib)(gm)
    per_layer: dict[str, dict] = {}
    for scheme, cfg in configs.items():
        SelectFormat(cfg)(gm)
        for node, rec in records(gm):
            row = per_layer.setdefault(node.name, {"role": rec.role, "after_silu": rec.after_silu, "bits": rec.bits})
            row[scheme] = {"fmt": rec.choice.fmt, "mse": rec.choice.mse}
    summary = {}
    for group, pick in [("act after SiLU", lambda r: r["role"] == "act" and r["after_silu"]),
                        ("act other", lambda r: r["role"] == "act" and not r["after_silu"]),
                        ("weights", lambda r: r["role"] == "weight")]:
        rows = [r for r in per_layer.values() if pick(r) and r["bits"] == 4]
        summary[group] = {s: sum(r[s]["mse"] for r in rows) for s in configs} | {"layers": len(rows)}
        wins = {s: sum(min(SCHEMES, key=lambda k: r[k]["mse"]) == s for r in rows) for s in SCHEMES}
        summary[group]["best_count"] = wins  # among the schemes
        for name in set(configs) - set(SCHEMES):  # layers where int4 still beats the variant
            summary[group][f"int4_better_than_{name}"] = sum(
                r["int4"]["mse"] > 0 and r[name]["mse"] > r["int4"]["mse"] * (1 + 1e-5) for r in rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "layers": per_layer}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
