"""GPU runtime for quantized msfp graphs: Triton kernels behind the msfp ops, a graph runner and a DDIM loop.

Importing this module registers the Triton kernels as the CUDA implementation of ``msfp::quantize``,
``msfp::quantize_folded`` and ``msfp::dequantize_packed``, so a quantized fx GraphModule (or the module of a
``torch.export`` program) runs on the GPU unchanged. ``TritonRunner`` additionally rewrites each
quantized ``aten.linear`` / ``aten.conv2d`` (4-bit weight on a get_attr + per-tensor activation quantizer, both
formats exact in FP8) into the fused W4A4 GEMM on FP8 tensor cores. Nothing here imports diffusers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from msfp_compiler.ops import DEQUANTIZE_PACKED, QUANTIZE, QUANTIZE_FOLDED, get_format, unpack_codes
from msfp_compiler.sampling import BETA_END, BETA_START, TorchDDIM, sample
from msfp_compiler.talora import SELECT_WEIGHT, chosen_set

from . import kernels as K
from .fast_ops import conv_out_size
from .graphed import GraphedStep, PerShape

__all__ = ["register_cuda_kernels", "TritonRunner", "W4A4Linear", "W4A4Conv2d", "GatedW4A4Linear", "load_pt2",
           "sample_ddim", "quantize_grid_fp8"]

aten = torch.ops.aten
_FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------------------------
# CUDA implementations of the msfp ops
# ----------------------------------------------------------------------------------------------------------------


def _reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, folded: bool) -> torch.Tensor:
    """The ops.py math on any device (dtypes the kernel does not take, e.g. float64)."""
    q = get_format(fmt).round_to_grid((x - zero_point) / scale) * scale
    return torch.empty_like(x).copy_(q if folded else zero_point + q)


def _quantize_cuda(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or scale.dtype != torch.float32:
        return _reference(x, scale, zero_point, fmt, folded=False)
    return K.quantize(x, scale, zero_point, fmt, K.OUT_FAKE)


def _quantize_folded_cuda(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or scale.dtype != torch.float32:
        return _reference(x, scale, zero_point, fmt, folded=True)
    return K.quantize(x, scale, zero_point, fmt, K.OUT_FOLDED)


def _dequantize_packed_cuda(packed: torch.Tensor, scale: torch.Tensor, fmt: str, shape: list[int]) -> torch.Tensor:
    return K.unpack(packed, fmt, shape, scale, torch.float32)


_REGISTERED = False


def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA implementation of the msfp ops (idempotent; done on import)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_kernel("msfp::quantize", "cuda", _quantize_cuda)
    torch.library.register_kernel("msfp::quantize_folded", "cuda", _quantize_folded_cuda)
    torch.library.register_kernel("msfp::dequantize_packed", "cuda", _dequantize_packed_cuda)
    _REGISTERED = True


register_cuda_kernels()


def quantize_grid_fp8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str,
                      nhwc: bool = False) -> torch.Tensor:
    """Grid values of x's quantization as E4M3: the A operand of the W4A4 GEMM. x's layout, or NHWC memory for a
    4-D conv input (``nhwc=True``)."""
    if nhwc:
        return K.quantize_nhwc_fp8(x, scale, zero_point, fmt)
    return K.quantize(x, scale, zero_point, fmt, K.OUT_GRID, out_dtype=_FP8)


# ----------------------------------------------------------------------------------------------------------------
# Fused layers
# ----------------------------------------------------------------------------------------------------------------


class W4A4Linear(torch.nn.Module):
    """y = linear(quantize(x), W_q, b) from the activation's E4M3 grid values: one FP8 GEMM, epilogue does the rest."""

    def __init__(self, wp: K.WeightPack, precise: bool = False):
        super().__init__()
        self.wp, self.precise = wp, precise

    def _apply(self, fn, recurse=True):  # noqa: D401  (.to()/.cuda() also move the weight pack)
        self.wp = _map_pack(self.wp, fn)
        return super()._apply(fn, recurse)

    def forward(self, a_q: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                set_index: torch.Tensor | None = None, row_sets: torch.Tensor | None = None) -> torch.Tensor:
        a = a_q.reshape(-1, self.wp.k)
        if a.stride(1) != 1 or a.stride(0) != self.wp.k:
            a = a.view(torch.uint8).contiguous().view(_FP8)
        y = K.w4a4_gemm(a, self.wp, out_dtype=out_dtype, set_index=set_index, row_sets=row_sets,
                        precise=self.precise)
        return y.view(*a_q.shape[:-1], self.wp.n)


