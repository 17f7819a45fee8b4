#!/usr/bin/env python
"""Issue 12b: can a W4A4 lever remove the 4-bit activation noise of an MNIST UNet's last decoder block? (CPU study)

One MSFP PTQ compile (as tools/sensitivity_mnist.py: no zero-point folding, every quantizer a bypassable
``msfp.quantize`` node), then the 4-bit activation quantizers of the last, full-resolution decoder block (the 14 that
carry most of the W4A4 error) are replaced by each lever, keeping 4-bit values:

- ``nvfp4``: NVFP4-style dynamic block scales: E2M1 values, one scale per 16 consecutive channels at each position
  (sample, pixel), scale = block absmax / 6 rounded to E4M3 (3 mantissa bits; the per-tensor FP32 scale of NVFP4 is
  implicit in float);
- ``nvfp4-msfp``: the same blocks, but the layer keeps its MSFP format and zero point (signed e1m2/e2m1/e3m0 or
  unsigned ue2m2/ue3m1/ue4m0 with the calibrated zero point): block scale = (block max - z) / format max;
- ``mxfp4``: OCP MXFP4: E2M1, one power-of-two (E8M0) scale per 32 channels at each position;
- ``hadamard``: a block-diagonal Hadamard rotation (blocks of 32 channels, orthonormal) before the quantizer, one
  per-tensor MSFP quantizer searched on the rotated calibration values (same candidates and grids as
  select_format), the rotation folded back into the consumer's weight, whose 4-bit per-output-channel quantization
  is redone in the rotated basis (``Q_w(W H) H^T`` stands in for ``Q_w(W)``);
- ``a8``: reference, the block's activations at 8 bits (uint8, min/max of the calibration values), weights 4-bit;
- ``tstep:K``: timestep-dependent per-tensor parameters: the DDIM trajectory's timesteps in K contiguous groups
  (as calibration groups them), each group's scale and zero point searched (select_format's search, the layer's
  MSFP format kept) on calibration values of that group's steps only; at inference the quantizer reads the
  timestep input (a t -> group table, as TALoRA's fused router) and uses its group's parameters;
- options: ``:bN`` block size, ``:mse`` per-block clip search, ``:res`` a second NVFP4 term on the residual (two
  W4A4 GEMMs), ``@shortcut`` only the conv_shortcut inputs; ``recal`` (control) per-tensor MSFP re-searched;
- ``sr``: the compiled per-tensor MSFP quantizer (format, scale, zero point) with stochastic instead of
  round-to-nearest rounding: is the noise harmful because it repeats across the sampler's steps?

Measured as sensitivity_mnist does (PSNR of DDIM samples vs FP32 of the same noise, one-step eps rel-RMSE at five t)
for the whole model (W4A4 with the block's quantizers swapped) and for the block alone (only those quantizers), plus
the local relative error RMSE(q(x) - x) / RMS(x) of each quantizer at the probed t.

  nice -n 10 python tools/w4a4_levers_mnist.py --model uncond --samples 8 --levers hadamard,nvfp4-msfp,nvfp4,mxfp4,a8
(results/mnist/w4a4_levers.md)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import sensitivity_mnist as sens  # noqa: E402

import msfp_compiler.layer_graph as sens_lg  # noqa: E402
import msfp_compiler.search as sens_search  # noqa: E402
from msfp_compiler.calibration import _timestep_groups  # noqa: E402
from msfp_compiler.config import QuantConfig  # noqa: E402
from msfp_compiler.device import resolve_device  # noqa: E402
from msfp_compiler.formats import parse_format  # noqa: E402
from msfp_compiler.load import load_model  # noqa: E402
from msfp_compiler.talora import chosen_set  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = sens.build_parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--block", default=None, help="block whose 4-bit activation quantizers are swapped "
                   "(default: up_blocks.3 uncond, up_blocks.2 cond)")
    p.add_argument("--levers", default="nvfp4,nvfp4-msfp,mxfp4,hadamard,a8")
    p.add_argument("--all-acts", default="nvfp4-msfp", help="levers also measured on every 4-bit conv / linear "
                   "activation quantizer of the model (W4A4), not only the block's")
    p.add_argument("--md-from", type=Path, default=None, help="only rewrite the markdown of this result JSON")
    p.add_argument("--calib-seed", type=int, default=1, help="noise seed of the levers' own calibration runs")
    p.add_argument("--tstep-calib-steps", type=int, default=None, help="DDIM steps of the tstep levers' calibration "
                   "trajectories (default --steps: the inference trajectory, so tstep:50 is one group per step)")
    return p


# ---------------------------------------------------------------------------------------------------- the levers

def e4m3(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales to 3 mantissa bits (E4M3's precision, RNE; its range is left to the FP32 tensor scale)."""
    m, e = torch.frexp(s)
    return torch.ldexp(torch.round(m * 16) / 16, e)


