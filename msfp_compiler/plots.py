"""``--plots``: per-layer activation histograms with the chosen grid overlaid, and a signed/unsigned summary."""

from __future__ import annotations

from pathlib import Path

from .ops import get_format
from .record import records

__all__ = ["write_plots"]


def write_plots(cm, log_dir: Path, max_layers: int | None = None) -> list[Path]:
    """Write hist_<node>.png for every quantized activation and sign_summary.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(log_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    acts = [(n, r) for n, r in records(cm.graph_module) if r.role == "act"]
    for node, rec in acts[:max_layers]:
        x = rec.calibration_sample()
        if x.numel() == 0:
            continue
        c = rec.choice
        fmt = get_format(c.fmt)
        levels = (c.zero_point + fmt.grid * c.scale).reshape(-1)
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(x.numpy(), bins=128, color="#4477aa", alpha=0.8, log=True)
        for v in levels.tolist():
            ax.axvline(v, color="#cc3311", lw=0.6, alpha=0.7)
        ax.set_title(f"{node.name}: {c.fmt} (scale {float(c.scale):.3g}, zp {float(c.zero_point):+.3f}), "
                     f"neg {rec.neg_fraction:.0%}", fontsize=8)
        ax.set_xlabel("activation value (red: quantization grid)", fontsize=8)
        fig.tight_layout()
        p = out_dir / f"hist_{node.name}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        written.append(p)
    fig, ax = plt.subplots(figsize=(max(6, len(acts) * 0.12), 3))
    colors = ["#999999" if r.bits > 4 else ("#cc3311" if not r.choice.signed else "#4477aa") for _, r in acts]
    neg = [r.neg_fraction for _, r in acts]
    ax.bar(range(len(acts)), [1] * len(acts), color=colors)
    ax.plot(range(len(acts)), neg, "k.", ms=3, label="negative fraction")
    ax.set_xlabel("quantized activation (graph order)")
    ax.set_yticks([])
    ax.set_title("mixup-sign choice: red = unsigned FP4 + zero point, blue = signed FP4, grey = 8-bit", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    p = out_dir / "sign_summary.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)
    return written
