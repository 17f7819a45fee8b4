"""The rows of the W4A4 quality tables (digits on the CPU: eval_quality.py; MNIST on the GPU: eval_mnist.py).

One definition of what a row is (scheme, LoRA count, DFA), how it maps onto a CompileConfig, and which facts of a
compile the tables record, so the two evaluation tools cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from msfp_compiler.compile import CompiledModel
from msfp_compiler.config import TRAJECTORIES, CalibConfig, CompileConfig, FinetuneConfig, QuantConfig

__all__ = ["Row", "ROWS", "ALIASES", "row_config", "compile_facts", "slug", "parse_rows", "add_table_arguments",
           "args_row_config", "class_labels", "write_json", "sampler_config"]


@dataclass(frozen=True)
class Row:
    """One table row: a scheme, optionally with (TA)LoRA fine-tuning and DFA."""

    name: str
    scheme: str | None  # None = FP32
    num_loras: int = 0  # 0 = PTQ, 1 = LoRA, >1 = TALoRA
    dfa: bool = False


ROWS = {r.name: r for r in [
    Row("FP32", None),
    Row("INT4 PTQ", "int4"),
    Row("FP4 signed PTQ", "fp4-signed"),
    Row("MSFP PTQ", "msfp"),
    Row("INT4 + LoRA", "int4", 1),
    Row("MSFP + LoRA", "msfp", 1),
    Row("MSFP + TALoRA", "msfp", 2),
    Row("MSFP + TALoRA + DFA", "msfp", 2, True),
]}
ALIASES = {"fp32": "FP32", "int4": "INT4 PTQ", "fp4": "FP4 signed PTQ", "msfp": "MSFP PTQ",
           "int4+lora": "INT4 + LoRA", "msfp+lora": "MSFP + LoRA", "msfp+talora": "MSFP + TALoRA",
           "msfp+talora+dfa": "MSFP + TALoRA + DFA"}


def row_config(row: Row, *, seed: int, calib_samples: int, calib_steps: int, finetune_steps: int, lora_rank: int,
               finetune_samples: int, sampler_steps: int, device: str = "cpu", **finetune) -> CompileConfig:
    """The CompileConfig of a quantized row; ``finetune`` passes further FinetuneConfig fields (batch_size, lr,
    log_every, learn_act_scales)."""
    ft = None
    if row.num_loras:
        ft = FinetuneConfig(steps=finetune_steps, num_loras=row.num_loras, rank=lora_rank, dfa=row.dfa,
                            samples=finetune_samples, sampler_steps=sampler_steps, seed=seed, **finetune)
    return CompileConfig(quant=QuantConfig(scheme=row.scheme),
                         calib=CalibConfig(num_samples=calib_samples, num_steps=calib_steps, seed=seed),
                         finetune=ft, device=device)


def compile_facts(cm: CompiledModel) -> dict:
    """What the tables record about a compile: fine-tuning time, speed, losses and curve, the TALoRA table, and
    how many 4-bit activations got signed / unsigned formats."""
    info: dict = {}
    for run in cm.pass_runs:
        if run.name == "finetune":
            for k in ("steps", "train_seconds", "steps_per_s", "cuda_graph", "initial_loss", "final_loss",
                      "holdout_initial_loss", "holdout_final_loss", "loss_curve"):
                info[k] = run.info.get(k)
        if run.name == "fuse_talora" and "table" in run.info:
            info["talora_table"] = run.info["table"]
    acts = [s for s in cm.layers if s.role == "act" and s.bits == 4]
    info["unsigned_acts"] = sum(not s.signed for s in acts)
    info["signed_acts"] = sum(s.signed for s in acts)
    return info


def slug(name: str) -> str:
    """A row name as a file-name part: "MSFP + TALoRA + DFA" -> "msfp_talora_dfa"."""
    return name.lower().replace(" + ", "_").replace(" ", "_")


def parse_rows(spec: str) -> list[Row]:
    """A --rows value (aliases or full names, comma-separated) -> rows."""
    return [ROWS[ALIASES.get(r.strip().lower(), r.strip())] for r in spec.split(",") if r.strip()]


def add_table_arguments(p: argparse.ArgumentParser, *, samples: int, steps: int, calib_samples: int,
                        calib_steps: int, finetune_steps: int, finetune_samples: int, out: Path) -> None:
    """The options both table tools take: which models and rows, sampling, calibration and fine-tuning sizes."""
    p.add_argument("--models", default="uncond,cond")
    p.add_argument("--rows", default=",".join(ALIASES), help=f"subset of {','.join(ALIASES)}")
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--steps", type=int, default=steps, help="DDIM steps (also the DFA sampler)")
    p.add_argument("--calib-samples", type=int, default=calib_samples)
    p.add_argument("--calib-steps", type=int, default=calib_steps)
    p.add_argument("--finetune-steps", type=int, default=finetune_steps)
    p.add_argument("--finetune-samples", type=int, default=finetune_samples)
    p.add_argument("--finetune-trajectories", choices=TRAJECTORIES, default=FinetuneConfig.trajectories,
                   help="whose sampler trajectories fine-tuning trains on (FinetuneConfig.trajectories)")
    p.add_argument("--lora-rank", type=int, default=4,
                   help="LoRA rank (default 4: the tables' rows; the library's default is 32, measured as such)")
    p.add_argument("--lora-8bit", action="store_true",
                   help="LoRAs also on the --keep-8bit layers (the library's default since session 22; off here: "
                        "every table row before call 20 ran with its 8-bit layers frozen)")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--no-clip-sample", action="store_true",
                   help="sample every row (FP32 included) without clipping DDIM's predicted x0 to [-1, 1] (the "
                        "model folders' scheduler configs clip, as diffusers' DDIM does by default); calibration and "
                        "fine-tuning keep the model's clipping sampler")


def sampler_config(loaded, args: argparse.Namespace) -> dict | None:
    """The model's scheduler config for the evaluation sampler, with x0 clipping off under --no-clip-sample.
    Calibration and fine-tuning keep the model's own config."""
    if not args.no_clip_sample:
        return loaded.scheduler_config
    return {**(loaded.scheduler_config or {}), "clip_sample": False}


def args_row_config(row: Row, args: argparse.Namespace, seed: int, device: str = "cpu",
                    **finetune) -> CompileConfig:
    """row_config from the options of add_table_arguments."""
    return row_config(row, seed=seed, calib_samples=args.calib_samples, calib_steps=args.calib_steps,
                      finetune_steps=args.finetune_steps, lora_rank=args.lora_rank,
                      finetune_samples=args.finetune_samples, sampler_steps=args.steps, device=device,
                      trajectories=args.finetune_trajectories, lora_8bit=args.lora_8bit, **finetune)


def class_labels(loaded, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels 0..9 repeating over n samples, and their class-embedding conditioning (None: unconditional model)."""
    labels = torch.arange(n) % 10
    if loaded.class_embedding is None:
        return labels, None
    return labels, loaded.class_embedding[labels].unsqueeze(1).float()


def write_json(path: Path, obj, **dump) -> None:
    """JSON written atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, default=float, **dump))
    tmp.replace(path)
