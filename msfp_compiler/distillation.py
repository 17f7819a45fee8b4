"""Distillation: the fine-tuning stage that trains TALoRA (and optionally activation scales) on the quantized graph.

Data-free: trajectories of the FP model (x_t, t, cond) along the sampler; teacher = FP noise prediction at the same
input (as EfficientDM). Batches share one timestep, as in sampling, so the router makes one choice per batch. The
loss at step t is weighted by DFA's gamma_t. Adam, cosine learning-rate decay. This is a stage that ``compile``
runs between insert_qdq and fuse_talora, not a graph pass: it trains, shows progress and writes checkpoints.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet
from .capture import UNetSignature, UNetWrapper
from .config import FinetuneConfig
from .dfa import dfa_weights
from .ops import QUANTIZE
from .progress import Progress
from .record import record_of
from .talora import ROUTER_NAME, attach_talora, router_table, warm_start_router

__all__ = ["finetune", "FinetuneResult", "save_state"]

log = logging.getLogger("msfp")


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0
    table: torch.Tensor | None = None
    gammas: dict[int, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the interval)

    def log_info(self, cfg: FinetuneConfig) -> dict:
        """Facts for the pass log (JSON-able)."""
        return {"steps": cfg.steps, "num_loras": cfg.num_loras, "rank": cfg.rank, "dfa": cfg.dfa,
                "initial_loss": round(self.initial_loss, 6), "final_loss": round(self.final_loss, 6),
                "train_seconds": round(self.seconds, 2), "steps_per_s": round(cfg.steps / max(self.seconds, 1e-9), 2),
                "loss_curve": [[s, round(v, 6)] for s, v in self.curve]}

    def log_report(self) -> list[str]:
        """Readable lines for passes.log: the loss before/after and a sample of gamma_t."""
        report = [f"distillation loss (DFA-weighted probe) {self.initial_loss:.5f} -> {self.final_loss:.5f}"]
        if self.gammas:
            ts = sorted(self.gammas)
            report.append("gamma_t: " + " ".join(f"{t}:{self.gammas[t]:.2f}" for t in ts[:: max(1, len(ts) // 10)]))
        return report


@torch.no_grad()
def _teacher_data(teacher: nn.Module, sig: UNetSignature, data: CalibrationSet):
    model = UNetWrapper(teacher, sig).eval()
    return [(b, model(*b.args)) for b in data.batches]


def _eval_loss(gm, items, gammas) -> float:
    with torch.no_grad():
        tot = 0.0
        for b, y in items:
            tot += gammas.get(int(b.timestep[0]), 1.0) * float((gm(*b.args) - y).pow(2).mean())
        return tot / len(items)


def finetune(gm: fx.GraphModule, teacher: nn.Module, sig: UNetSignature, data: CalibrationSet,
             cfg: FinetuneConfig, scheduler, progress: bool | None = None) -> FinetuneResult:
    """Distill the FP model into the quantized graph with (TA)LoRA and optional DFA; modifies gm in place."""
    attach_talora(gm, cfg)
    torch.manual_seed(cfg.seed)
    if hasattr(gm, ROUTER_NAME):
        warm_start_router(gm.get_submodule(ROUTER_NAME), cfg.num_loras,
                           scheduler.config.num_train_timesteps)
    gammas = dfa_weights(scheduler, cfg.sampler_steps, cfg.sampler) if cfg.dfa else {}
    return _train(gm, teacher, sig, data, cfg, gammas, progress)


def _train(gm, teacher, sig, data, cfg, gammas, progress) -> FinetuneResult:
    for p in gm.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in gm.named_parameters() if n.startswith("talora_") and not n.startswith(ROUTER_NAME)]
    router = [p for n, p in gm.named_parameters() if n.startswith(ROUTER_NAME)]
    groups = [{"params": lora, "lr": cfg.lr}]
    if router:
        groups.append({"params": router, "lr": cfg.router_lr})
    if cfg.learn_act_scales:
        scales = _make_act_scales_learnable(gm)
        groups.append({"params": scales, "lr": cfg.lr * 0.1})
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    items = _teacher_data(teacher, sig, data)
    probe = items[:: max(1, len(items) // 8)]
    res = FinetuneResult(gammas=gammas)
    res.initial_loss = _eval_loss(gm, probe, gammas)
    gen = torch.Generator().manual_seed(cfg.seed)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(cfg.steps), desc="finetune", disable=not show, leave=False)
    t0 = tick = time.perf_counter()
    for step in bar:
        b, y = items[int(torch.randint(len(items), (1,), generator=gen))]
        n = b.sample.shape[0]
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        args = tuple(a[idx] for a in b.args)
        w = gammas.get(int(b.timestep[0]), 1.0)
        loss = w * (gm(*args) - y[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        res.losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(res.losses[-10:]) / len(res.losses[-10:]):.4g}")
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            # A line per interval whatever the terminal (tqdm draws only on a TTY), so GPU runs are logged too.
            n_int = (step + 1) - (res.curve[-1][0] if res.curve else 0)
            mean = sum(res.losses[-n_int:]) / n_int
            now = time.perf_counter()
            res.curve.append((step + 1, mean))
            log.info("finetune step %d/%d  loss %.5g  %.1f steps/s", step + 1, cfg.steps, mean, n_int / (now - tick))
            tick = now
        if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_state(gm, cfg.checkpoint)
    bar.close()
    for p in gm.parameters():
        p.requires_grad_(False)
    res.seconds = time.perf_counter() - t0
    res.final_loss = _eval_loss(gm, probe, gammas)
    res.table = router_table(gm)
    if cfg.checkpoint:
        save_state(gm, cfg.checkpoint)
    return res


def _make_act_scales_learnable(gm: fx.GraphModule) -> list[nn.Parameter]:
    """Turn activation-quantizer scale buffers into parameters (LSQ-style learned step size)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == QUANTIZE:
            rec = record_of(n.args[0])
            s = n.args[1]
            if rec is not None and rec.role == "act" and s.op == "get_attr" and s.target in dict(gm.named_buffers()):
                val = gm.get_buffer(s.target)
                delattr(gm, s.target)
                p = nn.Parameter(val.clone())
                gm.register_parameter(s.target, p)
                out.append(p)
    return out


def save_state(gm: fx.GraphModule, path: str) -> None:
    """LoRA + router (+ learned scales) tensors as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in gm.named_parameters() if p.requires_grad or "talora" in n}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
