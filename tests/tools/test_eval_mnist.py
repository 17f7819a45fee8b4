"""tools/eval_mnist.py: the goal verdicts (ties called ties) and the GPU sampling slots."""

from __future__ import annotations

import fcntl
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

eval_mnist = pytest.importorskip("eval_mnist")


def test_compare_calls_overlapping_seed_ranges_a_tie() -> None:
    assert eval_mnist.compare([10.0, 11.0, 12.0], [13.0, 14.0, 15.0]) == "lower"
    assert eval_mnist.compare([13.0, 14.0], [10.0, 12.9]) == "higher"
    assert eval_mnist.compare([10.0, 13.5], [13.0, 14.0]) == "tie"  # means differ, ranges overlap
    assert eval_mnist.compare([10.0], [20.0]) == "one seed"  # no spread to judge by


def test_goal_lines_ratio_and_verdicts() -> None:
    table = {"FP32": {"fid": [10.0, 12.0]}, "MSFP + TALoRA + DFA": {"fid": [11.0, 12.0]},
             "MSFP + LoRA": {"fid": [11.5, 12.5]}, "MSFP PTQ": {"fid": [20.0, 21.0]},
             "INT4 PTQ": {"fid": [30.0, 31.0]}}
    lines = eval_mnist.goal_lines(table)
    assert lines[0].startswith("- MSFP + TALoRA + DFA / FP32 mean FID: 1.045") and "met" in lines[0]
    assert any(line.startswith("- MSFP PTQ vs INT4 PTQ: -10.00 FID, below") for line in lines)
    assert any("vs MSFP + LoRA" in line and "tie" in line for line in lines)
    assert not any("FP4 signed" in line for line in lines)  # a missing row is not judged


def test_gpu_slot_admits_at_most_slots_holders(tmp_path) -> None:
    inside, peak, lock = [0], [0], threading.Lock()

    def work() -> None:
        with eval_mnist.gpu_slot(tmp_path, 2, "0"):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    # released afterwards: a non-blocking lock of every slot file succeeds
    for k in range(2):
        with open(tmp_path / f".gpu0_slot{k}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_rows_map_onto_compile_configs_for_both_tools() -> None:
    """quality_rows (shared by eval_quality and eval_mnist): PTQ rows do not fine-tune, LoRA is K=1, TALoRA K=2,
    DFA only where the row says so, and eval_mnist's options reach FinetuneConfig."""
    import argparse

    from quality_rows import ROWS

    args = argparse.Namespace(calib_samples=4, calib_steps=5, finetune_steps=7, lora_rank=3, finetune_samples=8,
                              steps=10, device="cpu", finetune_batch=6, lora_lr=2e-3, log_every=0,
                              learn_act_scales=True, finetune_time_budget=90.0, keep_8bit="first,last",
                              float_attention=False)
    ptq = eval_mnist.compile_config(ROWS["MSFP PTQ"], args, 1)
    assert ptq.finetune is None and ptq.quant.scheme == "msfp" and ptq.calib.seed == 1
    assert (ptq.calib.num_samples, ptq.calib.num_steps) == (4, 5)
    lora = eval_mnist.compile_config(ROWS["INT4 + LoRA"], args, 2).finetune
    assert (lora.num_loras, lora.dfa, lora.rank, lora.steps, lora.seed) == (1, False, 3, 7, 2)
    full = eval_mnist.compile_config(ROWS["MSFP + TALoRA + DFA"], args, 0).finetune
    assert (full.num_loras, full.dfa, full.batch_size, full.lr, full.sampler_steps) == (2, True, 6, 2e-3, 10)
    assert full.learn_act_scales and full.time_budget_s == 90.0
    assert eval_mnist.compile_config(ROWS["MSFP + TALoRA"], args, 0).finetune.dfa is False


def test_keep_8bit_patterns_expand_over_layer_paths_and_reach_the_config() -> None:
    """--keep-8bit "first,last,*.conv_shortcut": fnmatch over the model's layer paths, into QuantConfig.keep_8bit,
    with --float-attention leaving attention operands in float; a pattern matching nothing is a user error."""
    import torch.nn as nn

    from msfp_compiler.errors import MsfpError

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(2, 2, 3)
            self.conv_shortcut = nn.Conv2d(4, 2, 1)

    unet = nn.Module()
    unet.conv_in = nn.Conv2d(1, 2, 3)
    unet.up_blocks = nn.ModuleList([Block(), Block()])
    keep = eval_mnist.keep_8bit_layers("first,last,*.conv_shortcut", unet)
    assert keep == ("first", "last", "up_blocks.0.conv_shortcut", "up_blocks.1.conv_shortcut")
    with pytest.raises(MsfpError, match=r"--keep-8bit: '\*\.nope' matches no layer"):
        eval_mnist.keep_8bit_layers("first,*.nope", unet)
    args = eval_mnist.build_parser().parse_args(["--keep-8bit", "first,*.conv_shortcut", "--float-attention"])
    cfg = eval_mnist.compile_config(eval_mnist.ROWS["MSFP PTQ"], args, 0, unet)
    assert cfg.quant.keep_8bit == ("first", "up_blocks.0.conv_shortcut", "up_blocks.1.conv_shortcut")
    assert cfg.quant.quantize_attention is False
    default = eval_mnist.compile_config(eval_mnist.ROWS["MSFP PTQ"], eval_mnist.build_parser().parse_args([]), 0, unet)
    assert default.quant.keep_8bit == ("first", "last") and default.quant.quantize_attention is True
