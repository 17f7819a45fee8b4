"""``--check``: ORT against the torch quantized graph, quantizer by quantizer, on the same inputs.

A check-only copy of the ONNX exposes every quantizer's output (and its input) as extra graph outputs; an fx
Interpreter runs the torch graph on the same inputs and, at each quantizer, compares the two and then continues
with ORT's value (teacher forcing), so a difference never propagates: every quantizer and every stretch of float
layers between two quantizers is judged on its own.

What counts as what, per quantizer (values in grid units, v = (y - zero_point) / scale):
- a *rounding flip*: ORT and torch land on adjacent grid levels and the threshold between them lies between ORT's
  and torch's input (they sum convolutions and evaluate exp/sin in different orders, so an input within a few ulps
  of a threshold may round either way). Flips are counted, never failed.
- anything else fails: values off the quantizer's grid (wrong scale or format), two or more levels apart, one level
  apart where the input is not at that threshold (a body off by one level), a quantizer input that differs from
  torch by more than ``tolerance`` (relative to the tensor's largest value: the float layers before it are wrong),
  or an output that does.

The first failing node in topological order is named by its module path (names.py). Quantizers are found in the
ONNX by the msfp-domain node that reads their scale initializer (by name, then by value), so the check does not
depend on how a quantizer's body is written. Packed weights lowered to int8 (export/integer_kernels.py) are found by
their int8 initializer's name: through the DequantizeLinear that reads it, or, for a weight only an integer kernel
(MatMulInteger) reads, as its int8 values times scale / 2^k, the values the kernel multiplies (the kernel's
rescale is then judged at the next quantizer's input).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx

from .names import module_path
from .ops import get_format

__all__ = ["CheckResult", "NodeCheck", "check_onnx", "quantizer_nodes"]

_QUANTIZE_TARGETS = ("msfp.quantize", "msfp.quantize_folded")
_PACKED_TARGETS = ("msfp.dequantize_packed",)
_EPS = 1e-5  # relative float error of computing (x - zp) / scale in two different ways


def _int8_weights(gm: fx.GraphModule, qnodes: list[fx.Node], matched: dict, model: onnx.ModelProto
                  ) -> dict[fx.Node, torch.Tensor]:
    """Packed weights no DequantizeLinear decodes (only an integer kernel reads their int8 initializer): the values
    the kernel multiplies, int8 * scale / 2^k, in torch's layout."""
    from msfp_compiler.export.integer_kernels import int8_name, integer_shift

    inits = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    out = {}
    for q in qnodes:
        if q in matched or _target_name(q) not in _PACKED_TARGETS:
            continue
        consts = _const_args(gm, q)
        if 0 not in consts or 1 not in consts or int8_name(consts[0][0]) not in inits:
            continue
        k = integer_shift(get_format(_fmt_of(q)), 127)
        if k is None:
            continue
        w = torch.from_numpy(onnx.numpy_helper.to_array(inits[int8_name(consts[0][0])]).copy()).float()
        shape = list(q.args[3])
        if w.dim() == 2 and len(shape) == 4:  # a conv's, stored [(kh, kw, C_in), C_out] (the im2col order)
            w = w.T.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        elif w.dim() == 2:
            w = w.T  # MatMulInteger reads [K, N]; torch's linear weight is [N, K]
        scale = consts[1][1].float() * 2.0 ** -k  # exact: a power-of-two change
        out[q] = w.reshape(shape) * scale.reshape([-1] + [1] * (len(shape) - 1) if scale.numel() > 1 else [])
    return out


def _target_name(n: fx.Node) -> str:
    return str(n.target).rsplit(".default", 1)[0]


def quantizer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The torch graph's quantize / quantize_folded / dequantize_packed nodes, in graph order."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and _target_name(n) in _QUANTIZE_TARGETS + _PACKED_TARGETS]


@dataclass
class NodeCheck:
    """One quantizer (or the output) compared on every checked sample."""

    index: int  # topological position in the torch graph
    node: str  # fx name
    name: str  # readable (module path)
    elements: int = 0
    flips: int = 0
    input_rel_err: float = 0.0
    problem: str | None = None


