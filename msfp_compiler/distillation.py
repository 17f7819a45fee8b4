"""Distillation: the fine-tuning stage that trains TALoRA (and optionally activation scales) on the quantized graph.

Data-free: trajectories of the FP model (x_t, t, cond) along the sampler -- or, with FinetuneConfig.trajectories,
the quantized graph's own, or both; teacher = FP noise prediction at the same input (as EfficientDM). Batches share
one timestep, as in sampling, so the router makes one choice per batch. The loss at step t is weighted by DFA's
gamma_t. Adam, cosine learning-rate decay (its length optionally fitted to a time budget). Every step's batch is
drawn up front and the step runs on static input buffers, so on CUDA it is captured once as a CUDA graph and replayed
(the fake-quantized graph is thousands of small kernels a step: eager, Python and launch overhead bounded it to ~3
steps/s). This is a stage that ``compile`` runs between insert_qdq and fuse_talora, not a graph pass: it trains,
shows progress and writes checkpoints.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibBatch, CalibrationSet
from .capture import UNetSignature, UNetWrapper
from .config import FinetuneConfig
from .dfa import dfa_weights
from .ops import QUANTIZE
from .progress import Progress
from .record import record_of
from .sampling import sample
from .talora import ROUTER_NAME, attach_talora, router_table, warm_start_router

__all__ = ["finetune", "FinetuneResult", "save_state", "default_finetune_samples", "FINETUNE_BUDGET"]

log = logging.getLogger("msfp")

# msfp-compile's default number of distillation trajectories scales with the model: samples x sampler steps x
# parameters x (pixels / 32^2) <= FINETUNE_BUDGET, between 32 and 256 (the trajectories run as one batch: the pixel
# factor bounds its memory). Each trajectory costs one FP forward per sampler step. More trajectories generalize
# better: they shrink mnist-cond's held-out gap and gave a lower FID on 9 of 12 paired seeds (digits 32 -> 256, MNIST
# 128 -> 4096 / 2048), each model's difference a tie (results/quality_mnist.md, sessions 20-21). The MNIST UNets
# (6M parameters, 50 steps) get 256; SD1.5 (860M) keeps 32.
FINETUNE_BUDGET = 256 * 50 * 6.25e6
MIN_FT_SAMPLES, MAX_FT_SAMPLES = 32, 256


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0
    table: torch.Tensor | None = None
    gammas: dict[int, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the interval)
    cuda_graph: bool = False  # the steps after the warm-up replayed one captured CUDA graph
    steps: int = 0  # steps run (less than FinetuneConfig.steps when its time budget cut the schedule)
    holdout_initial_loss: float | None = None  # the same loss on FinetuneConfig.holdout_samples unseen trajectories
    holdout_final_loss: float | None = None

    def log_info(self, cfg: FinetuneConfig) -> dict:
        """Facts for the pass log (JSON-able)."""
        return {"steps": self.steps, "max_steps": cfg.steps, "num_loras": cfg.num_loras, "rank": cfg.rank,
                "dfa": cfg.dfa,
                "initial_loss": round(self.initial_loss, 6), "final_loss": round(self.final_loss, 6),
                "train_seconds": round(self.seconds, 2), "steps_per_s": round(self.steps / max(self.seconds, 1e-9), 2),
                "batch_size": cfg.batch_size, "cuda_graph": self.cuda_graph, "learn_act_scales": cfg.learn_act_scales,
                "samples": cfg.samples, **({"samples_rule": cfg.note} if cfg.note else {}),
                "trajectories": cfg.trajectories,
                **({"holdout_samples": cfg.holdout_samples,
                    "holdout_initial_loss": _rounded(self.holdout_initial_loss),
                    "holdout_final_loss": _rounded(self.holdout_final_loss)} if cfg.holdout_samples else {}),
                "loss_curve": [[s, round(v, 6)] for s, v in self.curve]}

    def log_report(self) -> list[str]:
        """Readable lines for passes.log: the loss before/after and a sample of gamma_t."""
        report = [f"distillation loss (DFA-weighted probe) {self.initial_loss:.5f} -> {self.final_loss:.5f}"]
        if self.holdout_final_loss is not None:
            report.append(f"held-out trajectories {self.holdout_initial_loss:.5f} -> {self.holdout_final_loss:.5f}")
        if self.gammas:
            ts = sorted(self.gammas)
            report.append("gamma_t: " + " ".join(f"{t}:{self.gammas[t]:.2f}" for t in ts[:: max(1, len(ts) // 10)]))
        return report


@torch.no_grad()
def _teacher_data(teacher: nn.Module, sig: UNetSignature,
                  batches: list[CalibBatch]) -> list[tuple[CalibBatch, torch.Tensor]]:
    """(batch, FP prediction) pairs: the prediction collect kept, else one teacher forward."""
    model = UNetWrapper(teacher, sig).eval()
    return [(b, b.output if b.output is not None else model(*b.args)) for b in batches]


def default_finetune_samples(num_params: int, sampler_steps: int, sample_size: int = 32) -> tuple[int, str]:
    """(trajectories, the rule in words) for a model of ``num_params`` parameters whose inputs are
    ``sample_size`` x ``sample_size``. See FINETUNE_BUDGET."""
    fits = int(FINETUNE_BUDGET // max(num_params * sampler_steps * sample_size ** 2 / 32 ** 2, 1))
    n = max(MIN_FT_SAMPLES, min(MAX_FT_SAMPLES, fits))
    return n, (f"trajectories scaled to the model: samples x sampler steps x parameters x pixels / 32^2 <= "
               f"{FINETUNE_BUDGET:.2g}, {MIN_FT_SAMPLES}..{MAX_FT_SAMPLES} ({num_params / 1e6:.1f}M parameters, "
               f"{sample_size}x{sample_size}, {sampler_steps} steps)")


def _probe_steps(batches: list, span: int | None = None) -> list:
    """About 8 evenly spaced timesteps of the first ``span`` batches (all by default): the training probe and the
    held-out probe take the same ones."""
    span = len(batches) if span is None else span
    return batches[:span:max(1, span // 8)]


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


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
    own = _student_batches(gm, data, scheduler, cfg) if cfg.trajectories != "fp" else []
    fp = data.batches if cfg.trajectories != "student" else []
    # The probe strides over the FP trajectories when there are any (mixed: the same inputs as an fp run's probe)
    return _train(gm, teacher, sig, fp + own, len(fp) or len(own), data.holdout, cfg, gammas, progress)


@torch.no_grad()
def _student_batches(gm: fx.GraphModule, data: CalibrationSet, scheduler, cfg: FinetuneConfig) -> list[CalibBatch]:
    """The quantized graph's own trajectories (before fine-tuning) from the FP trajectories' starting noise: the
    inputs it meets when it samples, where its error has already moved x_t off the FP path. The teacher labels them
    (its prediction there), so training also covers the states the student drifts into, as DAgger does. (With DDPM
    the student's step noise is its own draw, so its path also differs by sampling, not only by its error.)"""
    first = data.batches[0]
    extra = () if first.cond is None else (first.cond,)
    out: list[CalibBatch] = []

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out.append(CalibBatch(x.clone(), t, first.cond))
        return gm(x, t, *extra)

    # DDIM and DDPM start from unscaled noise: the FP trajectories' first input is their starting point. The seed
    # differs from the FP trajectories' (cfg.seed + 1, compile._finetune), whose draws must not repeat here.
    sample(eps_fn, first.sample, scheduler, cfg.sampler_steps, generator=torch.Generator().manual_seed(cfg.seed + 2))
    return out


def _param_groups(gm: fx.GraphModule, cfg: FinetuneConfig) -> list[dict]:
    """LoRA, router and (optionally) learned activation scales as Adam groups; everything else frozen."""
    for p in gm.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in gm.named_parameters() if n.startswith("talora_") and not n.startswith(ROUTER_NAME)]
    router = [p for n, p in gm.named_parameters() if n.startswith(ROUTER_NAME)]
    groups = [{"params": lora, "lr": cfg.lr}]
    if router:
        groups.append({"params": router, "lr": cfg.router_lr})
    if cfg.learn_act_scales:
        groups.append({"params": _make_act_scales_learnable(gm), "lr": cfg.lr * cfg.act_scale_lr_factor})
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    return groups


