"""``--plots``: per-layer activation histograms with the chosen grid overlaid, and a signed/unsigned summary."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .names import tensor_names
from .ops import get_format
from .progress import Progress
from .record import records

__all__ = ["write_plots", "plot_file_name"]

_MAX_GRID_LINES = 32  # beyond this (8-bit grids: 256 levels) the lines hide the histogram; the clip range is shaded


def plot_file_name(name: str) -> str:
    """hist_<readable tensor name>.png, with anything but letters, digits, '.', '_' and '-' replaced."""
    return "hist_" + re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".png"


def write_plots(cm, log_dir: Path, max_layers: int | None = None, progress: bool | None = None) -> list[Path]:
    """Write hist_<tensor>.png for every quantized activation and sign_summary.png; returns the paths.

    A histogram shows the values select_format searched (a bounded random subsample per timestep group); the
    dashed lines are the min and max over *all* calibration values (what passes.log reports), which the
    subsample may not reach."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(log_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    names = tensor_names(cm.graph_module)
    acts = [(n, r) for n, r in records(cm.graph_module) if r.role == "act"]
    todo = acts[:max_layers]
    bar = Progress(len(todo) + 1, "plots", progress, unit="files")
    for node, rec in todo:
        bar.update()
        name = names.get(node.name, node.name)
        p = out_dir / plot_file_name(name)
        if _histogram(plt, rec, name, p):
            written.append(p)
    written.append(_sign_summary(plt, [r for _, r in acts], out_dir / "sign_summary.png"))
    bar.update()
    bar.close()
    return written


def _histogram(plt, rec, name: str, path: Path) -> bool:
    """One activation's calibration values, its grid and the min / max over all values; False if it has no values."""
    x = rec.calibration_sample()
    if x.numel() == 0:
        return False
    c = rec.choice
    fmt = get_format(c.fmt)
    levels = (c.zero_point + fmt.grid * c.scale).reshape(-1)
    fig, ax = plt.subplots(figsize=(6, 3))
    # one filled outline, the same picture as 128 edgeless bars at about half the drawing time (one patch, not 128)
    ax.hist(x.numpy(), bins=128, color="#4477aa", alpha=0.8, log=True, histtype="stepfilled")
    if levels.numel() <= _MAX_GRID_LINES:
        for v in levels.tolist():
            ax.axvline(v, color="#cc3311", lw=0.6, alpha=0.7)
        grid_txt = f"red: the {levels.numel()} grid levels"
    else:
        ax.axvspan(float(levels.min()), float(levels.max()), color="#cc3311", alpha=0.12)
        grid_txt = f"red band: range of the {levels.numel()}-level grid"
    for v in (rec.min, rec.max):
        ax.axvline(v, color="k", lw=0.8, ls="--")
    ax.set_title(f"{name}: {c.fmt} ({rec.bits}-bit, scale {float(c.scale):.3g}, zp {float(c.zero_point):+.3f}), "
                 f"neg {rec.neg_fraction:.0%}", fontsize=8)
    ax.set_xlabel(f"activation value ({x.numel()} sampled of {sum(g.count for g in rec.groups)})\n{grid_txt}; "
                  "dashed: min / max of all values", fontsize=7)
    ax.set_ylabel("count (log)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _sign_summary(plt, acts: list, path: Path) -> Path:
    """Negative fraction per activation in graph order, coloured by the chosen sign (or 8 bits)."""
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(6, len(acts) * 0.12), 3.2))
    colors = ["#999999" if r.bits > 4 else ("#cc3311" if not r.choice.signed else "#4477aa") for r in acts]
    ax.bar(range(len(acts)), [r.neg_fraction for r in acts], color=colors, width=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of negative values")
    ax.set_xlabel(f"quantized activation, index in graph order (0..{len(acts) - 1}; names in passes.log)")
    ax.set_title("mixup-sign choice per activation", fontsize=9)
    ax.legend(handles=[Patch(color="#cc3311", label="unsigned + zero point"),
                       Patch(color="#4477aa", label="signed"), Patch(color="#999999", label="8-bit")],
              fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