@dataclass
class CheckResult:
    """Per-quantizer comparison of ORT with the torch quantized graph (see the module docstring)."""

    tolerance: float
    samples: int
    nodes: list[NodeCheck] = field(default_factory=list)  # compared quantizers and the output, graph order
    unobserved: list[str] = field(default_factory=list)  # quantizers with no msfp node in the ONNX
    end_to_end_rel_rmse: list[float] = field(default_factory=list)  # without forcing, per sample (for reference)
    seconds: float = 0.0

    @property
    def failures(self) -> list[NodeCheck]:
        return sorted((c for c in self.nodes if c.problem), key=lambda c: c.index)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first_failure(self) -> NodeCheck | None:
        f = self.failures
        return f[0] if f else None

    @property
    def flips(self) -> int:
        return sum(c.flips for c in self.nodes)

    @property
    def flipped_quantizers(self) -> int:
        return sum(c.flips > 0 for c in self.nodes)

    @property
    def compared(self) -> int:
        return sum(c.node != "output" for c in self.nodes)

    def __str__(self) -> str:
        e2e = max(self.end_to_end_rel_rmse, default=0.0)
        if not self.ok:
            f = self.first_failure
            more = len(self.failures) - 1
            return (f"check FAIL at {f.name} ({f.node}): {f.problem}"
                    + (f"; {more} more node(s) fail after it" if more > 0 else ""))
        unobs = f", {len(self.unobserved)} not observable in the ONNX" if self.unobserved else ""
        return (f"check PASS: ORT matches torch at {self.compared} quantizers{unobs} and the output on "
                f"{self.samples} held-out samples (tolerance {self.tolerance:.0e}); {self.flips} rounding flips "
                f"(one grid step, input at the threshold) at {self.flipped_quantizers} quantizers; end-to-end "
                f"rel-RMSE up to {e2e:.2e}")

    def info(self) -> dict[str, Any]:
        """Facts for passes.jsonl."""
        f = self.first_failure
        return {"ok": self.ok, "samples": self.samples, "quantizers": self.compared,
                "unobserved": len(self.unobserved), "flips": self.flips, "flipped_quantizers": self.flipped_quantizers,
                "failures": len(self.failures), "first_failure": f"{f.name} ({f.node}): {f.problem}" if f else None,
                "end_to_end_rel_rmse_max": max(self.end_to_end_rel_rmse, default=0.0), "tolerance": self.tolerance}

    def report(self) -> list[str]:
        """Readable lines for passes.log: failures, then quantizers with flips."""
        lines = [str(self)]
        lines += [f"FAIL {c.name} ({c.node}): {c.problem}" for c in self.failures[:20]]
        lines += [f"{c.name:<56} {c.flips} flips in {c.elements} values" for c in self.nodes if c.flips][:50]
        lines += [f"not observable: {n}" for n in self.unobserved[:20]]
        return lines


# ---------------------------------------------------------------------------------------------------------------
# matching torch quantizers to ONNX nodes


def _const_args(gm: fx.GraphModule, n: fx.Node) -> dict[int, tuple[str, torch.Tensor]]:
    """Positional tensor arguments of a quantizer that are module buffers: position -> (buffer name, value)."""
    out = {}
    for i, a in enumerate(n.args):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            obj: Any = gm
            for part in str(a.target).split("."):
                obj = getattr(obj, part)
            if torch.is_tensor(obj):
                out[i] = (str(a.target), obj.detach())
    return out


def _fmt_of(n: fx.Node) -> str:
    return n.args[3] if _target_name(n) in _QUANTIZE_TARGETS else n.args[2]


def _candidates(model: onnx.ModelProto, inits: dict) -> list[tuple[onnx.NodeProto, str | None, bool]]:
    """ONNX nodes a quantizer can lower to: (node, format, reads packed weights)."""
    from msfp_compiler.export.msfp_ops import MSFP_DOMAIN

    cands = []
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear" and node.input[0] in inits \
                and inits[node.input[0]].data_type == onnx.TensorProto.INT8:
            cands.append((node, None, True))  # an int8 weight (export/integer_kernels.py), found by name below
            continue
        if node.domain != MSFP_DOMAIN:
            continue
        fmt = next((a.s.decode() for a in node.attribute if a.name == "format"), None)
        cands.append((node, fmt, node.op_type.startswith("Dequantize")))
    return cands


