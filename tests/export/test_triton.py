"""Triton runtime: bit-exact fake quantization, unpack, the W4A4 FP8 GEMM, gated TALoRA weights, the graph runner.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined) on small
shapes; with CUDA the same tests run on the GPU, plus the bench-size checks.
"""

from __future__ import annotations

import pytest
import torch

from .triton_env import CUDA, DEV  # first: sets TRITON_INTERPRET before the kernels are defined

import msfp_compiler  # noqa: E402,F401
from msfp_compiler.export.triton import kernels as K  # noqa: E402
from msfp_compiler.export.triton import runtime as R  # noqa: E402
from msfp_compiler.ops import get_format, pack_codes, unpack_codes  # noqa: E402

if not CUDA and not K.INTERPRET:
    pytest.skip("no CUDA and triton was imported before TRITON_INTERPRET could be set", allow_module_level=True)
FORMATS = ["e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]
# FP8 MMA on Hopper accumulates with fewer than fp32's bits unless promoted per K block (PRECISE); the interpreter
# computes the dot in float32.
GEMM_TOL = {False: 3e-3, True: 2e-4} if CUDA else {False: 1e-5, True: 1e-5}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32)
    return bool(torch.equal(ia, ib))


def _special_inputs(fmt: str, scale: float, zp: float) -> torch.Tensor:
    """Levels, exact midpoints and their float32 neighbours, saturation, +-0, inf, NaN, denormals, in x space."""
    f = get_format(fmt)
    lv = f.levels
    mids = (lv[1:] + lv[:-1]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    down = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
    v = torch.cat([lv, mids, up, down, torch.tensor([f.max * 1.01, f.max * 7, 1e-30, 1e-45])])
    v = torch.cat([v, -v])
    x = v * scale + zp  # power-of-two scale and dyadic zp: (x - zp) / scale recovers v exactly
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-45, -1e-45])
    return torch.cat([x, special])


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_bit_exact_per_tensor(fmt: str) -> None:
    zp = -0.25 if fmt.startswith("u") else 0.0
    gen = torch.Generator().manual_seed(0)
    cases = [(_special_inputs(fmt, 0.5, zp), 0.5, zp),
             (torch.randn(3000, generator=gen) * 4, 0.3711, -0.2785 if fmt.startswith("u") else 0.0),
             (torch.randn(3000, generator=gen) * 1e-3, 1.7e-4, 0.0)]
    for x, s, z in cases:
        s_t, z_t = torch.tensor(s), torch.tensor(z)
        for out_mode, op in ((K.OUT_FAKE, torch.ops.msfp.quantize), (K.OUT_FOLDED, torch.ops.msfp.quantize_folded)):
            ref = op(x, s_t, z_t, fmt)
            got = K.quantize(x.to(DEV), s_t.to(DEV), z_t.to(DEV), fmt, out_mode).cpu()
            assert _bits_equal(got, ref), f"{fmt} mode {out_mode}: {(got != ref).sum()} of {x.numel()} differ"


