"""Did the fine-tuned rows of the MNIST quality table converge? Per row and seed, from the loss curves the device
calls recorded (results/quality_mnist.json, main table and variants): steps run, the probe loss before / after
fine-tuning, and whether the training loss was still falling over the second half of the run.

    python tools/finetune_convergence.py            # -> results/mnist/finetune_convergence.{md,png}

A curve point is the mean training loss over one logging interval (100 steps in calls 6-8, 25 in call 9). "Still
falling" is a least-squares line through the second-half points of every seed, each seed's points divided by that
seed's second-half mean (so seeds pool), weighted by interval length: **falling** when the slope is negative by more
than two standard errors, **rising** when positive by more than two, otherwise **flat** when the standard error is at
most NOISY_SE (a trend of that size would have shown) and **noisy** when larger (no trend detectable either way). The
cosine schedule takes the learning rate to zero at the last step, so "flat" at the end can mean the schedule ran out,
not that more steps would not help.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOISY_SE = 0.05  # relative slope per 100 steps: above this standard error "flat" would claim more than the data show


def second_half_trend(curves: list[list[list[float]]]) -> tuple[float, float, int]:
    """(relative slope per 100 steps, its standard error, points) of the pooled second-half interval means."""
    xs, ys, ws = [], [], []
    for curve in curves:
        if not curve:
            continue
        total = curve[-1][0]
        prev = 0
        pts = []
        for step, loss in curve:
            pts.append((step, loss, step - prev))
            prev = step
        half = [(s, v, w) for s, v, w in pts if s > total / 2]
        if len(half) < 2:
            continue
        mean = np.average([v for _, v, _ in half], weights=[w for *_, w in half])
        for s, v, w in half:
            xs.append(s / 100.0)
            ys.append(v / mean)
            ws.append(w / 100.0)
    if len(xs) < 3:
        return float("nan"), float("nan"), len(xs)
    x, y, w = map(np.asarray, (xs, ys, ws))
    # Seeds differ in level only through the normalisation above; one common slope over all their points.
    a = np.stack([x, np.ones_like(x)], 1) * np.sqrt(w)[:, None]
    b = y * np.sqrt(w)
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    resid = b - a @ coef
    dof = max(1, len(x) - 2)
    cov = np.linalg.inv(a.T @ a) * float(resid @ resid) / dof
    return float(coef[0]), float(np.sqrt(cov[0, 0])), len(x)


def verdict(slope: float, se: float) -> str:
    if not np.isfinite(slope):
        return "too few points"
    if slope < -2 * se:
        return "falling"
    if slope > 2 * se:
        return "rising"
    return "flat" if se <= NOISY_SE else "noisy"


def fine_tuned_rows(table: dict) -> list[tuple[str, str, dict]]:
    """(model, row name, row) for every row with loss curves, main table first, then the variants."""
    out = []
    for model in ("uncond", "cond"):
        out += [(model, name, row) for name, row in table.get(model, {}).items() if row.get("loss_curve")]
    for model in ("uncond", "cond"):
        out += [(model, f"variant: {name}", row) for name, row in table.get("variants", {}).get(model, {}).items()
                if row.get("loss_curve")]
    return out


def summarise(model: str, name: str, row: dict) -> dict:
    slope, se, n = second_half_trend(row["loss_curve"])
    return {"model": model, "row": name, "call": row.get("call"), "seeds": row["seeds"], "steps": row["steps"],
            "initial_loss": row["initial_loss"], "final_loss": row["final_loss"],
            "slope_per_100_steps": round(slope, 4), "slope_se": round(se, 4), "points": n,
            "second_half": verdict(slope, se)}


# Rows of one configuration measured in several calls (same seeds, so the same probe batches and starting loss):
# within a seed they differ only in the steps the time budget allowed, which separates step count from seed.
# Row names are fnmatch patterns; a group with fewer than two of its rows in the table is left out. A goal row that a
# later call replaced moves to the variants as "<row>, call N (...)" and stays in its group.
SAME_CONFIG = {
    "uncond MSFP + TALoRA + DFA, rank 4 (calls 6, 7, 8, 10)": [
        ("uncond", "variant: MSFP + TALoRA + DFA, rank 4 (call 6*"),
        ("uncond", "variant: MSFP + TALoRA + DFA (call 7 rerun)"),
        ("uncond", "variant: MSFP + TALoRA + DFA (call 8 rerun, rank 4)"),
        ("uncond", "variant: MSFP + TALoRA + DFA, rank 4, call 10*")],
    "uncond MSFP + TALoRA + DFA, rank 32 (calls 8, 10, 11, 12)": [
        ("uncond", "variant: MSFP + TALoRA + DFA, LoRA rank 32"),
        ("uncond", "variant: MSFP + TALoRA + DFA, call 10 (*"), ("uncond", "variant: MSFP + TALoRA + DFA, call 11 (*"),
        ("uncond", "MSFP + TALoRA + DFA")],
    "cond MSFP + TALoRA + DFA, rank 4 (calls 8, 9, 10)": [
        ("cond", "variant: MSFP + TALoRA + DFA, rank 4 (call 8*"),
        ("cond", "variant: MSFP + TALoRA + DFA, rank 4, * steps (baseline)"),
        ("cond", "variant: MSFP + TALoRA + DFA, rank 4, call 10*")],
    "cond MSFP + TALoRA + DFA, rank 32 (calls 9, 10, 11, 12)": [
        ("cond", "variant: MSFP + TALoRA + DFA, LoRA rank 32, * steps"),
        ("cond", "variant: MSFP + TALoRA + DFA, call 10 (*"), ("cond", "MSFP + TALoRA + DFA"),
        ("cond", "variant: MSFP + TALoRA + DFA, call 12 rerun*")],
}


def steps_within_seed(table: dict) -> list[dict]:
    """Per SAME_CONFIG group and seed: (call, steps, probe loss change, FID) ordered by steps."""
    rows = fine_tuned_rows(table)
    out = []
    for group, keys in SAME_CONFIG.items():
        runs = [(r, (m, n)) for km, kn in keys for m, n, r in rows if m == km and fnmatch.fnmatchcase(n, kn)]
        if len(runs) < 2:
            continue
        for seed in sorted({s for r, _ in runs for s in r["seeds"]}):
            pts = []
            for r, _ in runs:
                if seed in r["seeds"]:
                    i = r["seeds"].index(seed)
                    pts.append({"call": r.get("call"), "steps": r["steps"][i], "initial_loss": r["initial_loss"][i],
                                "final_loss": r["final_loss"][i], "fid": r["fid"][i]})
            out.append({"group": group, "seed": seed, "runs": sorted(pts, key=lambda p: p["steps"])})
    return out


def steps_markdown(groups: list[dict]) -> str:
    lines = ["| configuration | seed | steps (call): probe loss change, FID |", "|---|---|---|"]
    for g in groups:
        cells = "; ".join(f"{p['steps']} ({p['call']}): {100 * (p['final_loss'] / p['initial_loss'] - 1):+.0f}%, "
                          f"{p['fid']:.1f}" for p in g["runs"])
        lines.append(f"| {g['group']} | {g['seed']} | {cells} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = ["| model | row | call | steps per seed | probe loss before -> after (per seed) | "
             "second-half training loss: slope per 100 steps (± s.e.) | still falling? |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = ", ".join(f"{a:.4f} -> {b:.4f}" for a, b in zip(r["initial_loss"], r["final_loss"]))
        slope = f"{100 * r['slope_per_100_steps']:+.1f}% ± {100 * r['slope_se']:.1f}% ({r['points']} points)"
        lines.append(f"| {r['model']} | {r['row']} | {r['call']} | {', '.join(map(str, r['steps']))} | {probe} | "
                     f"{slope} | {r['second_half']} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = fine_tuned_rows(table)
    cols = 4
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(4 * cols, 2.6 * ((len(rows) + 3) // cols)),
                             squeeze=False)
    for ax, (model, name, row) in zip(axes.flat, rows):
        for j, (seed, curve) in enumerate(zip(row["seeds"], row["loss_curve"])):
            steps, loss = zip(*curve)
            ax.plot(steps, loss, color=f"C{j}", lw=1, label=f"seed {seed}")
            ax.plot([0, steps[-1]], [row["initial_loss"][j], row["final_loss"][j]], "o", color=f"C{j}", ms=3)
        ax.set_title(f"{model}: {name.replace('variant: ', '')} (call {row.get('call')})", fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("fine-tuning loss: lines = training-loss interval means, dots = probe loss before / after", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=ROOT / "results" / "quality_mnist.json")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "mnist" / "finetune_convergence",
                   help="writes OUT.md, OUT.json and OUT.png")
    args = p.parse_args(argv)
    try:
        table = json.loads(args.table.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"finetune_convergence: cannot read {args.table}: {e}", file=sys.stderr)
        return 2
    rows = [summarise(*r) for r in fine_tuned_rows(table)]
    if not rows:
        print(f"finetune_convergence: {args.table} has no rows with loss curves", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    within = steps_within_seed(table)
    md = markdown(rows) + ("\nSame configuration, same seed, different step counts:\n\n" + steps_markdown(within)
                           if within else "")
    for suffix, text in ((".md", md), (".json", json.dumps({"rows": rows, "steps_within_seed": within}, indent=1)
                                       + "\n")):
        tmp = args.out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out.with_suffix(suffix))
    plot(table, args.out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
