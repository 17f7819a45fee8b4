"""ops: torch.ops.msfp.* against the formats reference, STE gradients, strides, packing, torch.export opacity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msfp_compiler.formats import parse_format
from msfp_compiler.ops import dequantize_packed, get_format, pack_codes, unpack_codes

NAMES = ["e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4", "int8", "uint8"]
OPS = torch.ops.msfp


def _case(name: str, seed: int = 0, shape=(6, 40)):
    g = torch.Generator().manual_seed(seed)
    f = parse_format(name)
    x = torch.randn(*shape, generator=g) * 2
    s = torch.rand(shape[0], 1, generator=g) + 0.1
    z = torch.zeros(shape[0], 1) if f.signed else -torch.rand(shape[0], 1, generator=g) * 0.5
    return f, x, s, z


@pytest.mark.parametrize("name", NAMES)
def test_quantize_matches_formats(name: str) -> None:
    f, x, s, z = _case(name)
    got = OPS.quantize(x, s, z, name)
    assert torch.equal(got, f.quantize(x, s, z))
    # per-tensor scalars too
    got1 = OPS.quantize(x, torch.tensor(0.3), torch.tensor(0.0 if f.signed else -0.2), name)
    assert torch.equal(got1, f.quantize(x, torch.tensor(0.3), torch.tensor(0.0 if f.signed else -0.2)))


@pytest.mark.parametrize("name", ["e2m1", "ue3m1", "int4", "uint4"])
def test_ste_gradient_inside_one_outside_zero(name: str) -> None:
    f = parse_format(name)
    s, z = torch.tensor(0.5), torch.tensor(0.0 if f.signed else -0.25)
    lo, hi = float(z + s * f.min), float(z + s * f.max)
    inside = torch.linspace(lo, hi, 33)
    outside = torch.cat([torch.linspace(hi + 0.01, hi + 5, 8), torch.linspace(lo - 5, lo - 0.01, 8)])
    x = torch.cat([inside, outside]).requires_grad_(True)
    y = OPS.quantize(x, s, z, name)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad[: inside.numel()], torch.ones(inside.numel()))
    assert torch.equal(x.grad[inside.numel():], torch.zeros(outside.numel()))


@pytest.mark.parametrize("name", ["e2m1", "ue2m2", "int4"])
def test_scale_and_zero_point_gradients(name: str) -> None:
    f, x, s, z = _case(name, seed=3)
    s = s.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    y = OPS.quantize(x * 3, s, z, name)
    (y * torch.randn_like(y)).sum().backward()
    assert s.grad.shape == s.shape and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert z.grad.shape == z.shape and torch.isfinite(z.grad).all()
    # d q / d z is 1 exactly where x is clipped: with no clipped value the zero point gets no gradient
    z2 = torch.tensor(0.0 if f.signed else -0.1, requires_grad=True)
    small = torch.linspace(0.0, float(f.max) * 0.1, 16)
    OPS.quantize(small, torch.tensor(1.0), z2, name).sum().backward()
    assert float(z2.grad) == 0.0


def test_autograd_reaches_x_and_scale() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    s = torch.full((3, 1), 0.5, requires_grad=True)
    z = torch.zeros(3, 1)
    y = OPS.quantize(x, s, z, "e2m1")
    assert y.requires_grad
    gx, gs = torch.autograd.grad(y.sum(), (x, s))
    assert gx.shape == x.shape and gs.shape == s.shape


@pytest.mark.parametrize("name", ["e2m1", "ue3m1", "int4"])
def test_keeps_strides(name: str) -> None:
    f = parse_format(name)
    x = torch.randn(5, 7).t()  # non-contiguous
    assert not x.is_contiguous()
    s, z = torch.tensor(0.3), torch.tensor(0.0 if f.signed else -0.2)
    y = OPS.quantize(x, s, z, name)
    assert y.stride() == x.stride()
    assert torch.equal(y, f.quantize(x.contiguous(), s, z))
    x4 = torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1)  # channels-last-like layout
    y4 = OPS.quantize(x4, s, z, name)
    assert y4.stride() == x4.stride()
    yf = OPS.quantize_folded(x4, s, z, name)
    assert yf.stride() == x4.stride()


@pytest.mark.parametrize("name", ["ue2m2", "ue3m1", "ue4m0", "uint4", "e2m1", "int4"])
def test_quantize_folded_is_quantize_minus_zero_point(name: str) -> None:
    f, x, s, z = _case(name, seed=5)
    q = OPS.quantize(x, s, z, name)
    qf = OPS.quantize_folded(x, s, z, name)
    assert torch.equal(qf + z, q)  # same float ops: z + scale * grid value
    torch.testing.assert_close(qf, q - z, rtol=0, atol=1e-6)


@given(st.lists(st.integers(0, 15), min_size=0, max_size=257))
@settings(max_examples=200, deadline=None)
def test_pack_unpack_round_trip(codes: list[int]) -> None:
    c = torch.tensor(codes, dtype=torch.uint8)
    p = pack_codes(c)
    assert p.dtype == torch.uint8 and p.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_codes(p, len(codes)), c)
    if codes:
        assert int(p[0]) & 0xF == codes[0]  # element 2i in the low nibble
        if len(codes) > 1:
            assert int(p[0]) >> 4 == codes[1]


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 3), (3, 3, 3, 3), (7, 1, 3, 3)])
def test_pack_odd_lengths_and_shapes(shape) -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    p = pack_codes(c)
    n = c.numel()
    assert p.numel() == (n + 1) // 2
    if n % 2:
        assert int(p[-1]) >> 4 == 0  # pad nibble is zero
    assert torch.equal(unpack_codes(p, n).reshape(shape), c)


@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0", "int4"])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7), (3, 1, 1, 1)])
def test_dequantize_packed_equals_decode_times_scale(name: str, shape) -> None:
    f = get_format(name)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    scale = (torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) + 0.05)
    out = OPS.dequantize_packed(pack_codes(codes), scale, name, list(shape))
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.equal(out, f.decode(codes) * scale)
    assert torch.equal(dequantize_packed(pack_codes(codes), scale, name, list(shape)), out)


@pytest.mark.parametrize("name", ["e2m1", "e3m0", "int4"])
def test_packed_weight_equals_fake_quantized_weight(name: str) -> None:
    # what pack_weights relies on: encode(round(W / s)) decoded * s == quantize(W, s, 0)
    f = get_format(name)
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    s = w.reshape(6, -1).abs().amax(1).reshape(6, 1, 1, 1) / f.max * 0.8
    codes = f.encode(f.round_to_grid(w / s))
    out = OPS.dequantize_packed(pack_codes(codes), s, name, list(w.shape))
    assert torch.equal(out, OPS.quantize(w, s, torch.zeros(()), name))


def test_quantize_survives_torch_export_as_one_node() -> None:
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(0.25))
            self.register_buffer("z", torch.tensor(-0.1))

        def forward(self, x):
            return torch.ops.msfp.quantize(x * 2, self.s, self.z, "ue3m1") + 1

    x = torch.randn(2, 8)
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    ep = ep.run_decompositions({})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.msfp.quantize.default) == 1
    x3 = torch.randn(3, 8)
    assert torch.equal(ep.module()(x3), M()(x3))  # the exported batch dimension stays dynamic


def test_fake_impl_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5).t()
        y = OPS.quantize(x, torch.empty(()), torch.empty(()), "e2m1")
        assert y.shape == x.shape and y.stride() == x.stride()
        w = OPS.dequantize_packed(torch.empty(8, dtype=torch.uint8), torch.empty(4, 1), "e2m1", [4, 4])
        assert w.shape == (4, 4) and w.dtype == torch.float32