@pytest.mark.parametrize("fmt", ["e2m1", "ue4m0", "int4", "uint8"])
def test_quantize_table_path_matches(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The threshold-table form (fallback for formats the arithmetic form does not cover) is exact too."""
    import dataclasses

    orig = K.quant_spec
    monkeypatch.setattr(K, "quant_spec", lambda f: dataclasses.replace(orig(f), arith=False))
    zp = -0.25 if fmt.startswith("u") else 0.0
    x = torch.cat([_special_inputs(fmt, 0.5, zp), torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3])
    ref = torch.ops.msfp.quantize(x, torch.tensor(0.5), torch.tensor(zp), fmt)
    got = K.quantize(x.to(DEV), torch.tensor(0.5, device=DEV), torch.tensor(zp, device=DEV), fmt).cpu()
    assert _bits_equal(got, ref)


@pytest.mark.parametrize("fmt", ["e2m1", "e3m0", "ue3m1", "int4", "int8"])
def test_quantize_bit_exact_per_channel(fmt: str) -> None:
    gen = torch.Generator().manual_seed(1)
    unsigned = fmt.startswith("u")
    # weights [C, K] and conv weights [C, Ci, 3, 3] with [C, 1, ...] scales; activations [B, C, H, W] with [1, C, 1, 1]
    # the last two have rows of >= 1024 elements: the row-per-program form (scalar parameter loads)
    for shape, pshape in (((24, 40), (24, 1)), ((8, 3, 3, 3), (8, 1, 1, 1)), ((2, 6, 5, 5), (1, 6, 1, 1)),
                          ((3, 1100), (3, 1)), ((2, 3, 33, 33), (1, 3, 1, 1))):
        x = torch.randn(shape, generator=gen) * 2
        s = torch.rand(pshape, generator=gen) * 0.5 + 0.05
        z = -torch.rand(pshape, generator=gen) * 0.3 if unsigned else torch.zeros(pshape)
        x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e30])
        ref = torch.ops.msfp.quantize(x, s, z, fmt)
        got = K.quantize(x.to(DEV), s.to(DEV), z.to(DEV), fmt).cpu()
        assert _bits_equal(got, ref), f"{fmt} {shape}"
        # per-channel scale with a per-tensor zero point
        z0 = torch.tensor(-0.125 if unsigned else 0.0)
        assert _bits_equal(K.quantize(x.to(DEV), s.to(DEV), z0.to(DEV), fmt).cpu(), torch.ops.msfp.quantize(x, s, z0, fmt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_half_inputs_match_torch_promotion(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 6, 7, 7) * 2).to(dtype)
    for s, z, fmt in ((torch.tensor(0.37), torch.tensor(-0.2785), "ue3m1"), (torch.tensor(0.21), torch.tensor(0.0), "e2m1"),
                      (torch.rand(1, 6, 1, 1) + 0.1, torch.tensor(-0.1), "ue2m2")):
        ref = torch.ops.msfp.quantize(x, s, z, fmt)
        got = K.quantize(x.to(DEV), s.to(DEV), z.to(DEV), fmt).cpu()
        assert got.dtype == dtype and _bits_equal(got, ref), fmt


def test_quantize_layouts_keep_strides() -> None:
    x = torch.randn(2, 8, 5, 5)
    s, z = torch.tensor(0.25), torch.tensor(-0.125)
    for xv in (x.to(memory_format=torch.channels_last), x.transpose(2, 3), x[:, ::2]):
        ref = torch.ops.msfp.quantize(xv, s, z, "ue3m1")
        got = K.quantize(xv.to(DEV), s.to(DEV), z.to(DEV), "ue3m1")
        assert got.stride() == ref.stride() and _bits_equal(got.cpu(), ref)


def test_quantize_nhwc_fp8_matches_grid() -> None:
    x = torch.randn(2, 40, 5, 7) * 3
    x.view(-1)[:5] = torch.tensor([float("nan"), -float("nan"), float("inf"), -0.0, 1e-45])
    for fmt, z in (("e2m1", 0.0), ("ue3m1", -0.2785), ("int4", 0.0)):
        s, zt = torch.tensor(0.37), torch.tensor(z)
        got = R.quantize_grid_fp8(x.to(DEV), s.to(DEV), zt.to(DEV), fmt, nhwc=True)
        assert got.shape == x.shape and got.permute(0, 2, 3, 1).is_contiguous()
        ref = get_format(fmt).round_to_grid((x - zt) / s).to(torch.float8_e4m3fn)
        assert torch.equal(got.cpu().contiguous().view(torch.uint8), ref.view(torch.uint8)), fmt


def test_quantize_grid_fp8_values() -> None:
    """OUT_GRID in E4M3: exactly the grid values, i.e. (fake quantized - zp) / scale."""
    x = torch.randn(4000) * 3
    for fmt, z in (("e2m1", 0.0), ("ue4m0", -0.25), ("uint4", -0.5), ("e3m0", 0.0), ("int4", 0.0)):
        s, zt = torch.tensor(0.5), torch.tensor(z)
        grid = K.quantize(x.to(DEV), s.to(DEV), zt.to(DEV), fmt, K.OUT_GRID, out_dtype=torch.float8_e4m3fn).cpu()
        ref = get_format(fmt).round_to_grid((x - zt) / s)
        assert torch.equal(grid.float(), ref), fmt


@pytest.mark.parametrize("fmt", ["e1m2", "e2m1", "e3m0", "int4", "ue3m1"])
def test_unpack_matches_reference(fmt: str) -> None:
    gen = torch.Generator().manual_seed(2)
    for shape, per_channel in (((16, 33), True), ((5, 3, 3, 3), True), ((7, 9), False)):  # odd element counts too
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes)
        assert torch.equal(unpack_codes(packed, codes.numel()).reshape(shape), codes)
        s = (torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen) + 0.01) if per_channel else torch.tensor(0.3)
        ref = torch.ops.msfp.dequantize_packed(packed, s, fmt, list(shape))
        got = K.unpack(packed.to(DEV), fmt, shape, s.to(DEV)).cpu()
        assert _bits_equal(got, ref)
        got16 = K.unpack(packed.to(DEV), fmt, shape, s.to(DEV), torch.bfloat16).cpu()
        assert torch.equal(got16, ref.to(torch.bfloat16))
        raw = K.unpack(packed.to(DEV), fmt, shape, None, torch.float8_e4m3fn).cpu()
        assert torch.equal(raw.float(), get_format(fmt).decode(codes))


def _random_layer(n: int, k: int, wfmt: str, gen: torch.Generator, sets: int = 1):
    codes = torch.randint(0, 16, (sets, n, k), generator=gen, dtype=torch.uint8)
    ws = torch.rand(sets, n, generator=gen) * 0.05 + 0.01
    bias = torch.randn(n, generator=gen)
    w_deq = get_format(wfmt).decode(codes) * ws[..., None]  # float32, as dequantize_packed computes it
    return codes, ws, bias, w_deq


def _gemm_ref(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, afmt: str, w_deq: torch.Tensor,
              bias: torch.Tensor) -> torch.Tensor:
    """Fake-quant reference: float64 matmul of the dequantized operands."""
    xq = torch.ops.msfp.quantize(x, s, z, afmt)
    return xq.double() @ w_deq.double().T + bias.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("afmt,wfmt,mode", [("e2m1", "e2m1", "packed"), ("ue3m1", "e1m2", "packed"),
                                            ("uint4", "int4", "packed"), ("ue4m0", "e3m0", "fp8"),
                                            ("e1m2", "e2m1", "fp8"), ("ue2m2", "ue3m1", "packed")])
@pytest.mark.parametrize("precise", [False, True])
def test_w4a4_gemm_matches_fake_quant(afmt: str, wfmt: str, mode: str, precise: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    m, n, k = (300, 200, 330) if CUDA else (40, 24, 70)  # K odd multiple of 2, not of the block: masks + padding
    x = torch.randn(m, k, generator=gen)
    s, z = torch.tensor(0.4), torch.tensor(-0.2785 if afmt.startswith("u") else 0.0)
    codes, ws, bias, w_deq = _random_layer(n, k, wfmt, gen)
    ref = _gemm_ref(x, s, z, afmt, w_deq[0], bias)
    wp = K.pack_weight(codes[0].to(DEV), ws[0].to(DEV), wfmt, s, z, bias.to(DEV), mode=mode)
    assert wp.decode == (0 if mode == "fp8" else (2 if wfmt.startswith("u") else 1))
    a = R.quantize_grid_fp8(x.to(DEV), s.to(DEV), z.to(DEV), afmt)
    y = K.w4a4_gemm(a, wp, precise=precise).cpu()
    assert torch.isfinite(y).all()
    err = _rel(y, ref)
    assert err < GEMM_TOL[precise], f"rel err {err:.2e}"
    # a wrong epilogue (zero point term, scale) would be far off; make sure the check can fail
    assert _rel(y - z * w_deq[0].sum(1), ref) > 10 * GEMM_TOL[precise] or float(z) == 0.0


def test_w4a4_gemm_tma_path() -> None:
    """E4M3 weights through tensor descriptors (TMA on Hopper), including M/N/K tails and a chosen weight set."""
    gen = torch.Generator().manual_seed(11)
    m, n, k = (300, 200, 320) if CUDA else (40, 24, 64)
    cfg = K.GemmConfig(128, 128, 128, 8, 3, tma=True) if CUDA else K.GemmConfig(16, 16, 32, 1, 1, 2, tma=True)
    x = torch.randn(m, k, generator=gen)
    s, z = torch.tensor(0.4), torch.tensor(-0.2785)
    codes, ws, bias, w_deq = _random_layer(n, k, "e2m1", gen, sets=2)
    wp = K.pack_weight(codes.to(DEV), ws.to(DEV), "e2m1", s, z, bias.to(DEV), mode="fp8")
    a = R.quantize_grid_fp8(x.to(DEV), s.to(DEV), z.to(DEV), "ue3m1")
    y = K.w4a4_gemm(a, wp, config=cfg, set_index=torch.tensor([1], device=DEV)).cpu()
    assert _rel(y, _gemm_ref(x, s, z, "ue3m1", w_deq[1], bias)) < GEMM_TOL[False]


def test_w4a4_gemm_zero_point_folded_in_bias() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(33, 64, generator=gen)
    s, z = torch.tensor(0.3), torch.tensor(-0.25)
    codes, ws, bias, w_deq = _random_layer(20, 64, "e2m1", gen)
    folded_bias = bias + z * w_deq[0].double().sum(1).float()  # what fold_zero_point writes
    wp = K.pack_weight(codes[0].to(DEV), ws[0].to(DEV), "e2m1", s, z, folded_bias.to(DEV), zp_in_bias=True)
    y = K.w4a4_gemm(R.quantize_grid_fp8(x.to(DEV), s.to(DEV), z.to(DEV), "ue3m1"), wp).cpu()
    assert _rel(y, _gemm_ref(x, s, z, "ue3m1", w_deq[0], bias)) < GEMM_TOL[False]


def test_gated_talora_selects_weights_per_row_and_per_call() -> None:
    gen = torch.Generator().manual_seed(5)
    sets, b, l, n, k = 3, 5, 7 if not CUDA else 77, 24, 64  # rows per sample not a multiple of the row tile
    codes, ws, bias, w_deq = _random_layer(n, k, "e2m1", gen, sets)
    s, z = torch.tensor(0.35), torch.tensor(0.0)
    wp = K.pack_weight(codes.to(DEV), ws.to(DEV), "e2m1", s, z, bias.to(DEV))
    table = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1])  # router resolved to timestep -> set
    layer = R.GatedW4A4Linear(wp, table.to(DEV))
    x = torch.randn(b, l, k, generator=gen)
    a = R.quantize_grid_fp8(x.to(DEV), s.to(DEV), z.to(DEV), "e2m1")
    sel = torch.tensor([2, 0, 2, 1, 0])
    y = layer(a, sel=sel.to(DEV)).cpu()
    for i in range(b):
        ref = _gemm_ref(x[i], s, z, "e2m1", w_deq[sel[i]], bias)
        assert _rel(y[i], ref) < GEMM_TOL[False], f"sample {i} set {sel[i]}"
        wrong = _gemm_ref(x[i], s, z, "e2m1", w_deq[(sel[i] + 1) % sets], bias)
        assert _rel(y[i], wrong) > 0.1
    t = torch.tensor([5, 1, 3, 4, 0])
    y_t = layer(a, timestep=t.to(DEV)).cpu()
    for i in range(b):
        assert _rel(y_t[i], _gemm_ref(x[i], s, z, "e2m1", w_deq[table[t[i]]], bias)) < GEMM_TOL[False]
    y_call = layer(a, timestep=torch.full((b,), 3, device=DEV), per_call=True).cpu()
    assert _rel(y_call, _gemm_ref(x.reshape(-1, k), s, z, "e2m1", w_deq[1], bias).reshape(b, l, n)) < GEMM_TOL[False]


class _QNet(torch.nn.Module):
    """Quantized conv/linear stack written with the msfp ops, in the graph forms the compiler emits.

    conv1 (C=8) takes the explicit-im2col path, conv2/conv3 (C=32) the implicit GEMM, conv4 is 1x1.
    """

    def __init__(self, c: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.conv1 = torch.nn.Conv2d(c, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 32, 3, stride=2)
        self.conv4 = torch.nn.Conv2d(32, 16, 1)
        self.lin1 = torch.nn.Linear(16, 32)
        self.lin2 = torch.nn.Linear(16, 24)
        f = get_format("e2m1")
        for name in ("conv1", "conv2", "conv3", "conv4", "lin1", "lin2"):
            w = getattr(self, name).weight.detach()
            s = w.reshape(w.shape[0], -1).abs().amax(1).reshape(-1, *([1] * (w.dim() - 1))) / f.max
            self.register_buffer(f"{name}_ws", s)
            self.register_buffer(f"{name}_wz", torch.zeros(()))
        # conv2 weight ships packed (pack_weights), its activation uses quantize_folded + explicit pad
        codes = f.encode(f.round_to_grid(self.conv2.weight.detach() / self.conv2_ws))
        self.register_buffer("conv2_packed", pack_codes(codes))
        w2 = f.decode(codes) * self.conv2_ws
        self.register_buffer("conv2_fbias", self.conv2.bias.detach() - 0.2785 * w2.sum((1, 2, 3)))  # fold_zero_point
        for name, val in (("a1_s", 0.5), ("a1_z", -0.2785), ("a2_s", 0.4), ("a2_z", -0.2785), ("a3_s", 0.3),
                          ("a3_z", -0.25), ("a4_s", 0.6), ("a4_z", -0.25), ("a5_s", 0.4), ("a5_z", 0.0)):
            self.register_buffer(name, torch.tensor(val))
        self.register_buffer("noise", torch.randn(1, 32, 1, 1, generator=g) * 0.1)

    def _wq(self, name: str) -> torch.Tensor:
        mod = getattr(self, name)
        return torch.ops.msfp.quantize(mod.weight, getattr(self, f"{name}_ws"), getattr(self, f"{name}_wz"), "e2m1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, conv = torch.ops.msfp.quantize, torch.nn.functional.conv2d
        h = conv(q(x, self.a1_s, self.a1_z, "ue3m1"), self._wq("conv1"), self.conv1.bias, padding=1)
        h = torch.nn.functional.silu(h) + self.noise
        hq = torch.ops.msfp.quantize_folded(h, self.a2_s, self.a2_z, "ue3m1")
        hq = torch.ops.aten.constant_pad_nd(hq, [1, 1, 1, 1], 0.2785)
        w2 = torch.ops.msfp.dequantize_packed(self.conv2_packed, self.conv2_ws, "e2m1", [32, 32, 3, 3])
        h = conv(hq, w2, self.conv2_fbias) + h
        h = conv(q(h, self.a3_s, self.a3_z, "ue2m2"), self._wq("conv3"), self.conv3.bias, stride=2)
        h = conv(q(h, self.a5_s, self.a5_z, "e2m1"), self._wq("conv4"), self.conv4.bias)
        t = h.flatten(2).transpose(1, 2)  # [B, L, C]
        tq = q(t, self.a4_s, self.a4_z, "uint4")  # one quantizer shared by two linears
        return torch.cat([torch.nn.functional.linear(tq, self._wq("lin1"), self.lin1.bias),
                          torch.nn.functional.linear(tq, self._wq("lin2"), self.lin2.bias)], -1)


def _exported(batch: int = 2) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    net = _QNet().eval()
    x = torch.randn(batch, 8, 6, 6, generator=torch.Generator().manual_seed(7))
    ep = torch.export.export(net, (x,))
    return ep, x


@pytest.mark.parametrize("weight_mode", ["packed", "fp8"])
def test_runner_fuses_graph_and_matches_fake_quant(weight_mode: str, tmp_path) -> None:
    ep, x = _exported()
    path = tmp_path / "q.pt2"
    torch.export.save(ep, str(path))
    gm = R.load_pt2(str(path))
    ref = gm(x)
    runner = R.TritonRunner(gm, device=DEV, weight_mode=weight_mode)
    assert runner.report.fused == {"linear": 2, "conv2d": 4}, str(runner.report)
    targets = [n.target for n in runner.gm.graph.nodes if n.op == "call_function"]
    assert aten_conv not in targets and torch.ops.aten.linear.default not in targets
    assert targets.count(R.quantize_grid_fp8) == 5  # the shared linear quantizer runs once
    y = runner(x).cpu()
    assert y.shape == ref.shape
    err = _rel(y, ref)
    assert err < 10 * GEMM_TOL[False], f"rel err {err:.2e}"
    # unfused: the registered CUDA ops (or the CPU reference) give the fake-quant graph's values
    plain = R.TritonRunner(gm, device=DEV, fuse=False)
    assert _rel(plain(x).cpu(), ref) < 1e-5


aten_conv = torch.ops.aten.conv2d.default


class _TALoRANet(torch.nn.Module):
    """fuse_talora's graph form: K quantized weight sets, one chosen per call by msfp::select_weight."""

    def __init__(self, sets: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        f = get_format("e2m1")
        self.conv_w = torch.nn.Parameter(torch.randn(sets, 12, 8, 3, 3, generator=g) * 0.2)
        self.lin_w = torch.nn.Parameter(torch.randn(sets, 10, 12, generator=g) * 0.2)
        self.register_buffer("conv_b", torch.randn(12, generator=g))
        self.register_buffer("conv_s", self.conv_w.detach().abs().amax((0, 2, 3, 4)).reshape(12, 1, 1, 1) / f.max)
        self.register_buffer("lin_s", self.lin_w.detach().abs().amax((0, 2)).reshape(10, 1) / f.max)
        self.register_buffer("zero", torch.zeros(()))
        self.register_buffer("a_s", torch.tensor(0.3))
        self.register_buffer("a_z", torch.tensor(-0.2785))
        self.register_buffer("b_s", torch.tensor(0.5))
        self.register_buffer("table", torch.randint(0, sets, (1000,), generator=g))
        for k in range(sets):  # one buffer per set, as fuse_talora registers them
            self.register_buffer(f"conv_w{k}", self.conv_w.detach()[k].clone())
            self.register_buffer(f"lin_p{k}", pack_codes(f.encode(f.round_to_grid(self.lin_w.detach()[k] / self.lin_s))))
        self.sets = sets

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q, select = torch.ops.msfp.quantize, torch.ops.msfp.select_weight
        wc = [q(getattr(self, f"conv_w{i}"), self.conv_s, self.zero, "e2m1") for i in range(self.sets)]
        h = torch.nn.functional.conv2d(q(x, self.a_s, self.a_z, "ue3m1"), select(self.table, t, wc), self.conv_b,
                                       padding=1)
        wl = [torch.ops.msfp.dequantize_packed(getattr(self, f"lin_p{i}"), self.lin_s, "e2m1", [10, 12])
              for i in range(self.sets)]
        tq = q(h.flatten(2).transpose(1, 2), self.b_s, self.zero, "e2m1")
        return torch.nn.functional.linear(tq, select(self.table, t, wl))


def test_runner_fuses_talora_weight_sets() -> None:
    net = _TALoRANet().eval()
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(10))
    ep = torch.export.export(net, (x, torch.tensor([3, 3])))
    gm = ep.module()
    runner = R.TritonRunner(gm, device=DEV)
    assert runner.report.fused == {"linear": 1, "conv2d": 1}, str(runner.report)
    seen = set()
    for t in (0, 1, 2, 5, 17, 400, 999):
        tt = torch.tensor([t, t])
        k = int(net.table[t])
        seen.add(k)
        with torch.no_grad():
            ref = gm(x, tt)
        assert _rel(runner(x, tt).cpu(), ref) < 10 * GEMM_TOL[False], f"t={t} set {k}"
    assert len(seen) > 1, "the table should select several sets"


def test_sample_ddim_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (device image): reference unavailable")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    sched.set_timesteps(10)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + torch.sin(t.float() / 100).view(-1, 1, 1, 1)

    got = R.sample_ddim(model, (2, 1, 4, 4), steps=10, seed=3, device="cpu")
    x = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((2,), int(t))), t, x).prev_sample
    assert torch.allclose(got, x, atol=1e-6, rtol=0)