class W4A4Conv2d(torch.nn.Module):
    """conv2d(quantize(x), W_q, b) as an FP8 GEMM over NHWC E4M3 activations, written straight to NCHW.

    The GEMM reads im2col rows on the fly (implicit GEMM, K ordered kh, kw, c) when C is a multiple of 32, else from
    an explicit im2col copy. Padding holds code 0 (+0.0); what the padded border contributes in the original graph
    (the activation zero point on the valid positions, or the constant of an explicit pad) is a per-position map
    ``zmap = conv(P, W_deq)`` ([S, N, L] for S weight sets, w_deq [S, N, C, kh, kw]), cached per input size.
    """

    def __init__(self, wp: K.WeightPack, kernel: tuple[int, int], stride: tuple[int, int],
                 pads: tuple[int, int, int, int], w_deq: torch.Tensor | None, z_valid: float, z_pad: float,
                 precise: bool = False):
        super().__init__()
        self.wp, self.kernel, self.stride, self.pads, self.precise = wp, kernel, stride, pads, precise
        self.w_deq, self.z_valid, self.z_pad = w_deq, z_valid, z_pad
        self._zmaps: dict[tuple[int, int], torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        self.wp = _map_pack(self.wp, fn)
        if self.w_deq is not None:
            self.w_deq = fn(self.w_deq)
        self._zmaps = {}
        return super()._apply(fn, recurse)

    def _zmap(self, c: int, h: int, w: int) -> torch.Tensor | None:
        if self.w_deq is None:
            return None
        key = (h, w)
        if key not in self._zmaps:
            left, right, top, bottom = self.pads
            p = torch.full((1, c, h + top + bottom, w + left + right), self.z_pad, dtype=torch.float64,
                           device=self.w_deq.device)
            p[:, :, top:top + h, left:left + w] = self.z_valid
            wd = self.w_deq.double()
            zm = F.conv2d(p, wd.reshape(-1, *wd.shape[2:]), stride=self.stride)  # sets stacked as channels
            self._zmaps[key] = zm.reshape(wd.shape[0], wd.shape[1], -1).float().contiguous()
        return self._zmaps[key]

    def forward(self, a_q: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                set_index: torch.Tensor | None = None) -> torch.Tensor:
        """a_q: E4M3 grid values [B, C, H, W] in NHWC memory (quantize_grid_fp8(..., nhwc=True))."""
        b, c, h, w = a_q.shape
        kh, kw = self.kernel
        sh, sw = self.stride
        left, right, top, bottom = self.pads
        ho, wo = conv_out_size(h, w, [kh, kw], [sh, sw], [left, right, top, bottom])
        n, L = self.wp.n, ho * wo
        out = torch.empty(b, n, ho, wo, dtype=out_dtype, device=a_q.device)
        layout = (L, n * L, 1, L)
        zmap = self._zmap(c, h, w)
        nhwc = a_q.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        if kh == kw == sh == sw == 1 and not any(self.pads):  # 1x1: the NHWC activation is the A matrix
            K.w4a4_gemm(nhwc.view(-1, c), self.wp, out=out, out_layout=layout, zmap=zmap, set_index=set_index,
                        precise=self.precise)
        elif c % 32 == 0:
            geom = K.ConvGeom(h, w, c, kh, kw, sh, sw, top, left, ho, wo)
            K.w4a4_gemm(nhwc.permute(0, 3, 1, 2), self.wp, out=out, out_layout=layout, zmap=zmap, conv=geom,
                        set_index=set_index, precise=self.precise)
        else:  # explicit im2col in the same (kh, kw, c) order, padding E4M3 +0.0: the fast path's op
            cols = torch.ops.msfp_fast.im2col_e4m3(nhwc.view(_FP8), [kh, kw], [sh, sw], [left, right, top, bottom])
            K.w4a4_gemm(cols, self.wp, out=out, out_layout=layout, zmap=zmap, set_index=set_index,
                        precise=self.precise)
        return out


class GatedW4A4Linear(torch.nn.Module):
    """TALoRA linear: S stacked quantized weight sets (W_k = Q(W + B_k A_k)), one chosen per batch row or per call.

    ``forward(a_q, sel)``: ``sel`` [B] set index per batch sample (rows of a sample share it); or ``timestep`` [B]
    through the router's resolved ``table`` (t -> k). ``per_call=True`` takes the first sample's choice for the whole
    batch (the usual case: one timestep per sampler step) and runs the plain GEMM on that set, with no host sync.
    """

    def __init__(self, wp: K.WeightPack, table: torch.Tensor | None = None, precise: bool = False):
        super().__init__()
        self.lin = W4A4Linear(wp, precise)
        self.register_buffer("table", table.to(torch.int32) if table is not None else None)

    def forward(self, a_q: torch.Tensor, sel: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                per_call: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if sel is None:
            if timestep is None or self.table is None:
                raise ValueError("GatedW4A4Linear needs sel, or timestep and a table")
            sel = self.table[timestep.long()]
        sel = sel.to(torch.int32).reshape(-1)
        if per_call:
            return self.lin(a_q, out_dtype, set_index=sel[:1])
        rows_per = a_q.numel() // (a_q.shape[-1] * sel.numel())
        return self.lin(a_q, out_dtype, row_sets=sel.repeat_interleave(rows_per))


def _map_pack(wp: K.WeightPack, fn: Callable[[torch.Tensor], torch.Tensor]) -> K.WeightPack:
    # fn is nn.Module._apply's per-tensor function: keep dtypes (a dtype cast would corrupt the codes).
    def move(t: torch.Tensor) -> torch.Tensor:
        moved = fn(t)
        return moved if moved.dtype == t.dtype else t.to(moved.device)

    return K.WeightPack(move(wp.w), move(wp.alpha), move(wp.beta), wp.n, wp.k, wp.decode, wp.w_shift, wp.lut)


# ----------------------------------------------------------------------------------------------------------------
# Graph rewriting
# ----------------------------------------------------------------------------------------------------------------


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _const(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    return _attr(gm, node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


@dataclass
class _Act:
    x: fx.Node
    quant: fx.Node
    scale: torch.Tensor
    zero_point: torch.Tensor
    fmt: str
    folded: bool


@dataclass
class FuseReport:
    """What the runner fused and why the rest was left to the per-op kernels."""

    fused: dict[str, int] = field(default_factory=lambda: {"linear": 0, "conv2d": 0})
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused linear={self.fused['linear']} conv2d={self.fused['conv2d']}"]
        lines += [f"  kept {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


def _match_act(gm: fx.GraphModule, node: Any) -> _Act | str:
    if isinstance(node, fx.Node) and node.meta.get("msfp_split_cat"):
        # one scale per part (QuantConfig.split_concat): the fused GEMM takes one per-tensor activation scale
        return "activation is a concatenation quantized per part"
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in (QUANTIZE, QUANTIZE_FOLDED):
        return "activation is not quantized"
    x, s_n, z_n, fmt = node.args
    s, z = _const(gm, s_n), _const(gm, z_n)
    if s is None or z is None:
        return "activation scale/zero point not constant"
    if s.numel() != 1 or z.numel() != 1:
        return "activation quantizer not per tensor"
    if not K.fp8_exact(fmt):
        return f"activation format {fmt} not exact in FP8"
    s, z = s.detach().float().reshape(()), z.detach().float().reshape(())
    return _Act(x, node, s, z, fmt, node.target == QUANTIZE_FOLDED)


@dataclass
class _Weight:
    codes: torch.Tensor  # uint8 [S, N, ...]: S weight sets (S > 1: TALoRA, selected per call)
    scale: torch.Tensor  # float32 [S, N]
    fmt: str
    select: fx.Node | None  # the msfp::select_weight node choosing the set per call (None: one set)

    def deq(self) -> torch.Tensor:
        """Dequantized weights [S, N, ...] in float32, as the graph's dequantize/quantize computes them."""
        table = get_format(self.fmt).code_table
        return table[self.codes.long()] * self.scale.reshape(*self.scale.shape, *([1] * (self.codes.dim() - 2)))


def _match_one_weight(gm: fx.GraphModule, node: Any) -> tuple[torch.Tensor, torch.Tensor, str] | str:
    """(codes uint8 of the weight's shape, scale [N] or [1], fmt) of one 4-bit weight operand."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return "weight is not quantized"
    if node.target == DEQUANTIZE_PACKED:
        p_n, s_n, fmt, shape = node.args
        p, s = _const(gm, p_n), _const(gm, s_n)
        if p is None or s is None:
            return "packed weight not constant"
        codes = unpack_codes(p.detach(), math.prod(shape)).reshape(shape)
    elif node.target == QUANTIZE:
        w_n, s_n, z_n, fmt = node.args
        w, s, z = _const(gm, w_n), _const(gm, s_n), _const(gm, z_n)
        if w is None or s is None or z is None:
            return "weight/scale not constant"
        if bool((z != 0).any()):
            return "weight has a zero point"
        f = get_format(fmt)
        if f.bits != 4:
            return f"weight format {fmt} is not 4-bit"
        codes = f.encode(f.round_to_grid(w.detach().float() / s.detach().float()))
    else:
        return "weight is not quantized"
    if not K.fp8_exact(fmt) or get_format(fmt).bits != 4:
        return f"weight format {fmt} not 4-bit FP8-exact"
    s = s.detach().float()
    if s.numel() not in (1, codes.shape[0]):
        return "weight scale is not per output channel"
    return codes, s.reshape(-1), fmt


def _match_weight(gm: fx.GraphModule, node: Any) -> _Weight | str:
    """A 4-bit weight, or fuse_talora's per-call choice ``msfp::select_weight(table, timestep, [W_k...])``."""
    select = None
    parts: list[Any] = [node]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == SELECT_WEIGHT:
        select, parts = node, list(node.args[2])
    matched = [_match_one_weight(gm, p) for p in parts]
    for m in matched:
        if isinstance(m, str):
            return m
    fmts = {m[2] for m in matched}  # type: ignore[index]
    shapes = {tuple(m[0].shape) for m in matched}  # type: ignore[index]
    if len(fmts) != 1 or len(shapes) != 1:
        return "weight sets differ in format or shape"
    codes = torch.stack([m[0] for m in matched])  # type: ignore[index]
    n = codes.shape[1]
    scale = torch.stack([m[1].expand(n) for m in matched])  # type: ignore[index]
    return _Weight(codes, scale, fmts.pop(), select)


def _input_pad(node: fx.Node) -> tuple[Any, tuple[int, int, int, int], float] | str:
    """(activation node, explicit spatial pads, pad value) of a conv whose input may be an explicit constant_pad_nd
    (fold_zero_point's border: pad(quantize_folded(x), value=-z) feeding an unpadded conv; pads left, right, top,
    bottom)."""
    inp = node.args[0]
    if isinstance(inp, fx.Node) and inp.target == aten.constant_pad_nd.default:
        pad_arg = [int(p) for p in inp.args[1]]
        if len(pad_arg) != 4:
            return "explicit pad is not spatial"
        return inp.args[0], tuple(pad_arg), float(inp.args[2]) if len(inp.args) > 2 else 0.0  # type: ignore
    return inp, (0, 0, 0, 0), 0.0


def _match_weight_bias(gm: fx.GraphModule, args: Sequence[Any]) -> tuple[_Weight, torch.Tensor | None] | str:
    """The 4-bit weight and the constant float32 bias (or None) of a ``linear``/``conv2d`` call, or why not."""
    w = _match_weight(gm, args[1])
    if isinstance(w, str):
        return w
    has_bias = len(args) > 2 and args[2] is not None
    bias = _const(gm, args[2]) if has_bias else None
    if has_bias and bias is None:
        return "bias not constant"
    return w, bias.detach().float() if bias is not None else None


class _Gemm(NamedTuple):
    """A ``linear``/``conv2d`` call the GEMM kernels can run: its quantized activation, 4-bit weight, constant bias
    and, for a conv, fold_zero_point's explicit border (pads left, right, top, bottom; the pad value)."""

    act: _Act
    w: _Weight
    bias: torch.Tensor | None
    pads: tuple[int, int, int, int]
    z_pad: float


def _match_gemm(gm: fx.GraphModule, node: fx.Node, kind: str) -> _Gemm | str:
    """The operands of a ``linear``/``conv2d`` (``kind``) call for a W4A4 GEMM, or why not (the Triton runner and the
    fast path match the same pattern)."""
    padded = _input_pad(node) if kind == "conv2d" else (node.args[0], (0, 0, 0, 0), 0.0)
    if isinstance(padded, str):
        return padded
    inp, pads, z_pad = padded
    act = _match_act(gm, inp)
    if isinstance(act, str):
        return act
    wb = _match_weight_bias(gm, node.args)
    if isinstance(wb, str):
        return wb
    return _Gemm(act, wb[0], wb[1], pads, z_pad)


def conv_geometry(args: Sequence[Any], codes: torch.Tensor, pads: tuple[int, ...]
                  ) -> tuple[list[int], tuple[int, ...]] | str:
    """(stride, F.pad-order padding) of an ``aten.conv2d`` call the fused kernels take, or why not.

    ``pads`` is an explicit ``constant_pad_nd`` in front of the conv (FoldZeroPoint(pad_convs=True)); a conv may
    have that or its own padding, not both."""
    stride, padding, dilation, groups = (list(args[3]) if len(args) > 3 else [1, 1],
                                         list(args[4]) if len(args) > 4 else [0, 0],
                                         list(args[5]) if len(args) > 5 else [1, 1],
                                         args[6] if len(args) > 6 else 1)
    if groups != 1 or any(d != 1 for d in dilation) or codes.dim() != 5:
        return "grouped/dilated conv"
    stride = stride * 2 if len(stride) == 1 else stride
    padding = padding * 2 if len(padding) == 1 else padding
    if any(padding) and any(pads):
        return "explicit pad and conv padding together"
    if any(padding):
        pads = (padding[1], padding[1], padding[0], padding[0])
    return stride, pads


class TritonRunner:
    """Runs a quantized GraphModule on the GPU: msfp ops through Triton, quantized linear/conv as W4A4 FP8 GEMMs.

    ``weight_mode``: "fp8" decodes the 4-bit codes once at load into E4M3 (twice the bytes of the codes, and about
    twice as fast on large layers: see docs/triton.md), "packed" keeps 4-bit codes in GPU memory and decodes them
    inside the GEMM. ``fuse=False`` keeps the graph as is (fake quantization on the GPU, FP32 layers).
    ``cuda_graphs``: capture one CUDA graph per input signature (``graphed.PerShape`` of ``graphed.GraphedStep``)
    and replay it; this removes the Python launch cost of the ~3 kernels per layer, which dominates small batches.
    The module is copied unless ``inplace``.
    """

    def __init__(self, gm: fx.GraphModule, device: str | torch.device = "cuda", fuse: bool = True,
                 weight_mode: str = "fp8", precise: bool = False, inplace: bool = False, cuda_graphs: bool = False):
        self.device = torch.device(device)
        self.gm = gm if inplace else copy.deepcopy(gm)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = PerShape(lambda example: GraphedStep(self.gm, self.gm, example))
        self.report = FuseReport()
        if fuse:
            self._fuse(weight_mode, precise)
        self._to_device()

    # -- graph surgery ------------------------------------------------------------------------------------------

    def _grid_node(self, cache: dict[tuple[fx.Node, bool], fx.Node], act: _Act, nhwc: bool) -> fx.Node:
        """One E4M3 quantization per quantizer and layout, shared by every fused layer that reads it."""
        g = self.gm.graph
        key = (act.quant, nhwc)
        if key not in cache:
            s_n, z_n = act.quant.args[1], act.quant.args[2]
            with g.inserting_after(act.quant):
                cache[key] = g.call_function(quantize_grid_fp8, (act.x, s_n, z_n, act.fmt, nhwc))
        return cache[key]

    def _fuse(self, weight_mode: str, precise: bool) -> None:
        gm, g = self.gm, self.gm.graph
        grid: dict[tuple[fx.Node, bool], fx.Node] = {}
        for node in list(g.nodes):
            if node.op != "call_function" or node.target not in (aten.linear.default, aten.conv2d.default):
                continue
            kind = "linear" if node.target == aten.linear.default else "conv2d"
            why = self._fuse_one(node, kind, grid, weight_mode, precise)
            if why:
                self.report.skipped[node.name] = why
            else:
                self.report.fused[kind] += 1
        g.eliminate_dead_code()
        gm.recompile()

    def _fuse_one(self, node: fx.Node, kind: str, grid: dict, weight_mode: str, precise: bool) -> str | None:
        gm, g = self.gm, self.gm.graph
        args = list(node.args)
        match = _match_gemm(gm, node, kind)
        if isinstance(match, str):
            return match
        act, w, bias, pads, z_pad = match
        sets, n = w.codes.shape[:2]
        if kind == "linear":
            if w.codes.dim() != 3:
                return "linear weight is not 2-D"
            wp = K.pack_weight(w.codes, w.scale, w.fmt, act.scale, act.zero_point, bias, zp_in_bias=act.folded,
                               mode=weight_mode)
            mod: torch.nn.Module = W4A4Linear(wp, precise)
        else:
            geom = conv_geometry(args, w.codes, pads)
            if isinstance(geom, str):
                return geom
            stride, pads = geom
            flat = w.codes.permute(0, 1, 3, 4, 2).reshape(sets, n, -1)  # K as (kh, kw, c): NHWC im2col order
            z_valid = 0.0 if act.folded else float(act.zero_point)
            if any(pads):
                # the border's contribution varies with position: zmap from W_deq, bias alone in beta
                wp = K.pack_weight(flat, w.scale, w.fmt, act.scale, 0.0, bias, zp_in_bias=True, mode=weight_mode)
                w_deq = w.deq() if (z_valid != 0.0 or z_pad != 0.0) else None
            else:
                wp = K.pack_weight(flat, w.scale, w.fmt, act.scale, act.zero_point, bias, zp_in_bias=act.folded,
                                   mode=weight_mode)
                w_deq = None
            mod = W4A4Conv2d(wp, tuple(w.codes.shape[3:]), tuple(stride), pads, w_deq, z_valid, z_pad, precise)
        name = f"msfp_w4a4_{node.name}"
        gm.add_submodule(name, mod)
        a_node = self._grid_node(grid, act, nhwc=kind == "conv2d")
        with g.inserting_before(node):
            kwargs = {}
            if w.select is not None:  # the set index, int64 [1]: table[timestep[0]]
                kwargs["set_index"] = g.call_function(chosen_set, tuple(w.select.args[:2]))
            new = g.call_module(name, (a_node,), kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return None

    def _to_device(self) -> None:
        gm = self.gm.to(self.device)
        for node in gm.graph.nodes:  # plain tensor attributes (lifted constants) are not moved by .to()
            if node.op == "get_attr":
                *path, leaf = node.target.split(".")
                owner = _attr(gm, ".".join(path)) if path else gm
                val = getattr(owner, leaf)
                if isinstance(val, torch.Tensor) and val.device != self.device:
                    setattr(owner, leaf, val.to(self.device))
            # factories traced with device=cpu (e.g. the timestep embedding's arange) must follow the graph
            if "device" in node.kwargs and isinstance(node.kwargs["device"], torch.device) \
                    and node.kwargs["device"] != self.device:
                node.kwargs = {**node.kwargs, "device": self.device}
        gm.recompile()
        self.gm = gm

    # -- running ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mv = lambda a: a.to(self.device) if isinstance(a, torch.Tensor) else a  # noqa: E731
        args = tuple(mv(a) for a in args)
        if not self.cuda_graphs or kwargs:
            return self.gm(*args, **{k: mv(v) for k, v in kwargs.items()})
        out = self.graphs(*args)  # the captured step's own buffers: a copy survives the next replay
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def load_pt2(path: str) -> fx.GraphModule:
    """The quantized program written by ``torch.export.save`` (``CompiledModel.save_pt2``) as a GraphModule."""
    return torch.export.load(path).module()


# ----------------------------------------------------------------------------------------------------------------
# DDIM sampling (no diffusers on the device: msfp_compiler.sampling's TorchDDIM)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(model: Callable[..., torch.Tensor], shape: Sequence[int], steps: int = 50, seed: int = 0,
                cond: torch.Tensor | None = None, device: str | torch.device = "cuda", eta: float = 0.0,
                clip_sample: bool = True, set_alpha_to_one: bool = True, num_train_timesteps: int = 1000,
                beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """DDIM with diffusers' defaults (``TorchDDIM``). ``model(x, t[, cond]) -> eps`` with t int64 [B]. The initial
    noise comes from a CPU generator seeded with ``seed`` (same draws as the project's torch reference sampler);
    returns x_0 on device.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(torch.device(device))
    sched = TorchDDIM(num_train_timesteps, beta_start, beta_end, clip_sample, set_alpha_to_one)
    eps_fn = model if cond is None else (lambda xt, tt: model(xt, tt, cond))
    return sample(eps_fn, x, sched, steps, eta, torch.Generator().manual_seed(seed + 1))