def _match(gm: fx.GraphModule, qnodes: list[fx.Node], model: onnx.ModelProto) -> dict[fx.Node, onnx.NodeProto]:
    from msfp_compiler.export.integer_kernels import int8_name

    inits = {t.name: t for t in model.graph.initializer}
    cache: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray | None:
        if name not in inits:
            return None
        if name not in cache:
            cache[name] = onnx.numpy_helper.to_array(inits[name])
        return cache[name]

    cands = _candidates(model, inits)
    used: set[int] = set()
    out: dict[fx.Node, onnx.NodeProto] = {}
    for q in qnodes:
        packed, fmt, consts = _target_name(q) in _PACKED_TARGETS, _fmt_of(q), _const_args(gm, q)
        keys = (0, 1) if packed else (1,)  # packed codes and scale, or the scale: buffers of this quantizer only
        x_name = q.args[0].name if isinstance(q.args[0], fx.Node) else None
        kind = [(i, c[0]) for i, c in enumerate(cands) if c[2] == packed]

        def rank(c: tuple[int, onnx.NodeProto]) -> tuple[bool, bool]:  # unused first, then the same input name
            return (c[0] in used, not (c[1].input and c[1].input[0] == x_name))

        # 1) the node reading the quantizer's own scale (or codes) initializer: found whatever its format says
        by_name = [c for c in kind if any(p < len(c[1].input) and c[1].input[p] == consts[p][0]
                                          for p in keys if p in consts)]
        if packed and 0 in consts:
            by_name += [c for c in kind if c[1].op_type == "DequantizeLinear"
                        and c[1].input[0] == int8_name(consts[0][0])]

        # 2) same format and every buffer equal to the initializer in the same position (the exporter merges equal
        #    initializers, and identical nodes, so several quantizers may map to one node)
        def same_values(nd: onnx.NodeProto) -> bool:
            seen = False
            for p, (_, t) in consts.items():
                v = value(nd.input[p]) if p < len(nd.input) else None
                if v is None:
                    continue
                if v.size != t.numel() or not np.array_equal(v.reshape(-1), t.reshape(-1).numpy()):
                    return False
                seen = True
            return seen

        pool = by_name or [c for c in kind if cands[c[0]][1] == fmt and same_values(c[1])]
        if pool:
            pick = min(pool, key=rank)
            used.add(pick[0])
            out[q] = pick[1]
    return out


# ---------------------------------------------------------------------------------------------------------------
# judging one quantizer