def _batch_plan(items, cfg: FinetuneConfig, device) -> tuple[list[int], torch.Tensor]:
    """Every step's (trajectory batch, sample indices), drawn up front from the seeded generator: the data loop then
    runs on the device without a host round trip (the same draws, in the same order, as a per-step loop)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = items[0][0].sample.shape[0]
    picks, rows = [], []
    for _ in range(cfg.steps):
        picks.append(int(torch.randint(len(items), (1,), generator=gen)))
        rows.append(torch.randperm(n, generator=gen)[: cfg.batch_size])
    return picks, torch.stack(rows).to(device)


class _StepRunner:
    """One distillation step on static input buffers (copy a batch in, forward, backward, Adam), so that on CUDA the
    whole step can be captured once as a CUDA graph and replayed: the quantized fx graph launches thousands of tiny
    kernels a step (each fake quantizer is a dozen elementwise ops, forward and backward), and their Python and
    launch overhead, not GPU work, bounded eager fine-tuning to a few steps/s."""

    def __init__(self, gm, items, gammas, opt, rows: torch.Tensor):
        self.gm, self.items, self.opt, self.rows = gm, items, opt, rows
        b, y = items[0]
        m = rows.shape[1]
        self.args = [a[:m].clone() for a in b.args]
        self.y = y[:m].clone()
        self.w = torch.ones((), device=y.device)
        self.weights = [gammas.get(int(b.timestep[0]), 1.0) for b, _ in items]  # host floats: no sync a step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None

    def load(self, pick: int, step: int) -> None:
        b, y = self.items[pick]
        idx = self.rows[step]
        for dst, src in zip(self.args, b.args):
            dst.copy_(src.index_select(0, idx))
        self.y.copy_(y.index_select(0, idx))
        self.w.fill_(self.weights[pick])

    def _step(self) -> torch.Tensor:
        loss = self.w * (self.gm(*self.args) - self.y).pow(2).mean()
        loss.backward()
        self.opt.step()
        return loss.detach()

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        self.opt.zero_grad(set_to_none=True)
        return self._step()

    def capture(self) -> None:
        """Record the step as a CUDA graph (after eager warm-up steps: Adam's state and cuDNN's choices exist)."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        try:
            with torch.cuda.graph(graph):
                self.loss = self._step()
        except RuntimeError as e:  # something in the graph syncs with the host: train eagerly, slower but right
            log.warning("finetune: CUDA graph capture failed, eager steps instead: %s", str(e).splitlines()[0])
            self.opt.zero_grad(set_to_none=True)
            return
        self.graph = graph