def test_runner_cuda_graphs_step_per_signature(monkeypatch) -> None:
    """TritonRunner(cuda_graphs=True) captures through graphed.PerShape / GraphedStep (here a CPU stand-in that, like
    the capture, returns one buffer it overwrites on every replay): one step per input signature, built from the
    runner's own graph, and every call returns a copy that the next replay leaves alone."""
    ep, x = _exported()
    built: list[tuple] = []

    class Replay:
        def __init__(self, fn, module, example: tuple):
            built.append(tuple(a.shape for a in example))
            self.fn, self.out = fn, None
            assert fn is module

        def __call__(self, *args: torch.Tensor) -> torch.Tensor:
            y = self.fn(*args)
            self.out = y.clone() if self.out is None else self.out.copy_(y)
            return self.out

    monkeypatch.setattr(R, "GraphedStep", Replay)
    eager = R.TritonRunner(ep.module(), device="cpu", fuse=False)
    graphed = R.TritonRunner(ep.module(), device="cpu", fuse=False)
    graphed.cuda_graphs = True  # what cuda_graphs=True sets on a CUDA device
    xs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    first = graphed(xs[0])
    second = graphed(xs[1])
    assert built == [(x.shape,)] and list(graphed.graphs.steps.values())[0].fn is graphed.gm
    assert torch.equal(first, eager(xs[0])) and torch.equal(second, eager(xs[1]))
    assert not torch.equal(first, second)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_runner_cuda_graphs_replay_fresh_inputs() -> None:
    ep, x = _exported()
    gm = ep.module()
    eager = R.TritonRunner(gm)
    graphed = R.TritonRunner(gm, cuda_graphs=True)
    for seed in (1, 2, 3):
        xi = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        a, b = graphed(xi).cpu(), eager(xi).cpu()
        assert torch.equal(a, b), f"seed {seed}"
    assert len(graphed.graphs.steps) == 1