def _grid_units(y: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    y = y.double()
    return (y - zp.double()) / scale.double() if zp is not None else y / scale.double()


def _judge(fmt_name: str, o: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
           x_t: torch.Tensor | None, x_o: torch.Tensor | None, drift_bound: float,
           zp_in: torch.Tensor | None = None) -> tuple[int, str | None]:
    """(flips, problem) for ORT output o vs torch output t of one quantizer; see the module docstring.

    ``zp`` is the zero point in the *output* (None for quantize_folded, whose output is scale * level), ``zp_in``
    the one subtracted from the *input* before rounding (the quantizer's zero point, folded or not; defaults to
    ``zp``): a folded quantizer's thresholds sit at zp_in + scale * midpoint in input units."""
    zp_in = zp if zp_in is None else zp_in
    if o.shape != t.shape:
        return 0, f"ORT value has shape {tuple(o.shape)}, torch {tuple(t.shape)}"
    if not torch.isfinite(o).all():
        return 0, f"{int((~torch.isfinite(o)).sum())} of {o.numel()} ORT values are NaN or Inf"
    fmt = get_format(fmt_name)
    grid = fmt.grid.double()
    mids = (grid[1:] + grid[:-1]) / 2
    gaps = grid.diff()
    vo, vt = _grid_units(o, scale, zp), _grid_units(t, scale, zp)
    io, it = torch.bucketize(vo.contiguous(), mids), torch.bucketize(vt.contiguous(), mids)
    # on the grid: within a small fraction of the local level spacing
    spacing = torch.cat([gaps[:1], torch.minimum(gaps[1:], gaps[:-1]), gaps[-1:]])
    off = (vo - grid[io]).abs() > 1e-3 * spacing[io]
    if off.any():
        k = int(off.sum())
        i = int(off.reshape(-1).nonzero()[0])
        return 0, (f"{k} of {o.numel()} ORT values are not on this quantizer's {fmt_name} grid (e.g. "
                   f"{float(o.reshape(-1)[i]):.6g} = {float(vo.reshape(-1)[i]):.5g} steps of scale "
                   f"{float(scale.reshape(-1)[0]):.4g}): wrong scale, zero point or format")
    diff = io - it
    bad = diff.abs() >= 2
    if bad.any():
        return 0, (f"{int(bad.sum())} of {o.numel()} values differ from torch by 2 or more grid steps "
                   f"(up to {int(diff.abs().max())})")
    flip = diff != 0
    n_flip = int(flip.sum())
    if not n_flip:
        return 0, None
    lo = torch.minimum(io, it)[flip].clamp_max(mids.numel() - 1)
    thr = mids[lo]
    eps = _EPS * thr.abs().clamp_min(1.0)
    if x_t is None:  # dequantized weights: same codes in, nothing may differ
        return 0, f"{n_flip} of {o.numel()} decoded weight values differ from torch by one grid step"
    vin_t = _grid_units(x_t, scale, zp_in).expand_as(vt)[flip]
    if x_o is not None:
        vin_o = _grid_units(x_o, scale, zp_in).expand_as(vt)[flip]
        ok = (thr >= torch.minimum(vin_o, vin_t) - eps) & (thr <= torch.maximum(vin_o, vin_t) + eps)
    else:
        bound = (drift_bound / scale.double().abs()).expand_as(vt)[flip]
        ok = (vin_t - thr).abs() <= eps + bound
    if not ok.all():
        dist = (vin_t - thr).abs()[~ok]
        return n_flip, (f"{int((~ok).sum())} of {o.numel()} values are one grid step off where the input is not at "
                        f"a rounding threshold (up to {float(dist.max()):.3g} steps from it): the quantizer body "
                        "rounds differently from torch.ops.msfp")
    return n_flip, None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (NaN/Inf count as infinitely far)."""
    if a.shape != b.shape:
        return float("inf")
    d = (a.double() - b.double()).abs()
    if not torch.isfinite(d).all():
        return float("inf")
    return float(d.max() / b.double().abs().max().clamp_min(1e-30)) if d.numel() else 0.0


class _ForcingInterpreter(fx.Interpreter):
    """Runs the torch graph; at each observed quantizer compares with ORT and continues with ORT's value."""

    def __init__(self, gm: fx.GraphModule, ort_out: dict[fx.Node, torch.Tensor], ort_in: dict[fx.Node, torch.Tensor],
                 checks: dict[fx.Node, NodeCheck], tolerance: float, names: dict[str, str], const_in: set[fx.Node]):
        super().__init__(gm)
        self.ort_out, self.ort_in, self.checks, self.tol, self.names = ort_out, ort_in, checks, tolerance, names
        self.const_in = const_in
        self.transposed: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        o = self.ort_out.get(n)
        if o is None:
            return out
        c = self.checks[n]
        c.elements += o.numel()
        packed = _target_name(n) in _PACKED_TARGETS
        if packed and self.transposed.get(n):
            o = o.T  # an int8 weight the lowering stored transposed (a linear's MatMul reads [K, N])
        scale = self.env[n.args[1]]
        zp_in = None if packed else self.env[n.args[2]]
        zp = None if _target_name(n) == "msfp.quantize_folded" else zp_in
        x_t = None if packed else self.env[n.args[0]]
        x_o = self.ort_in.get(n)
        if n in self.const_in:  # the ONNX reads the same constant (a weight): no input drift at all
            x_o = x_t
        elif x_o is not None and x_t is not None:
            rel = _rel(x_o, x_t)
            c.input_rel_err = max(c.input_rel_err, rel)
            if rel > self.tol and c.problem is None:
                src = n.args[0]
                c.problem = (f"its input differs from torch by {rel:.2e} (relative to its largest value; tolerance "
                             f"{self.tol:.0e}): the float layers before it diverge (its input is {src.name}"
                             f"{' in ' + path if (path := module_path(src)) else ''})")
        drift = self.tol * float(x_t.abs().max()) if x_t is not None and x_t.numel() else 0.0
        flips, problem = _judge(_fmt_of(n), o, out, scale, zp, x_t, x_o if x_o is not None else None, drift, zp_in)
        c.flips += flips
        if problem and c.problem is None:
            c.problem = problem
        # the torch op keeps its input's strides and later views were traced against them: keep out's layout
        return torch.empty_like(out).copy_(o) if o.shape == out.shape else out


def _probe_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model with extra graph outputs (check only; never saved)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for nm in names:
        if nm not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None))
            have.add(nm)
    return probe