def _set_lr(opt: torch.optim.Optimizer, base: list[float], step: int, total: int) -> None:
    """Cosine decay to 0 over ``total`` steps (CosineAnnealingLR's closed form); a tensor lr (CUDA graph) in place."""
    f = 0.5 * (1.0 + math.cos(math.pi * step / total))
    for grp, lr in zip(opt.param_groups, base):
        if isinstance(grp["lr"], torch.Tensor):
            grp["lr"].fill_(lr * f)
        else:
            grp["lr"] = lr * f


def _make_optimizer(groups: list[dict], graph: bool) -> torch.optim.Adam:
    if graph:  # a captured Adam step reads its step count and learning rate from device tensors
        dev = groups[0]["params"][0].device
        for grp in groups:
            grp["lr"] = torch.tensor(float(grp["lr"]), device=dev)
        return torch.optim.Adam(groups, capturable=True)
    return torch.optim.Adam(groups)


def _use_graph(cfg: FinetuneConfig, items, groups) -> bool:
    dev = groups[0]["params"][0].device if groups[0]["params"] else torch.device("cpu")
    same_n = len({b.sample.shape[0] for b, _ in items}) == 1
    return cfg.cuda_graph and dev.type == "cuda" and same_n and cfg.steps > _WARMUP_STEPS


_WARMUP_STEPS = 3  # eager steps before the capture (on a side stream, as torch.cuda.graphs asks)


def _fit_to_budget(cfg: FinetuneConfig, step: int, rate: float, left: float) -> int:
    """The step count that ends when cfg.time_budget_s does, at ``rate`` steps/s with ``left`` seconds left
    (at most cfg.steps; at least one more step while below it)."""
    return min(cfg.steps, max(step + 1, step + int(rate * left)))