def _blocks(x: torch.Tensor, dim: int, size: int) -> tuple[torch.Tensor, tuple]:
    """x with its channel dim split into (C / size, size) blocks; the block members are dim + 1."""
    dim = dim % x.dim()
    c = x.shape[dim]
    if c % size:
        raise ValueError(f"{c} channels are not a multiple of the block size {size}")
    return x.reshape(*x.shape[:dim], c // size, size, *x.shape[dim + 1:]), x.shape


class BlockQuant(torch.nn.Module):
    """Dynamic block-scaled 4-bit fake quantization along the channel dim (NVFP4 / MXFP4 style).

    ``kind``: "nvfp4" (E2M1, E4M3 scales), "nvfp4-msfp" (the layer's MSFP format and zero point, E4M3 scales) or
    "mxfp4" (E2M1, power-of-two scales, 32 channels); ``size``: channels per block; ``mse``: each block's scale is
    the best of a few clip ratios by the block's squared error (what a calibration-free encoder can afford)."""

    CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)

    def __init__(self, kind: str, fmt: str, zero_point: float, dim: int, size: int = 16, mse: bool = False):
        super().__init__()
        self.kind, self.fmt, self.z, self.dim = kind, parse_format(fmt), float(zero_point), dim
        self.size, self.mse = (32 if kind == "mxfp4" else size), mse

    def _q(self, xb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.z + self.fmt.round_to_grid((xb - self.z) / s) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb, shape = _blocks(x.float(), self.dim, self.size)
        d = (self.dim % x.dim()) + 1
        f, z = self.fmt, self.z
        if self.kind == "mxfp4":  # OCP MX: shared exponent floor(log2 amax) - emax(E2M1) = -2, values saturate at 6
            amax = xb.abs().amax(d, keepdim=True).clamp_min(2.0 ** -126)
            return self._q(xb, torch.exp2(torch.floor(torch.log2(amax)) - 2)).reshape(shape)
        top = xb.abs().amax(d, keepdim=True) if f.signed else xb.amax(d, keepdim=True) - z
        top = top.clamp_min(1e-30) / f.max
        if not self.mse:
            return self._q(xb, e4m3(top)).reshape(shape)
        best, best_err = None, None
        for r in self.CLIPS:
            q = self._q(xb, e4m3(top * r))
            err = (q - xb).pow(2).sum(d, keepdim=True)
            if best is None:
                best, best_err = q, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
        return best.reshape(shape)


class Residual(torch.nn.Module):
    """Two 4-bit terms: q1 = first(x), q2 = second(x - q1), x ~ q1 + q2 (two W4A4 GEMMs summed: 8 bits of
    activation information at twice the layer's GEMM work; every operand stays a 4-bit code with block scales)."""

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q1 = self.first(x)
        return q1 + self.second(x - q1)


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def rotate(x: torch.Tensor, dim: int, size: int = 32) -> torch.Tensor:
    """Block-diagonal orthonormal (symmetric) Hadamard over the channel dim: its own inverse."""
    xb, shape = _blocks(x, dim, size)
    d = (dim % x.dim()) + 1
    xb = torch.movedim(xb, d, -1) @ hadamard(size).to(x)
    return torch.movedim(xb, -1, d).reshape(shape)


class StaticQuant(torch.nn.Module):
    """Per-tensor fake quantization with a given format / scale / zero point, optionally in a rotated basis
    (returns the dequantized value rotated back, so the consumer's weight is the one to rotate)."""

    def __init__(self, fmt: str, scale: float, zero_point: float, rot_dim: int | None = None):
        super().__init__()
        self.fmt, self.s, self.z, self.rot_dim = parse_format(fmt), float(scale), float(zero_point), rot_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rot_dim is not None:
            x = rotate(x, self.rot_dim)
        q = self.z + self.fmt.round_to_grid((x - self.z) / self.s) * self.s
        return rotate(q, self.rot_dim) if self.rot_dim is not None else q


class StochasticQuant(StaticQuant):
    """The layer's per-tensor MSFP quantizer with stochastic rounding: each value goes to one of its two neighbouring
    grid points, the upper one with probability (v - lo) / (hi - lo). Unbiased, and its errors are independent across
    the sampler's steps, where round-to-nearest repeats nearly the same error on nearly the same input every step.
    (Blackwell converts to FP4 with stochastic rounding in hardware: cvt.rs.)"""

    def __init__(self, fmt: str, scale: float, zero_point: float, seed: int = 0):
        super().__init__(fmt, scale, zero_point)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.fmt.grid.to(x.device)
        v = ((x.float() - self.z) / self.s).clamp(float(g[0]), float(g[-1]))  # saturating, as round-to-nearest
        i = torch.searchsorted(g, v.contiguous(), right=True).clamp(1, g.numel() - 1)
        lo, hi = g[i - 1], g[i]
        up = torch.rand(v.shape, generator=self.gen).to(x.device) * (hi - lo) < v - lo
        return self.z + torch.where(up, hi, lo) * self.s


ACT_CANDS = ("e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0")
W_CANDS = ("e1m2", "e2m1", "e3m0")


def search_best(values: torch.Tensor, cands) -> tuple[str, torch.Tensor, torch.Tensor, float]:
    """select_format's search (default grids) over the candidates for rows of values: best format, scale, zp."""
    rows = values.float().reshape(values.shape[0], -1)
    sv = sens_search.SortedValues(rows)
    best = None
    for c in cands:
        r = sens_search.search_scale(parse_format(c), rows, 40, 12, sorted_values=sv, exact=False)
        if best is None or r.total_mse < best[3]:
            best = (c, r.scale, r.zero_point, r.total_mse)
    return best


# ------------------------------------------------------------------------------- timestep-dependent parameters

def step_groups(sched, steps: int, k: int) -> tuple[list[int], list[list[int]]]:
    """The sampler's ``steps`` timesteps and their K contiguous near-equal groups (step indices), grouped as the
    library's calibration groups them."""
    ts, bounds = _timestep_groups(sched, steps, k)
    if len(bounds) - 1 != k:
        raise ValueError(f"{k} groups over {steps} steps")
    return ts, [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def group_table(timesteps: list[int], groups: list[list[int]], num_train_timesteps: int = 1000) -> torch.Tensor:
    """int64 [T]: t -> the group of the trajectory timestep nearest t (so every training timestep has a group, as
    the fused TALoRA table; a tie goes to the later, smaller timestep)."""
    grp = torch.empty(len(timesteps), dtype=torch.int64)
    for g, idx in enumerate(groups):
        grp[idx] = g
    tt = torch.tensor(timesteps, dtype=torch.float64)
    d = (torch.arange(num_train_timesteps, dtype=torch.float64)[:, None] - tt[None]).abs()
    near = (d - 1e-6 * torch.arange(len(timesteps))).argmin(1)  # ties: the larger step index
    return grp[near]


def search_groups(fmt: str, per_step: list[torch.Tensor], groups: list[list[int]],
                  cfg: QuantConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: (scale, zero point) of the format ``fmt`` by select_format's search (search_scale with the
    config's grids, one sort shared) on the calibration values of that group's steps. -> scales [K], zps [K]."""
    cfg = cfg or QuantConfig()
    f = parse_format(fmt)
    scales, zps = [], []
    for idx in groups:
        rows = torch.cat([per_step[i].reshape(-1) for i in idx]).float().reshape(1, -1)
        r = sens_search.search_scale(f, rows, cfg.clip_ratios, cfg.zero_points,
                                     sorted_values=sens_search.SortedValues(rows), exact=False)
        scales.append(r.scale.reshape(()))
        zps.append(r.zero_point.reshape(()))
    return torch.stack(scales), torch.stack(zps)


class TimestepQuant(torch.nn.Module):
    """Per-tensor fake quantization whose scale / zero point come from the timestep's group: ``table[t[0]]``
    (one timestep per batch, as TALoRA's select_weight reads it). Reads the graph's timestep input."""

    timestep_input = True

    def __init__(self, fmt: str, table: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor):
        super().__init__()
        self.fmt = parse_format(fmt)
        self.register_buffer("table", table.long())
        self.register_buffer("scales", scales.float().reshape(-1))
        self.register_buffer("zps", zero_points.float().reshape(-1))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        g = chosen_set(self.table, timestep.reshape(-1).long())
        s, z = self.scales[g].reshape(()), self.zps[g].reshape(())
        return z + self.fmt.round_to_grid((x - z) / s) * s


# ------------------------------------------------------------------------------------------- graph surgery

def layer_of(n: fx.Node) -> tuple[fx.Node, str]:
    """The conv / linear reading the quantize node n (through a per-part concatenation) and its kind."""
    for u in n.users:
        if u.op == "call_function" and u.target is torch.ops.aten.cat.default:
            return layer_of(u)
        k = sens_lg.layer_kind(u)
        if k in ("conv", "linear"):
            return u, k
    raise ValueError(f"{n.name}: no conv / linear consumer")


def channel_dim(kind: str) -> int:
    return 1 if kind == "conv" else -1


class _Capture(fx.Interpreter):
    """Runs gm in float (every quantize node passes its input through) and hands the inputs of the named quantize
    nodes to ``sink(name, x)``."""

    def __init__(self, gm: fx.GraphModule, names: set[str], sink):
        super().__init__(gm)
        self.names, self.sink, self.quantize = names, sink, True

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target is sens.QUANTIZE:
            x = self.env[n.args[0]]
            if n.name in self.names:
                self.sink(n.name, x)
            if not self.quantize:
                return x
        return super().run_node(n)


@torch.no_grad()
def calibration_steps(gm, pr: "sens.Probe", names: set[str], rot: dict[str, int], args,
                      steps: int | None = None) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """Float values of the named quantize inputs (rotated where ``rot`` gives a channel dim) over FP32 DDIM
    trajectories of ``args.calib_samples`` noises (seed ``args.calib_seed``), ``steps`` steps (default
    ``args.calib_steps``), 4096 random values per tensor and step: the timesteps and the values of each step."""
    gen = torch.Generator().manual_seed(args.calib_seed)
    noise = torch.randn((args.calib_samples, *pr.noise.shape[1:]), generator=gen).to(pr.dev)
    cond = None
    if pr.cond is not None:
        cond = pr.cond[torch.arange(args.calib_samples) % pr.cond.shape[0]]  # the probe's labels, repeating
    vals: dict[str, list[torch.Tensor]] = {k: [] for k in names}

    def sink(name, x):
        v = rotate(x, rot[name]) if name in rot else x
        v = v.reshape(-1)
        vals[name].append(v[torch.randint(0, v.numel(), (4096,), generator=gen)].float().cpu())

    cap = _Capture(gm, names, sink)
    cap.quantize = False
    pr.sched.set_timesteps(steps or args.calib_steps)
    x, ts = noise.clone(), []
    for t in pr.sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        eps = cap.run(x, tt, *((cond,) if cond is not None else ()))
        eps = eps[0] if isinstance(eps, (tuple, list)) else eps
        x = pr.sched.step(eps, t, x).prev_sample
        ts.append(int(t))
    return ts, vals


def calibration(gm, pr: "sens.Probe", names: set[str], rot: dict[str, int], args) -> dict[str, torch.Tensor]:
    """calibration_steps over ``args.calib_steps`` steps, every step's values concatenated."""
    return {k: torch.cat(v) for k, v in calibration_steps(gm, pr, names, rot, args)[1].items()}


def swap_uses(gm: fx.GraphModule, repl: dict[tuple[str, str], torch.nn.Module],
              weights: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A copy of gm where the quantize node q, where user u reads it ((q, u) in repl; u = "*": every user), is
    replaced by that module on q's float input (and the graph's timestep input where the module has
    ``timestep_input``); ``weights``: layer name -> fake-quantized weight tensor used
    instead of that layer's weight quantizer."""
    g2 = copy.deepcopy(gm)
    nodes = {n.name: n for n in g2.graph.nodes}
    for i, ((qn, un), mod) in enumerate(repl.items()):
        q = nodes[qn]
        name = f"lever_{i}_{qn}"
        g2.add_submodule(name, mod)
        with g2.graph.inserting_before(q):
            ins = (q.args[0],)
            if getattr(mod, "timestep_input", False):  # inputs (sample, timestep, ...), as fuse_talora reads them
                ins += ([n for n in g2.graph.nodes if n.op == "placeholder"][1],)
            m = g2.graph.call_module(name, ins)
        if un == "*":
            q.replace_all_uses_with(m)
        else:
            nodes[un].replace_input_with(q, m)
    for i, (ln, w) in enumerate((weights or {}).items()):
        layer = nodes[ln]
        attr = f"lever_w_{i}"
        g2.register_buffer(attr, w)
        with g2.graph.inserting_before(layer):
            a = g2.graph.get_attr(attr)
        layer.replace_input_with(layer.args[1], a)
    g2.graph.eliminate_dead_code()
    g2.recompile()
    return g2


def weight_tensor(gm: fx.GraphModule, layer: fx.Node) -> torch.Tensor:
    wq = layer.args[1]
    w = wq.args[0] if wq.op == "call_function" else wq
    obj = gm
    for part in str(w.target).split("."):
        obj = getattr(obj, part)
    return obj.detach().float()


def plain_weight(w: torch.Tensor) -> torch.Tensor:
    """Q_w(W): per output channel, the best signed 4-bit format by MSE, as select_format searches it."""
    fmt, s, _, _ = search_best(w.reshape(w.shape[0], -1), W_CANDS)
    s = s.reshape((-1,) + (1,) * (w.dim() - 1))
    return parse_format(fmt).round_to_grid(w / s) * s


def rotated_weight(w: torch.Tensor) -> torch.Tensor:
    """Q_w(W H) H: the weight quantized in the basis of its rotated input channels, back in W's basis."""
    return rotate(plain_weight(rotate(w, 1)), 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.md_from:
        args.md_from.with_suffix(".md").write_text(markdown(json.loads(args.md_from.read_text())))
        return 0
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    block = args.block or ("up_blocks.3" if args.model == "uncond" else "up_blocks.2")
    gm, qs, pr = sens.prepare(load_model(sens.MODELS[args.model]), args, dev)
    print(f"compiled + probed in {time.perf_counter() - t0:.0f}s: {len(qs)} quantizers", flush=True)
    byname = {q["node"]: q for q in qs}
    nodes = {n.name: n for n in gm.graph.nodes}
    scale_of = lambda q: float(getattr(gm, nodes[q].args[1].target))  # noqa: E731
    zp_of = lambda q: float(getattr(gm, nodes[q].args[2].target))  # noqa: E731
    acts4 = [q["node"] for q in qs if q["role"] == "act" and q["bits"] == 4]
    target = [q for q in acts4 if byname[q]["block"] == block]
    # conv / linear activation quantizers (attention q/k/v operands have no channel dim 1 / -1: left per-tensor)
    layer_acts = [q for q in acts4 if byname[q]["kind"] not in ("attn_qkv",)]
    kind_of = {q: layer_of(nodes[q]) for q in layer_acts}
    levers = [x for x in args.levers.split(",") if x]
    all_levers = [x for x in args.all_acts.split(",") if x]

    # Hadamard: every act operand of the layers reading the block's quantizers, rotated for those layers only
    rot_layers = {kind_of[q][0].name: kind_of[q][0] for q in target}
    rot_ops: dict[tuple[str, str], int] = {}  # (quantize node, the node reading it for that layer) -> channel dim
    for lname, layer in rot_layers.items():
        a, dim = layer.args[0], channel_dim(sens_lg.layer_kind(layer))
        if a.op == "call_function" and a.target is torch.ops.aten.cat.default:  # the layer's own per-part cat copy
            for p in a.args[0]:
                if p.op == "call_function" and p.target is sens.QUANTIZE:
                    rot_ops[(p.name, a.name)] = dim
        elif a.op == "call_function" and a.target is sens.QUANTIZE:
            rot_ops[(a.name, lname)] = dim
    calib_names = set(target) | {q for q, _ in rot_ops}
    t1 = time.perf_counter()
    plain = calibration(gm, pr, calib_names, {}, args)
    rotv = calibration(gm, pr, {q for q, _ in rot_ops}, {q: d for (q, _), d in rot_ops.items()}, args) \
        if "hadamard" in levers else {}  # (the CPU is shared: only what a lever reads)
    print(f"calibration values in {time.perf_counter() - t1:.0f}s", flush=True)

    # tstep:K levers: per-step values on trajectories of the inference step count, searched per group of steps
    tstep_ks = sorted({int(lv.split(":")[1]) for lv in levers + all_levers if lv.startswith("tstep:")})
    tstep_names = set(acts4 if any(lv.startswith("tstep:") for lv in all_levers) else target)
    tstep_steps = args.tstep_calib_steps or args.steps
    tstep: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # K -> q -> table, s, z
    tstep_rms: dict[int, dict[str, list[float]]] = {}  # K -> q -> RMS of each group's calibration values
    if tstep_ks:
        t1 = time.perf_counter()
        cal_ts, per_step = calibration_steps(gm, pr, tstep_names, {}, args, tstep_steps)
        for k in tstep_ks:
            ts_k, groups = step_groups(pr.sched, tstep_steps, k)
            assert ts_k == cal_ts, "calibration steps and groups from different schedules"
            table = group_table(ts_k, groups, pr.sched.config.num_train_timesteps)
            tstep[k] = {q: (table, *search_groups(byname[q]["fmt"], per_step[q], groups)) for q in tstep_names}
            # the data's own spread across groups: the searched scale also moves where the MSE surface is flat
            tstep_rms[k] = {q: [float(torch.cat([per_step[q][i] for i in g]).pow(2).mean().sqrt()) for g in groups]
                            for q in tstep_names}
        print(f"tstep calibration ({args.calib_samples} x {tstep_steps} steps, {len(tstep_names)} quantizers) and "
              f"searches in {time.perf_counter() - t1:.0f}s", flush=True)

    def block_mods(lever: str, names) -> dict[tuple[str, str], torch.nn.Module]:
        out = {}
        lever, _, where = lever.partition("@")  # "@shortcut": only the conv_shortcut (skip concatenation) inputs
        for q in names:
            if where == "shortcut" and byname[q]["kind"] != "skip_concat":
                continue
            b = byname[q]
            if lever.startswith("tstep:"):  # per-tensor: no channel dim needed (attention q/k/v included)
                out[(q, "*")] = TimestepQuant(b["fmt"], *tstep[int(lever.split(":")[1])][q])
                continue
            dim = channel_dim(kind_of[q][1])
            base, *opts = lever.split(":")  # e.g. nvfp4-msfp:b8:mse, nvfp4-msfp:res
            size = next((int(o[1:]) for o in opts if o.startswith("b") and o[1:].isdigit()), 16)
            if base in ("nvfp4", "mxfp4"):
                out[(q, "*")] = BlockQuant(base, "e2m1", 0.0, dim, size, "mse" in opts)
            elif base == "nvfp4-msfp":
                out[(q, "*")] = BlockQuant(base, b["fmt"], zp_of(q), dim, size, "mse" in opts)
            elif lever == "a8":
                v = plain[q]
                lo, hi = float(v.min()), float(v.max())
                out[(q, "*")] = StaticQuant("uint8", max(hi - lo, 1e-8) / 255, lo)
            elif lever == "sr":
                out[(q, "*")] = StochasticQuant(b["fmt"], scale_of(q), zp_of(q), seed=len(out))
            elif lever == "recal":
                fmt, s, z, _ = search_best(plain[q][None], ACT_CANDS)
                out[(q, "*")] = StaticQuant(fmt, float(s), float(z))
            else:
                raise SystemExit(f"unknown lever {lever!r}")
            if base.startswith("nvfp4") and "res" in opts:  # + the residual as a second NVFP4 term
                out[(q, "*")] = Residual(out[(q, "*")], BlockQuant("nvfp4", "e2m1", 0.0, dim, size, "mse" in opts))
        return out

    rot_info: dict[str, str] = {}

    def hadamard_mods() -> dict[tuple[str, str], torch.nn.Module]:
        out = {}
        for (q, u), d in rot_ops.items():
            fmt, s, z, _ = search_best(rotv[q][None], ACT_CANDS)
            rot_info[byname[q]["name"] + (" (for " + u + ")" if q not in target else "")] = fmt
            out[(q, u)] = StaticQuant(fmt, float(s), float(z), rot_dim=d)
        return out

    had_layers = rot_layers if "hadamard" in levers else {}
    had_w = {ln: rotated_weight(weight_tensor(gm, l)) for ln, l in had_layers.items()}
    ctl_w = {ln: plain_weight(weight_tensor(gm, l)) for ln, l in had_layers.items()}
    w_err = {ln: {"rotated": float((had_w[ln] - weight_tensor(gm, l)).norm() / weight_tensor(gm, l).norm()),
                  "plain": float((ctl_w[ln] - weight_tensor(gm, l)).norm() / weight_tensor(gm, l).norm())}
             for ln, l in had_layers.items()}

    # local errors of the block's quantizers (inputs from the W4A4 graph at the probed steps)
    inputs: dict[str, dict[int, torch.Tensor]] = {q: {} for q in target}
    for i in pr.probe:
        cap = _Capture(gm, set(target), lambda n, x, i=i: inputs[n].__setitem__(pr.ts[i], x.detach().clone()))
        cap.run(pr.xs[i], pr.t(i), *((pr.cond,) if pr.cond is not None else ()))

    def rel(a, b):
        return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))

    base_q = {q: StaticQuant(byname[q]["fmt"], scale_of(q), zp_of(q)) for q in target}
    had = hadamard_mods() if "hadamard" in levers else {}
    local: dict[str, dict[str, dict[int, float]]] = {}
    for q in target:
        row = {"W4A4 (per-tensor MSFP)": {t: rel(base_q[q](x), x) for t, x in inputs[q].items()}}
        for lv in levers:
            if lv == "hadamard":
                m = next(m for (qq, _), m in had.items() if qq == q)
            else:
                m = block_mods(lv, [q]).get((q, "*"), base_q[q])  # "@shortcut" levers leave the others
            with torch.no_grad():
                row[lv] = {t: rel(m(x, torch.tensor([t])) if getattr(m, "timestep_input", False) else m(x), x)
                           for t, x in inputs[q].items()}
        local[byname[q]["name"]] = row
        print(byname[q]["name"], {k: round(sum(v.values()) / len(v), 4) for k, v in row.items()}, flush=True)

    # how much the searched parameters move across groups (the lever's premise), and K=1 against the compile's
    tstep_params = {str(k): {byname[q]["name"]: {"node": q, "block": byname[q]["block"], "fmt": byname[q]["fmt"],
                                                 "compiled_scale": scale_of(q), "compiled_zp": zp_of(q),
                                                 "scales": p[1].tolist(), "zps": p[2].tolist(),
                                                 "rms": tstep_rms[k][q]}
                             for q, p in params.items()} for k, params in tstep.items()}
    tstep_spread = {str(k): spread_summary(v, block) for k, v in tstep_params.items()}
    for k, v in tstep_spread.items():
        print(f"tstep:{k} scale max/min per quantizer, median: {v}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    configs: dict[str, dict] = {}
    tag = f"w4a4_levers_{args.model}"

    def save() -> None:
        res = {"model": args.model, "block": block, "settings": {k: str(v) for k, v in vars(args).items()},
               "probe_timesteps": [pr.ts[i] for i in pr.probe], "target_quantizers": [byname[q] for q in target],
               "hadamard_formats": rot_info, "hadamard_weight_rel_err": w_err, "local_rel_rmse": local,
               "configs": configs, "tstep_params": tstep_params, "tstep_spread": tstep_spread,
               "seconds": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg()}
        (args.out / f"{tag}.json").write_text(json.dumps(res, indent=1))
        (args.out / f"{tag}.md").write_text(markdown(res))

    all_nodes = {q["node"] for q in qs}

    def measure(name: str, g: fx.GraphModule, n_q: int) -> None:
        r = pr.measure(g)
        configs[name] = {"quantizers": n_q, **r}
        print(f"{name:<64} {r['psnr']:6.2f} dB  eps {r['eps_rel_rmse_mean']:.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        save()

    measure("W4A4 (strict, per-tensor MSFP)", gm, len(all_nodes))
    measure(f"{block} activations only (per-tensor MSFP)", sens.bypassed(gm, set(target)), len(target))
    for lv in levers:
        if lv == "hadamard":
            measure(f"W4A4, {block} activations: hadamard", swap_uses(gm, had, had_w), len(all_nodes))
            only = sens.bypassed(gm, set(target))  # weights float: nothing to rotate there
            measure(f"{block} activations only: hadamard",
                    swap_uses(only, {k: m for k, m in had.items() if k[0] in target}), len(target))
            continue
        mods = block_mods(lv, target)
        measure(f"W4A4, {block} activations: {lv}", swap_uses(gm, mods), len(all_nodes))
        measure(f"{block} activations only: {lv}", swap_uses(sens.bypassed(gm, set(target)), mods), len(target))
    if "hadamard" in levers:  # control: the same layers' weights re-searched without rotation
        measure(f"W4A4, {block} weights re-searched (control for hadamard)", swap_uses(gm, {}, ctl_w), len(all_nodes))
    for lv in all_levers:
        if lv.startswith("tstep:"):  # per-tensor: every 4-bit activation quantizer, attention q/k/v included
            measure(f"W4A4, every 4-bit activation: {lv}", swap_uses(gm, block_mods(lv, acts4)), len(all_nodes))
            continue
        mods = block_mods(lv, layer_acts)
        measure(f"W4A4, every conv/linear activation: {lv}", swap_uses(gm, mods), len(all_nodes))
    save()
    return 0


def spread_summary(params: dict[str, dict], block: str) -> dict[str, float]:
    """Median over quantizers (the block's, every one) of max/min of a quantizer's group scales, the max of that
    ratio, the median ratio of the mean group scale to the compiled scale and, where recorded, the median max/min
    of the groups' calibration RMS (torch's median: the lower middle value of an even count)."""
    def med(v: list[float]) -> float:
        return float(torch.tensor(v).median()) if v else float("nan")

    ratio = {n: max(p["scales"]) / min(p["scales"]) for n, p in params.items()}
    blk = [r for n, r in ratio.items() if params[n]["block"] == block]
    vs_compiled = [sum(p["scales"]) / len(p["scales"]) / p["compiled_scale"] for p in params.values()]
    out = {"quantizers": len(ratio), "median_ratio": med(list(ratio.values())), "max_ratio": max(ratio.values()),
           "block_quantizers": len(blk), "block_median_ratio": med(blk), "block_max_ratio": max(blk, default=0.0),
           "median_mean_scale_over_compiled": med(vs_compiled)}
    if all("rms" in p for p in params.values()):  # max/min of the groups' RMS: how much the data itself moves
        rr = {n: max(p["rms"]) / max(min(p["rms"]), 1e-12) for n, p in params.items()}
        out |= {"median_rms_ratio": med(list(rr.values())),
                "block_median_rms_ratio": med([r for n, r in rr.items() if params[n]["block"] == block])}
    return out


def markdown(res: dict) -> str:
    """The measured configurations and the block's local errors as markdown tables."""
    ts = res["probe_timesteps"]
    bgs = [r["background_fp32"] for r in res["configs"].values() if "background_fp32" in r]
    fp_bg = f"{bgs[0]:.2f}" if bgs else "~ -0.95"  # recorded since session 21; earlier runs: -0.95
    unclipped = res["settings"].get("no_clip_sample") == "True"
    lines = [f"### mnist-{res['model']}: levers on {res['block']}'s 4-bit activation quantizers (CPU)", "",
             f"PSNR of {res['settings']['samples']} DDIM-{res['settings']['steps']} samples vs FP32 of the same noise; "
             f"eps rel-RMSE: one-step noise prediction vs FP32 at t = {', '.join(map(str, ts))} (mean)."
             + (" Sampled without DDIM's x0 clipping (--no-clip-sample), FP32 included." if unclipped else ""), "",
             "| configuration | PSNR (dB) | eps rel-RMSE | background (FP32 " + fp_bg + ") |", "|---|---|---|---|"]
    for name, r in res["configs"].items():
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['eps_rel_rmse_mean']:.4f} | {r['background']:.2f} |")
    levers = list(next(iter(res["local_rel_rmse"].values())).keys()) if res["local_rel_rmse"] else []
    lines += ["", "Local error of each quantizer, RMSE(q(x) - x) / RMS(x), mean over the probed t (inputs from the "
              "W4A4 graph):", "", "| quantizer | " + " | ".join(levers) + " |", "|---|" + "---|" * len(levers)]
    for name, row in res["local_rel_rmse"].items():
        lines.append(f"| {name} | " + " | ".join(f"{sum(v.values()) / len(v):.4f}" for v in row.values()) + " |")
    if res.get("tstep_spread"):
        lines += ["", "tstep:K: max/min of each quantizer's K group scales (median over quantizers; max):", ""]
        for k, v in res["tstep_spread"].items():
            lines.append(f"- K={k}: block ({v['block_quantizers']}) median {v['block_median_ratio']:.2f}, max "
                         f"{v['block_max_ratio']:.2f}; all {v['quantizers']}: median {v['median_ratio']:.2f}, max "
                         f"{v['max_ratio']:.2f}; mean group scale / compiled scale, median "
                         f"{v['median_mean_scale_over_compiled']:.3f}" +
                         (f"; RMS of the groups' values max/min, median: block {v['block_median_rms_ratio']:.2f}, all "
                          f"{v['median_rms_ratio']:.2f}" if "median_rms_ratio" in v else ""))
    if res.get("hadamard_formats"):
        lines += ["", "Hadamard: per-tensor format picked on the rotated calibration values: " +
                  ", ".join(f"{k} {v}" for k, v in res["hadamard_formats"].items()) + ".", "",
                  "Weight relative error of the rotated layers, Q_w(W H) H vs the same search on W: " +
                  ", ".join(f"{v['rotated']:.3f} vs {v['plain']:.3f}" for v in res["hadamard_weight_rel_err"].values())
                  + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
