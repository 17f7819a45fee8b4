"""tools/finetune_convergence.py: the second-half trend of pooled loss curves, and the report from a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

fc = pytest.importorskip("finetune_convergence")


def _curve(total: int, every: int, f) -> list[list[float]]:
    steps = list(range(every, total, every)) + [total]
    return [[s, f(s)] for s in steps]


def test_falling_flat_and_rising_second_halves() -> None:
    rng = np.random.default_rng(0)
    falling = [_curve(n, 100, lambda s: 0.01 * np.exp(-s / 400) * (1 + 0.02 * rng.standard_normal())) for n in
               (600, 1300, 800)]
    flat = [_curve(n, 100, lambda s: 0.005 * (1 + 0.2 * rng.standard_normal())) for n in (600, 1300, 800)]
    rising = [_curve(n, 100, lambda s: 0.004 + 1e-5 * s) for n in (600, 900)]
    assert fc.verdict(*fc.second_half_trend(falling)[:2]) == "falling"
    assert fc.verdict(*fc.second_half_trend(flat)[:2]) == "flat"
    assert fc.verdict(*fc.second_half_trend(rising)[:2]) == "rising"
    noisy = [_curve(n, 100, lambda s: 0.005 * (1 + 0.6 * rng.standard_normal())) for n in (400, 500)]
    assert fc.verdict(*fc.second_half_trend(noisy)[:2]) == "noisy"
    slope, _, n = fc.second_half_trend([_curve(1000, 100, lambda s: 1.0)])
    assert n == 5 and abs(slope) < 1e-9  # steps 600..1000: the points past half of the run only


def test_report_from_a_table(tmp_path: Path) -> None:
    row = {"seeds": [0, 1], "steps": [400, 400], "initial_loss": [0.01, 0.02], "final_loss": [0.005, 0.01],
           "call": 9, "loss_curve": [_curve(400, 50, lambda s: 0.01 - 1e-5 * s)] * 2}
    table = {"uncond": {"FP32": {"seeds": [0, 1], "fid": [1.0, 2.0]}, "MSFP + LoRA": row},
             "variants": {"cond": {"rank 32": row}}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    assert fc.main(["--table", str(tmp_path / "t.json"), "--out", str(tmp_path / "conv")]) == 0
    rows = json.loads((tmp_path / "conv.json").read_text())["rows"]
    assert [(r["model"], r["row"], r["second_half"]) for r in rows] == [
        ("uncond", "MSFP + LoRA", "falling"), ("cond", "variant: rank 32", "falling")]
    assert "0.0100 -> 0.0050" in (tmp_path / "conv.md").read_text()
    assert fc.main(["--table", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x.md").exists()


def test_same_seed_runs_ordered_by_steps() -> None:
    def run(call, steps, final, fid):
        return {"seeds": [0], "steps": [steps], "initial_loss": [0.01], "final_loss": [final], "fid": [fid],
                "call": call, "loss_curve": [_curve(steps, 100, lambda s: 0.01)]}
    table = {"uncond": {"MSFP + TALoRA + DFA": run(10, 1500, 0.004, 330.0)},  # rank 32: its group's other row is
             "variants": {"uncond": {"MSFP + TALoRA + DFA, rank 4 (call 6; old goal row)": run(6, 700, 0.006, 500.0),
                                     "MSFP + TALoRA + DFA (call 7 rerun)": run(7, 400, 0.008, 540.0),  # absent
                                     "MSFP + TALoRA + DFA (call 8 rerun, rank 4)": run(8, 1300, 0.005, 410.0)}}}
    table["cond"] = {"MSFP + TALoRA + DFA": run(10, 900, 0.005, 560.0)}
    (g,) = fc.steps_within_seed(table)
    assert [(p["call"], p["steps"]) for p in g["runs"]] == [(7, 400), (6, 700), (8, 1300)]
    assert "400 (7): -20%, 540.0; 700 (6): -40%, 500.0; 1300 (8): -50%, 410.0" in fc.steps_markdown([g])
    table["variants"]["cond"] = {"MSFP + TALoRA + DFA, LoRA rank 32, 250 steps": run(9, 250, 0.007, 760.0)}
    groups = fc.steps_within_seed(table)
    assert [[p["steps"] for p in g["runs"]] for g in groups] == [[400, 700, 1300], [250, 900]]


def test_replaced_goal_row_stays_in_its_group() -> None:
    """A goal row that a later call replaced (moved to the variants as "<row>, call N (...)") keeps its place in
    the rank-32 group next to the new goal row."""
    def run(call, steps, fid):
        return {"seeds": [0], "steps": [steps], "initial_loss": [0.01], "final_loss": [0.005], "fid": [fid],
                "call": call, "loss_curve": [_curve(steps, 100, lambda s: 0.01)]}
    table = {"uncond": {"MSFP + TALoRA + DFA": run(11, 2500, 300.0)},
             "variants": {"uncond": {"MSFP + TALoRA + DFA, call 10 (1318-1500 steps; the goal row until call 11)":
                                     run(10, 1320, 345.0)}}}
    (g,) = fc.steps_within_seed(table)
    assert g["group"].startswith("uncond MSFP + TALoRA + DFA, rank 32")
    assert [(p["call"], p["steps"]) for p in g["runs"]] == [(10, 1320), (11, 2500)]