def _train(gm: fx.GraphModule, teacher: nn.Module, sig: UNetSignature, batches: list[CalibBatch], probe_span: int,
           holdout: list[CalibBatch], cfg: FinetuneConfig, gammas: dict[int, float],
           progress: bool | None) -> FinetuneResult:
    """The training loop over ``batches`` (their first ``probe_span`` give the probe's timesteps)."""
    groups = _param_groups(gm, cfg)
    items = _teacher_data(teacher, sig, batches)
    # Held-out FP trajectories at the training probe's timesteps: with FP training inputs the two losses compare
    # directly (student-only training probes its own inputs).
    held = _teacher_data(teacher, sig, _probe_steps(holdout))
    graph = _use_graph(cfg, items, groups)
    base = [float(g["lr"]) for g in groups]
    opt = _make_optimizer(groups, graph)
    probe = _probe_steps(items, probe_span)
    res = FinetuneResult(gammas=gammas)
    res.initial_loss = _eval_loss(gm, probe, gammas)
    if held:
        res.holdout_initial_loss = _eval_loss(gm, held, gammas)
    picks, rows = _batch_plan(items, cfg, items[0][1].device)
    runner = _StepRunner(gm, items, gammas, opt, rows)
    hist = torch.zeros(cfg.steps, device=items[0][1].device)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.steps, desc="finetune", disable=not show, leave=False)
    side = torch.cuda.Stream() if graph else None
    t0 = tick = time.perf_counter()
    step, total = 0, cfg.steps
    while step < total:
        _set_lr(opt, base, step, total)
        runner.load(picks[step], step)
        if side is not None and step < _WARMUP_STEPS:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                hist[step] = runner.run()
            torch.cuda.current_stream().wait_stream(side)
            if step + 1 == _WARMUP_STEPS:
                runner.capture()
        else:
            hist[step] = runner.run()
        step += 1
        bar.update()
        if step == _WARMUP_STEPS:
            t_warm = time.perf_counter()
        elif cfg.time_budget_s and step % _BUDGET_EVERY == 0:
            # The cosine schedule's length follows the time budget at the rate measured so far (other processes
            # sharing the GPU change it); the sync makes the rate the device's, not the launch queue's.
            if graph:
                torch.cuda.synchronize()
            now = time.perf_counter()
            total = _fit_to_budget(cfg, step, (step - _WARMUP_STEPS) / (now - t_warm), cfg.time_budget_s - (now - t0))
        if cfg.log_every and (step % cfg.log_every == 0 or step == total):
            tick = _log_interval(res, hist, step, total, tick, bar)
        if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_state(gm, cfg.checkpoint)
    bar.close()
    res.losses = hist[:total].tolist()
    res.seconds = time.perf_counter() - t0
    res.steps = total
    res.cuda_graph = runner.graph is not None
    del runner
    _finish(gm, cfg, groups, res, probe, gammas)
    if held:
        res.holdout_final_loss = _eval_loss(gm, held, gammas)
    return res


def _log_interval(res: FinetuneResult, hist: torch.Tensor, step: int, total: int, tick: float, bar) -> float:
    """A loss-curve point and a progress line per interval whatever the terminal (tqdm draws only on a TTY), so GPU
    runs are logged too; with the budget fit, the only host syncs of the loop. Returns the new interval start."""
    lo = res.curve[-1][0] if res.curve else 0
    mean = float(hist[lo:step].mean())
    now = time.perf_counter()
    res.curve.append((step, mean))
    bar.set_postfix(loss=f"{mean:.4g}")
    log.info("finetune step %d/%d  loss %.5g  %.1f steps/s", step, total, mean, (step - lo) / (now - tick))
    return now


_BUDGET_EVERY = 25  # steps between fits of the schedule to FinetuneConfig.time_budget_s


def _finish(gm, cfg, groups, res, probe, gammas) -> None:
    """Freeze everything, the probe loss after training, the router table, the checkpoint."""
    for p in gm.parameters():
        p.requires_grad_(False)
        p.grad = None
    if cfg.learn_act_scales:
        _freeze_act_scales(gm, groups[-1]["params"])
    res.final_loss = _eval_loss(gm, probe, gammas)
    res.table = router_table(gm)
    if cfg.checkpoint:
        save_state(gm, cfg.checkpoint)


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


def _freeze_act_scales(gm: fx.GraphModule, scales: list[nn.Parameter]) -> None:
    """Learned activation scales back to buffers (what the lowering passes expect), kept positive."""
    learned = {id(p) for p in scales}
    for name, p in list(gm.named_parameters()):
        if id(p) in learned and "." not in name:
            delattr(gm, name)
            gm.register_buffer(name, p.detach().clamp_min(torch.finfo(torch.float32).tiny))


def save_state(gm: fx.GraphModule, path: str) -> None:
    """LoRA + router (+ learned scales) tensors as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in gm.named_parameters() if p.requires_grad or "talora" in n}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