def _probe_plan(model: onnx.ModelProto, matched: dict[fx.Node, onnx.NodeProto]
                ) -> tuple[list[str], dict[fx.Node, str], set[fx.Node]]:
    """What the check-only ONNX must return (every matched node's output and quantizer inputs), the ONNX name of
    each quantizer's input, and the quantizers whose input is a constant (an initializer)."""
    graph_inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    wanted: list[str] = []
    in_name: dict[fx.Node, str] = {}
    const_in: set[fx.Node] = set()
    for q, nd in matched.items():
        wanted.append(nd.output[0])
        if _target_name(q) in _QUANTIZE_TARGETS and nd.input and nd.input[0] in inits:
            const_in.add(q)
        elif _target_name(q) in _QUANTIZE_TARGETS and nd.input:
            in_name[q] = nd.input[0]
            if nd.input[0] not in graph_inputs:
                wanted.append(nd.input[0])
    return wanted, in_name, const_in


def check_onnx(gm: fx.GraphModule, model: onnx.ModelProto, batches: Sequence, tolerance: float = 1e-3,
               threads: int | None = None) -> CheckResult:
    """Compare ORT running ``model`` with the torch graph ``gm`` per quantizer on ``batches`` (CalibBatch-like:
    ``.args`` is the input tuple)."""
    from msfp_compiler.export.integer_kernels import TRANSPOSED
    from msfp_compiler.export.ort import session_from_model

    from .names import display_names

    t0 = time.perf_counter()
    names = display_names(gm)
    qnodes = quantizer_nodes(gm)
    matched = _match(gm, qnodes, model)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out_name = model.graph.output[0].name
    wanted, in_name, const_in = _probe_plan(model, matched)
    # ORT's own decode of the packed weights stays in (no predecode), so every body a plain session runs is checked
    sess = session_from_model(_probe_model(model, wanted), threads, predecode=False)
    outputs = [o.name for o in sess.get_outputs()]
    input_names = [i.name for i in sess.get_inputs()]
    checks = {q: NodeCheck(order[q], q.name, names.get(q.name, q.name)) for q in matched}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_check = NodeCheck(order[out_node], "output", f"output {out_name} (layers after the last quantizer)")
    int8_only = _int8_weights(gm, qnodes, matched, model)
    checks.update({q: NodeCheck(order[q], q.name, names.get(q.name, q.name)) for q in int8_only})
    res = CheckResult(tolerance, 0, unobserved=[names.get(q.name, q.name) for q in qnodes
                                                if q not in matched and q not in int8_only])
    for b in batches:
        args = b.args
        feeds = {}
        for nm, a in zip(input_names, args):
            feeds[nm] = a.numpy() if nm != "timestep" else a.long().numpy()
        vals = dict(zip(outputs, sess.run(outputs, feeds)))
        vals.update(feeds)
        ort_out = {q: torch.from_numpy(np.asarray(vals[nd.output[0]])) for q, nd in matched.items()}
        ort_out.update(int8_only)
        ort_in = {q: torch.from_numpy(np.asarray(vals[nm])).float() for q, nm in in_name.items() if nm in vals}
        with torch.no_grad():
            interp = _ForcingInterpreter(gm, ort_out, ort_in, checks, tolerance, names, const_in)
            interp.transposed = {q: nd.doc_string == TRANSPOSED for q, nd in matched.items()}
            forced = interp.run(*args)
            free = gm(*args)
        o = torch.from_numpy(np.asarray(vals[out_name]))
        rel = _rel(o, forced)
        out_check.elements += o.numel()
        out_check.input_rel_err = max(out_check.input_rel_err, rel)
        if rel > tolerance and out_check.problem is None:
            out_check.problem = (f"ORT output differs from torch by {rel:.2e} (relative to its largest value; "
                                 f"tolerance {tolerance:.0e}) with every quantizer agreeing")
        dims = tuple(range(1, free.dim()))
        e2e = ((o.double() - free.double()).pow(2).sum(dims).sqrt()
               / free.double().pow(2).sum(dims).sqrt().clamp_min(1e-30))
        res.end_to_end_rel_rmse += e2e.tolist()
        res.samples += int(args[0].shape[0])
    res.nodes = sorted([*checks.values(), out_check], key=lambda c: c.index)
    res.seconds = time.perf_counter() - t0
    return res
