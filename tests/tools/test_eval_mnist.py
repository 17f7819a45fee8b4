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
                              float_attention=False, finetune_holdout=5, finetune_trajectories="mixed",
                              lora_8bit=True)
    ptq = eval_mnist.compile_config(ROWS["MSFP PTQ"], args, 1)
    assert ptq.finetune is None and ptq.quant.scheme == "msfp" and ptq.calib.seed == 1
    assert (ptq.calib.num_samples, ptq.calib.num_steps) == (4, 5)
    lora = eval_mnist.compile_config(ROWS["INT4 + LoRA"], args, 2).finetune
    assert (lora.num_loras, lora.dfa, lora.rank, lora.steps, lora.seed) == (1, False, 3, 7, 2)
    full = eval_mnist.compile_config(ROWS["MSFP + TALoRA + DFA"], args, 0).finetune
    assert (full.num_loras, full.dfa, full.batch_size, full.lr, full.sampler_steps) == (2, True, 6, 2e-3, 10)
    assert full.learn_act_scales and full.time_budget_s == 90.0 and full.lora_8bit is True
    # the tables' rows ran with the 8-bit layers frozen: the tools keep that unless --lora-8bit (library: LoRAs on)
    assert eval_mnist.build_parser().parse_args([]).lora_8bit is False
    assert (full.holdout_samples, full.trajectories, full.samples) == (5, "mixed", 8)
    assert eval_mnist.compile_config(ROWS["MSFP + TALoRA"], args, 0).finetune.dfa is False


def test_keep_8bit_patterns_reach_the_config_and_the_library_expands_them() -> None:
    """--keep-8bit "first,last,*.conv_shortcut" goes into QuantConfig.keep_8bit as given (the library expands the
    patterns over layer paths), with --float-attention leaving attention operands in float; a pattern matching no
    layer is a one-line --keep-8bit error, exit code 2, before any task starts."""
    import torch.nn as nn

    from msfp_compiler.compile import check_layer_names
    from msfp_compiler.errors import MsfpError

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(2, 2, 3)
            self.conv_shortcut = nn.Conv2d(4, 2, 1)

    unet = nn.Module()
    unet.conv_in = nn.Conv2d(1, 2, 3)
    unet.up_blocks = nn.ModuleList([Block(), Block()])
    args = eval_mnist.build_parser().parse_args(["--keep-8bit", "first, *.conv_shortcut,first", "--float-attention"])
    cfg = eval_mnist.compile_config(eval_mnist.ROWS["MSFP PTQ"], args, 0)
    assert cfg.quant.keep_8bit == ("first", "*.conv_shortcut")
    assert cfg.quant.quantize_attention is False
    check_layer_names(unet, cfg.quant.keep_8bit)  # matches up_blocks.{0,1}.conv_shortcut
    with pytest.raises(MsfpError, match=r"QuantConfig.keep_8bit: unknown layer '\*\.nope'"):
        check_layer_names(unet, eval_mnist.keep_8bit_names("first,*.nope"))
    default = eval_mnist.compile_config(eval_mnist.ROWS["MSFP PTQ"], eval_mnist.build_parser().parse_args([]), 0)
    assert default.quant.keep_8bit == ("first", "last") and default.quant.quantize_attention is True


