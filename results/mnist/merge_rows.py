"""Helpers of the merge scripts (results/mnist/merge_call15_17.py and those from call 18 on): each script is the
run-once record of how a device call's folders entered results/quality_mnist.json. Run from the repository root."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, "tools")
from quality_rows import write_json  # noqa: E402

TABLE = Path("results/quality_mnist.json")
CALLS = Path("results/mnist")


def load_table() -> dict:
    return json.loads(TABLE.read_text())


def save_table(d: dict) -> None:
    write_json(TABLE, d, indent=1)


def call_row(d: dict, call: int, folder: str, model: str, row: str) -> dict:
    """One row of a call's run folder (results/mnist/callNN/FOLDER/quality_mnist.json), tagged with its call; the
    run's settings are recorded under d["settings"]["callNN_FOLDER"]."""
    j = json.loads((CALLS / f"call{call}" / folder / "quality_mnist.json").read_text())
    d["settings"][f"call{call}_{folder}"] = j["settings"]
    return {**j[model][row], "call": call}


def add_note(d: dict, note: str) -> None:
    """Append to the variants' note once (the scripts are idempotent)."""
    if note not in d["variants"]["note"]:
        d["variants"]["note"] += note
