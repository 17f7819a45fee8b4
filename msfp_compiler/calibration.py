"""Calibration: (x_t, t, cond) inputs recorded along FP sampler trajectories, grouped by timestep, and the
activation statistics of the quantized operands on them.

The FP UNet is run with a diffusers scheduler (DDIM by default, or the scheduler config shipped in the model
folder) for N steps on M noise samples. Every step's UNet input is kept; steps are grouped into timestep buckets so
statistics and the format search see every part of the trajectory, not only the last steps.

Statistics (per activation and timestep group: min, max, negative count and a bounded random subsample for the
format search) are streamed as the values appear, so memory is bounded by ``sample_per_group`` values per tensor
and group whatever the calibration size. When ``collect`` is given the captured graph, the trajectories run through
it and the statistics come from the same forwards (one FP forward per sample and step in all); otherwise
``activation_stats`` runs the graph over the recorded inputs once more. Both give the same numbers: the captured
graph computes what the eager UNet computes, and the subsample draws the same random indices in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .capture import UNetSignature, UNetWrapper
from .errors import MsfpError
from .layer_graph import quant_operands
from .progress import Progress
from .record import GroupStats
from .sampling import make_scheduler, sample

__all__ = ["CalibBatch", "TimestepGroup", "CalibrationSet", "ActivationStats", "collect", "activation_stats",
           "stats_nodes", "make_cond", "CALIB_BUDGET", "default_calibration"]

# The default calibration size scales with the model: samples x steps x parameters <= CALIB_BUDGET. Every UNet up to
# 150M parameters (the digit models, a CIFAR-10 DDPM) gets the full 8 samples x 10 steps; larger ones keep 2 samples
# and as many steps as fit, but never fewer steps than timestep groups. SD1.5 (860M): 2 x 6. The cost of calibration
# and of the statistics pass is one FP forward per sample and step, so this bounds both (results/bench_compile.json,
# row sd15-defaults).
CALIB_BUDGET = 8 * 10 * 150e6
DEFAULT_SAMPLES, DEFAULT_STEPS, MIN_SAMPLES = 8, 10, 2


@dataclass
class CalibBatch:
    sample: torch.Tensor
    timestep: torch.Tensor
    cond: torch.Tensor | None = None
    output: torch.Tensor | None = None  # the FP prediction at this input (collect(keep_outputs=True)): the teacher

    @property
    def args(self) -> tuple:
        return (self.sample, self.timestep) + ((self.cond,) if self.cond is not None else ())


@dataclass
class TimestepGroup:
    t_lo: int
    t_hi: int
    batches: list[CalibBatch] = field(default_factory=list)


@dataclass
class ActivationStats:
    """Per timestep group statistics of the graph's quantized activations, by fx node name (of the graph they were
    computed on), and the subsample size and seed they were computed with."""

    groups: dict[str, list[GroupStats]]
    sample_per_group: int
    seed: int


@dataclass
class CalibrationSet:
    groups: list[TimestepGroup]
    holdout: list[CalibBatch] = field(default_factory=list)  # same trajectories' distribution, unseen by the search
    stats: ActivationStats | None = None  # filled by collect(graph=...) from the calibration forwards themselves

    @property
    def batches(self) -> list[CalibBatch]:
        return [b for g in self.groups for b in g.batches]


def stats_nodes(gm: fx.GraphModule, attention: bool = True, split_concat: bool = True) -> list[fx.Node]:
    """The nodes whose values get statistics: producers of the activations layers read as quantized operands
    (``attention=False``: not the q, k, v of attention, QuantConfig.quantize_attention; ``split_concat``: the
    parts of a concatenation feeding a conv, QuantConfig.split_concat)."""
    return [q.producer for q in quant_operands(gm, attention, split_concat) if q.role == "act"]


def _update(g: GroupStats, v: torch.Tensor, k: int, gen: torch.Generator, name: str) -> None:
    # Two passes over the activation: aminmax (NaN propagates into it, Inf shows as the min or max, so it doubles
    # as the finiteness check) and count_nonzero. isfinite().all() and (x < 0).sum() cost ~10x more on CPU,
    # which made these statistics ~40% of the statistics forward on SD1.5.
    flat = v.reshape(-1).float()
    lo, hi = (float(t) for t in torch.aminmax(flat))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MsfpError(f"node {name}: non-finite activation during calibration (timesteps {g.t_lo}..{g.t_hi})")
    g.count += flat.numel()
    g.min = min(g.min, lo)
    g.max = max(g.max, hi)
    g.negatives += 0 if lo >= 0 else flat.numel() if hi < 0 else int(torch.count_nonzero(flat < 0))
    pick = flat if flat.numel() <= k else flat[torch.randint(0, flat.numel(), (k,), generator=gen)]
    g.sample = pick.clone() if g.sample is None else torch.cat([g.sample, pick])


class _StatsInterpreter(fx.Interpreter):
    """Runs the graph and streams the watched nodes' values into their GroupStats of the current group."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node], sample_per_group: int, seed: int):
        super().__init__(gm)
        self.stats = ActivationStats({n.name: [] for n in nodes}, sample_per_group, seed)
        self.watched = {n: self.stats.groups[n.name] for n in nodes}
        self.gen = torch.Generator().manual_seed(seed)
        self.per_batch = 1

    def start_group(self, t_lo: int, t_hi: int, num_batches: int) -> None:
        for groups in self.watched.values():
            groups.append(GroupStats(t_lo, t_hi))
        self.per_batch = max(1, self.stats.sample_per_group // max(num_batches, 1))

    def run(self, *args):
        try:
            return super().run(*args)
        except MsfpError as e:  # the Interpreter appends the node and its stack trace: a user error stays one line
            raise MsfpError(str(e).splitlines()[0]) from e

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        groups = self.watched.get(n)
        if groups is not None:
            _update(groups[-1], out.detach(), self.per_batch, self.gen, n.name)
        return out


@torch.no_grad()
def activation_stats(gm: fx.GraphModule, calib: CalibrationSet, sample_per_group: int = 4096, seed: int = 0,
                     attention: bool = True, progress: bool | None = None,
                     split_concat: bool = True) -> ActivationStats:
    """Statistics of ``stats_nodes(gm)`` over the recorded calibration inputs (one more forward per batch; collect
    with ``graph=gm`` gets them from the calibration forwards instead)."""
    interp = _StatsInterpreter(gm, stats_nodes(gm, attention, split_concat), sample_per_group, seed)
    with Progress(len(calib.batches), "activation statistics", progress, unit="batches") as bar:
        for grp in calib.groups:
            interp.start_group(grp.t_lo, grp.t_hi, len(grp.batches))
            for b in grp.batches:
                interp.run(*b.args)
                bar.update()
    return interp.stats


def make_cond(sig: UNetSignature, n: int, generator: torch.Generator, class_embedding: torch.Tensor | None = None):
    """Conditioning for calibration: class-embedding rows when the model ships a table, random labels or states."""
    if sig.cond is None:
        return None
    if sig.cond == "class_labels":
        return torch.randint(0, max(sig.num_classes, 1), (n,), generator=generator)
    if class_embedding is not None:
        labels = torch.randint(0, min(10, class_embedding.shape[0]), (n,), generator=generator)
        return class_embedding[labels].unsqueeze(1).float()
    return torch.randn(n, sig.cond_len, sig.cond_dim, generator=generator)


def default_calibration(num_params: int, num_groups: int = 4, samples: int | None = None,
                        steps: int | None = None) -> tuple[int, int, int, str]:
    """(samples, steps, groups, the rule in words) for a model of ``num_params`` parameters; ``samples`` / ``steps``
    given by the user are kept as they are. See CALIB_BUDGET."""
    fits = int(CALIB_BUDGET // max(num_params, 1))  # sample-steps the budget allows
    given = samples is not None, steps is not None
    if not any(given) and DEFAULT_SAMPLES * DEFAULT_STEPS <= fits:
        limit = CALIB_BUDGET / (DEFAULT_SAMPLES * DEFAULT_STEPS) / 1e6
        return (DEFAULT_SAMPLES, DEFAULT_STEPS, num_groups,
                f"the default for models up to {limit:.0f}M parameters; this one has {num_params / 1e6:.1f}M")
    if samples is None:
        samples = DEFAULT_SAMPLES if steps is None else max(MIN_SAMPLES, min(DEFAULT_SAMPLES, fits // steps))
        if steps is None:
            samples = max(MIN_SAMPLES, min(DEFAULT_SAMPLES, fits // DEFAULT_STEPS))
    if steps is None:
        steps = max(num_groups, min(DEFAULT_STEPS, fits // samples))
    groups = min(num_groups, steps)
    if all(given):
        rule = "as given"
    else:
        rule = (f"{'samples' if not given[0] else ''}{' and ' if not any(given) else ''}"
                f"{'steps' if not given[1] else ''} scaled to the model: samples x steps x parameters <= "
                f"{CALIB_BUDGET:.2g} ({num_params / 1e6:.0f}M parameters)")
    return samples, steps, groups, rule


def _draw(sig: UNetSignature, n: int, g: torch.Generator, class_embedding: torch.Tensor | None) -> tuple:
    """Starting noise and conditioning of ``n`` trajectories."""
    x = torch.randn(n, sig.in_channels, sig.sample_size, sig.sample_size, generator=g)
    return x, make_cond(sig, n, g, class_embedding)


def _timestep_groups(scheduler, num_steps: int, num_groups: int) -> tuple[list[int], list[int]]:
    """The sampler's timesteps and the step indices where the timestep groups start (and the end): near-equal runs
    of consecutive steps (DDIM and DDPM make one forward per step)."""
    scheduler.set_timesteps(num_steps)
    bounds = torch.linspace(0, num_steps, max(1, min(num_groups, num_steps)) + 1).round().long().tolist()
    return [int(t) for t in scheduler.timesteps], bounds


@torch.no_grad()
def collect(unet: torch.nn.Module, sig: UNetSignature, num_samples: int = 8, num_steps: int = 10, seed: int = 0,
            scheduler=None, num_groups: int = 4, holdout_samples: int = 2,
            class_embedding: torch.Tensor | None = None, progress: bool | None = None,
            graph: fx.GraphModule | None = None, sample_per_group: int = 4096, stats_seed: int = 0,
            attention: bool = True, split_concat: bool = True, keep_outputs: bool = False,
            holdout_seed: int | None = None) -> CalibrationSet:
    """Run the FP model along sampler trajectories and keep every step's inputs, grouped by timestep.

    With ``graph`` (the captured UNet, on the model's device) the calibration trajectories run through the graph
    and their forwards also stream the activation statistics into ``CalibrationSet.stats`` (the numbers
    ``activation_stats(graph, calib, sample_per_group, stats_seed)`` gives, without a forward of their own).
    With ``keep_outputs`` every batch also keeps the FP prediction it produced (distillation's teacher targets, which
    would otherwise cost a second pass over every trajectory). With ``holdout_seed`` the held-out samples come from a
    generator of their own, so they are the same whatever ``num_samples`` is."""
    if num_samples < 1 or num_steps < 1:
        raise MsfpError(f"CalibConfig.num_samples and CalibConfig.num_steps must be >= 1 (got {num_samples}, {num_steps})")
    scheduler = scheduler or make_scheduler()
    g = torch.Generator().manual_seed(seed)
    model = UNetWrapper(unet, sig).eval()
    timesteps, bounds = _timestep_groups(scheduler, num_steps, num_groups)
    starts = {a: (min(timesteps[a:b]), max(timesteps[a:b]), b - a) for a, b in zip(bounds[:-1], bounds[1:])}
    stats = (_StatsInterpreter(graph, stats_nodes(graph, attention, split_concat), sample_per_group, stats_seed)
             if graph is not None else None)
    total = num_samples + holdout_samples
    # The calibration samples are drawn first and the held-out ones after them, and the two sets run as separate
    # batches (a batch's float results depend on its size), so the calibration data and the compiled model do not
    # depend on how many samples are held out (msfp-compile holds out only for --check).
    x, cond = _draw(sig, num_samples, g, class_embedding)
    gh = g if holdout_seed is None else torch.Generator().manual_seed(holdout_seed)
    xh, ch = _draw(sig, holdout_samples, gh, class_embedding) if holdout_samples else (None, None)
    # Drawn on the CPU, run on the model's device: a CPU and a GPU calibration start from the same numbers.
    device = next(unet.parameters()).device
    steps: list[CalibBatch] = []
    holdout: list[CalibBatch] = []

    def run(x0: torch.Tensor, c0: torch.Tensor | None, keep: list[CalibBatch], bar: Progress,
            watch: _StatsInterpreter | None) -> None:
        x0 = x0.to(device)
        c0 = c0.to(device) if c0 is not None else None

        def eps_fn(inp: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            """The FP prediction, keeping every step's input (and, watched, streaming its statistics)."""
            if watch is None:
                eps = model(inp, tt, c0)
            else:
                if len(keep) in starts:
                    watch.start_group(*starts[len(keep)])
                eps = watch.run(inp, tt, *(() if c0 is None else (c0,)))
            if not torch.isfinite(eps).all():
                raise MsfpError(f"non-finite noise prediction during calibration at timestep {int(tt[0])} "
                                "(check the weights)")
            keep.append(CalibBatch(inp.clone(), tt, c0, eps if keep_outputs else None))
            return eps

        sample(eps_fn, x0, scheduler, num_steps, on_step=bar.update)

    what = f"calibration ({total} samples x {num_steps} steps{' + activation statistics' if graph is not None else ''})"
    with Progress(num_steps * (2 if holdout_samples else 1), what, progress, unit="steps") as bar:
        run(x, cond, steps, bar, stats)
        if holdout_samples:
            run(xh, ch, holdout, bar, None)
    if [int(b.timestep[0]) for b in steps] != timesteps:
        raise RuntimeError(f"{type(scheduler).__name__}: the forwards did not follow its {num_steps} timesteps")
    groups = [TimestepGroup(*starts[a][:2], steps[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return CalibrationSet(groups, holdout, stats.stats if stats is not None else None)
