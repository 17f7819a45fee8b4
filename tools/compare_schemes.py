"""Per-layer quantization MSE of each scheme on the same calibration data (why one scheme beats another).

    python tools/compare_schemes.py examples/digits-uncond --out results/scheme_mse_uncond.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msfp_compiler.calibrate import collect, make_scheduler  # noqa: E402
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
    args = p.parse_args(argv)
    lm = load_model(args.model)
    sig = signature_of(lm.unet)
    calib = collect(lm.unet, sig, args.calib_samples, args.calib_steps, 0,
                    make_scheduler("ddim", lm.scheduler_config), class_embedding=lm.class_embedding)
    gm, _ = capture(lm.unet, sig)
    AnnotateSign(calib)(gm)
    per_layer: dict[str, dict] = {}
    for scheme in SCHEMES:
        SelectFormat(QuantConfig(scheme=scheme))(gm)
        for node, rec in records(gm):
            row = per_layer.setdefault(node.name, {"role": rec.role, "after_silu": rec.after_silu, "bits": rec.bits})
            row[scheme] = {"fmt": rec.choice.fmt, "mse": rec.choice.mse}
    summary = {}
    for group, pick in [("act after SiLU", lambda r: r["role"] == "act" and r["after_silu"]),
                        ("act other", lambda r: r["role"] == "act" and not r["after_silu"]),
                        ("weights", lambda r: r["role"] == "weight")]:
        rows = [r for r in per_layer.values() if pick(r) and r["bits"] == 4]
        summary[group] = {s: sum(r[s]["mse"] for r in rows) for s in SCHEMES} | {"layers": len(rows)}
        wins = {s: sum(min(SCHEMES, key=lambda k: r[k]["mse"]) == s for r in rows) for s in SCHEMES}
        summary[group]["best_count"] = wins
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "layers": per_layer}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