def test_keep_8bit_matching_nothing_exits_2_naming_the_flag(capsys, tmp_path) -> None:
    rc = eval_mnist.main(["--models", "uncond", "--keep-8bit", "first,*.nope", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("eval_mnist: --keep-8bit: unknown layer '*.nope'") and "QuantConfig" not in err
    assert not (tmp_path / "o").exists()


def test_a_gpu_list_naming_a_gpu_twice_exits_2_before_any_task(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,0")  # hides every GPU from CUDA: call 11's lost command
    assert eval_mnist.main(["--models", "uncond", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("eval_mnist: CUDA_VISIBLE_DEVICES=0,1,0 names a GPU twice")
    assert not (tmp_path / "o").exists()


def test_merge_writes_the_table_json_where_told(tmp_path) -> None:
    """--table: the merged JSON goes there (results/quality_mnist.json, the one copy); the markdown stays in OUT."""
    import json

    out = tmp_path / "run"
    out.mkdir()
    task = {"model": "uncond", "seed": 0, "row": "MSFP PTQ", "info": {"fid": 7.5, "compile_seconds": 1.0}}
    (out / "task_uncond_0_msfp_ptq.json").write_text(json.dumps(task))
    table = tmp_path / "quality_mnist.json"
    args = {k: v for k, v in vars(eval_mnist.build_parser().parse_args([])).items() if not isinstance(v, Path)}
    eval_mnist.merge(out, {**args, "seeds": [0]}, table)
    assert json.loads(table.read_text())["uncond"]["MSFP PTQ"]["fid"] == [7.5]
    assert not (out / "quality_mnist.json").exists() and "MSFP PTQ" in (out / "quality_mnist.md").read_text()


def test_table_heading_names_what_keep_8bit_left_out_of_w4a4() -> None:
    """A variant's table says which layers stayed at 8 bits (a W8A8 run must not read "W4A4, first/last conv")."""
    table = {"uncond": {"MSFP PTQ": {"fid": [7.5], "seeds": [0]}}}
    args = vars(eval_mnist.build_parser().parse_args([]))
    default = eval_mnist.markdown({**table, "settings": args})
    assert "(W4A4, first/last conv 8-bit, 5000 samples" in default
    variant = eval_mnist.markdown({**table, "settings": {**args, "keep_8bit": "first,last,up_blocks.3.*",
                                                         "float_attention": True}})
    assert "(W4A4 except 8-bit first,last,up_blocks.3.*, attention operands in float, 5000" in variant
    lora = eval_mnist.markdown({**table, "settings": {**args, "keep_8bit": "*", "lora_8bit": True}})
    assert "(W8A8, every layer 8-bit, LoRAs on the 8-bit layers too, 5000" in lora
    for keep, scope in (("*", "W8A8, every layer 8-bit"), ("", "W4A4, every layer")):
        assert f"({scope}, 5000 samples" in eval_mnist.markdown({**table, "settings": {**args, "keep_8bit": keep}})


def test_more_samples_than_the_tables_also_scores_the_first_half(monkeypatch, tmp_path) -> None:
    """Above HALF samples a task also reports the FID of its first HALF (comparable with the 2500-sample tables); the
    sampler gets the model's scheduler config, without x0 clipping under --no-clip-sample."""
    import argparse
    import types

    import torch

    monkeypatch.setattr(eval_mnist, "HALF", 4)
    real = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # not the 5000 digits: fast
    monkeypatch.setattr(eval_mnist, "load_mnist_images", lambda size: (real, torch.arange(32) % 10))
    configs: list = []

    def ddim(eps, n, steps, seed, cond, scheduler_config, *rest):
        configs.append(scheduler_config)
        return torch.rand(n, 1, 32, 32) * 2 - 1  # the scoring is tested, not the sampler

    monkeypatch.setattr(eval_mnist, "ddim", ddim)
    model_cfg = {"clip_sample": True, "num_train_timesteps": 1000}
    loaded = types.SimpleNamespace(class_embedding=None, scheduler_config=model_cfg)  # an unconditional model
    sig = types.SimpleNamespace(in_channels=1, sample_size=32)
    args = argparse.Namespace(samples=8, steps=1, batch=8, gpu_slots=0, out=tmp_path, classifier=eval_mnist.CLASSIFIER,
                              no_clip_sample=False)
    info: dict = {}
    eval_mnist._sample_and_score(None, loaded, sig, args, 0, torch.device("cpu"), info)
    assert set(info) >= {"fid", "fid_first_4"} and info["fid"] != info["fid_first_4"]
    args.samples, args.no_clip_sample = 4, True
    info = {}
    eval_mnist._sample_and_score(None, loaded, sig, args, 0, torch.device("cpu"), info)
    assert "fid_first_4" not in info
    # the sampler got the model's config, then (--no-clip-sample) the same without x0 clipping
    assert configs == [model_cfg, {"clip_sample": False, "num_train_timesteps": 1000}]


def test_no_clip_sample_turns_off_only_the_x0_clipping() -> None:
    """--no-clip-sample (both table tools): the evaluation sampler's config keeps every other field and stops
    clipping x0; a prediction pushing x0 far below -1 then leaves the DDIM step unclipped. Without the flag the model's
    config object itself is used."""
    import argparse
    import types

    import torch

    from msfp_compiler.sampling import make_scheduler
    from quality_rows import sampler_config

    model_cfg = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000,
                 "clip_sample": True}
    loaded = types.SimpleNamespace(scheduler_config=model_cfg)
    assert sampler_config(loaded, argparse.Namespace(no_clip_sample=False)) is model_cfg
    off = sampler_config(loaded, argparse.Namespace(no_clip_sample=True))
    assert off == {**model_cfg, "clip_sample": False} and model_cfg["clip_sample"] is True
    assert sampler_config(types.SimpleNamespace(scheduler_config=None),
                          argparse.Namespace(no_clip_sample=True)) == {"clip_sample": False}
    x, eps = torch.full((1, 1, 2, 2), -0.5), torch.full((1, 1, 2, 2), 3.0)  # x0 = (x - sqrt(1-a) eps) / sqrt(a) << -1
    outs = []
    for cfg in (model_cfg, off):
        sched = make_scheduler("ddim", cfg)
        sched.set_timesteps(50)
        outs.append(sched.step(eps, 500, x).prev_sample)
    assert float(outs[1].max()) < float(outs[0].min()) - 0.1  # the unclipped step goes further below