@pytest.mark.skipif(not CUDA, reason="bench-size GPU checks need CUDA (CPU interpreter covers small shapes)")
def test_gpu_registered_ops_and_large_gemm() -> None:
    x = torch.randn(1 << 20) * 3
    s, z = torch.tensor(0.37), torch.tensor(-0.2785)
    assert _bits_equal(torch.ops.msfp.quantize(x.cuda(), s.cuda(), z.cuda(), "ue3m1").cpu(),
                       torch.ops.msfp.quantize(x, s, z, "ue3m1"))
    codes = torch.randint(0, 16, (256, 512), dtype=torch.uint8)
    ws = torch.rand(256, 1) + 0.01
    p = pack_codes(codes)
    assert _bits_equal(torch.ops.msfp.dequantize_packed(p.cuda(), ws.cuda(), "e2m1", [256, 512]).cpu(),
                       torch.ops.msfp.dequantize_packed(p, ws, "e2m1", [256, 512]))
    gen = torch.Generator().manual_seed(8)
    m = n = k = 4096
    x = torch.randn(m, k, generator=gen)
    codes, wsc, bias, w_deq = _random_layer(n, k, "e2m1", gen)
    sa, za = torch.tensor(0.4), torch.tensor(0.0)
    ref = _gemm_ref(x.cuda(), sa.cuda(), za.cuda(), "e2m1", w_deq[0].cuda(), bias.cuda())
    a = R.quantize_grid_fp8(x.cuda(), sa.cuda(), za.cuda(), "e2m1")
    for mode in ("packed", "fp8"):
        wp = K.pack_weight(codes[0].cuda(), wsc[0].cuda(), "e2m1", sa, za, bias.cuda(), mode=mode)
        for precise in (False, True):
            err = _rel(K.w4a4_gemm(a, wp, precise=precise), ref)
            assert err < GEMM_TOL[precise], f"{mode} precise={precise}: {err:.2e}"
