"""tools/w4a4_levers_mnist.py: the lever quantizers (block scales, Hadamard rotation, two-term residual) and the
graph swap they are measured through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

lev = pytest.importorskip("w4a4_levers_mnist")


def test_e4m3_rounding_matches_torch_float8_in_the_normal_range() -> None:
    s = torch.logspace(-5, 8, 2001, base=2.0)
    assert torch.equal(lev.e4m3(s), s.to(torch.float8_e4m3fn).float())


def test_block_rotation_is_orthonormal_and_its_own_inverse() -> None:
    x = torch.randn(2, 64, 3, 3)
    y = lev.rotate(x, 1)
    assert torch.allclose(lev.rotate(y, 1), x, atol=1e-5)
    assert torch.allclose(y.norm(), x.norm(), rtol=1e-5)
    assert not torch.allclose(y, x)  # it does mix channels
    with pytest.raises(ValueError, match="multiple of the block size"):
        lev.rotate(torch.randn(1, 48), -1)


def test_nvfp4_blocks_scale_each_position_and_16_channels_on_their_own() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 32, 2, 2)
    x[0, :16, 0, 0] *= 100.0  # one block of one position much larger than the rest
    q = lev.BlockQuant("nvfp4", "e2m1", 0.0, dim=1)(x)
    err = (q - x).abs()
    assert float(err[0, 16:, 0, 0].max()) < 1.0  # the other block at that position keeps its own small scale
    assert float(err[0, :, 1:, :].max()) < 1.0
    # a block lands on E2M1 levels times one E4M3 scale: at most 8 distinct magnitudes
    blk = q[0, 16:, 1, 1].abs().unique()
    assert blk.numel() <= 8
    per_tensor = lev.StaticQuant("e2m1", float(x.abs().max()) / 6, 0.0)(x)
    # away from the outlier block, one per-tensor scale rounds everything to 0; the blocks keep the values
    assert (q - x)[0, :, 1:].pow(2).mean() < (per_tensor - x)[0, :, 1:].pow(2).mean() / 10


def test_unsigned_msfp_blocks_keep_the_zero_point_and_mxfp4_scales_are_powers_of_two() -> None:
    x = torch.nn.functional.silu(torch.randn(4, 64) * 3)
    q = lev.BlockQuant("nvfp4-msfp", "ue2m2", -0.2785, dim=-1)(x)
    assert float(q.min()) >= -0.2785 - 1e-6  # nothing below the zero point: the unsigned grid starts there
    m = lev.BlockQuant("mxfp4", "e2m1", 0.0, dim=-1)
    assert m.size == 32
    qm = m(x)
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    expect = lev.parse_format("e2m1").round_to_grid(x.reshape(4, 2, 32) / scale[..., None]) * scale[..., None]
    assert torch.equal(qm.reshape(4, 2, 32), expect)


def test_rotated_weight_is_a_4bit_weight_in_the_rotated_basis() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 32, 3, 3)
    wq = lev.rotated_weight(w)
    v = lev.rotate(wq, 1)[0].reshape(-1).abs()  # one output channel: one scale, at most 8 magnitudes
    assert (v / v.max() * 1e3).round().unique().numel() <= 8  # (rounded: two float rotations leave ~1e-7)
    assert float((wq - w).norm() / w.norm()) < 0.2


def test_mse_clip_search_and_the_residual_term_lower_the_error() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 64, 4, 4)
    plain = lev.BlockQuant("nvfp4", "e2m1", 0.0, 1, size=16)
    searched = lev.BlockQuant("nvfp4", "e2m1", 0.0, 1, size=16, mse=True)
    res = lev.Residual(plain, lev.BlockQuant("nvfp4", "e2m1", 0.0, 1))
    e = {k: float((m(x) - x).pow(2).mean()) for k, m in (("plain", plain), ("mse", searched), ("res", res))}
    assert e["mse"] < e["plain"]
    assert e["res"] < e["plain"] / 20


def test_swap_uses_replaces_a_quantizer_for_one_reader_only() -> None:
    from msfp_compiler.ops import QUANTIZE

    g = fx.Graph()
    x = g.placeholder("x")
    s, z = g.get_attr("s"), g.get_attr("z")
    q = g.call_function(QUANTIZE, (x, s, z, "e2m1"))
    a = g.call_function(torch.neg, (q,))
    b = g.call_function(torch.abs, (q,))
    g.output((a, b))
    root = torch.nn.Module()
    root.register_buffer("s", torch.tensor(0.5))
    root.register_buffer("z", torch.tensor(0.0))
    gm = fx.GraphModule(root, g)
    inp = torch.linspace(-2, 2, 33)
    qa, qb = gm(inp)
    ident = torch.nn.Identity()
    ra, rb = lev.swap_uses(gm, {(q.name, a.name): ident})(inp)
    assert torch.allclose(ra, -inp, atol=0) and torch.equal(rb, qb)
    ra, rb = lev.swap_uses(gm, {(q.name, "*"): ident})(inp)
    assert torch.equal(rb, inp.abs())
    assert torch.equal(gm(inp)[0], qa)  # the original is untouched
