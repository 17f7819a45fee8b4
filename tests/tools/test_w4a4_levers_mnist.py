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


# ------------------------------------------------------------------------- tstep:K (timestep-dependent parameters)

class _Sched:
    """The two things step_groups reads of a scheduler: set_timesteps and timesteps (DDIM-50 spacing)."""

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.arange(n - 1, -1, -1) * (1000 // n)


def test_step_groups_are_contiguous_near_equal_runs_of_the_trajectory() -> None:
    ts, g5 = lev.step_groups(_Sched(), 50, 5)
    assert ts[:2] == [980, 960] and ts[-1] == 0
    assert g5 == [list(range(i, i + 10)) for i in range(0, 50, 10)]
    _, g3 = lev.step_groups(_Sched(), 50, 3)
    assert [len(g) for g in g3] == [17, 16, 17] and sum(g3, []) == list(range(50))
    _, g50 = lev.step_groups(_Sched(), 50, 50)
    assert g50 == [[i] for i in range(50)]
    with pytest.raises(ValueError, match="groups"):
        lev.step_groups(_Sched(), 4, 5)  # more groups than steps


def test_group_table_maps_each_timestep_to_its_group_and_others_to_the_nearest_step() -> None:
    ts, g50 = lev.step_groups(_Sched(), 50, 50)
    tab = lev.group_table(ts, g50)
    assert tab.shape == (1000,) and tab.dtype == torch.int64
    assert tab[torch.tensor(ts)].tolist() == list(range(50))
    assert int(tab[999]) == 0 and int(tab[983]) == 0 and int(tab[977]) == 0 and int(tab[969]) == 1 and int(tab[1]) == 49
    _, g5 = lev.step_groups(_Sched(), 50, 5)
    tab5 = lev.group_table(ts, g5)
    assert int(tab5[800]) == 0 and int(tab5[780]) == 1 and int(tab5[0]) == 4
    assert (tab5.diff() <= 0).all()  # later (smaller) timesteps never go to an earlier group


def test_one_group_reproduces_the_per_tensor_search() -> None:
    torch.manual_seed(3)
    per_step = [torch.nn.functional.silu(torch.randn(512) * (1 + i)) for i in range(6)]
    allv = torch.cat(per_step)
    for fmt in ("ue2m2", "e2m1"):
        s, z = lev.search_groups(fmt, per_step, [list(range(6))])
        ref = lev.sens_search.search_scale(lev.parse_format(fmt), allv[None], 40, 12, exact=False)
        assert s.shape == (1,) and torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)
        best = lev.search_best(allv[None], (fmt,))  # the tool's select_format-style search (recal lever)
        assert torch.equal(s, best[1]) and torch.equal(z, best[2])
    assert float(z) == 0.0  # signed: no zero point


def test_each_group_is_searched_on_its_own_steps_only() -> None:
    torch.manual_seed(4)
    per_step = [torch.randn(1024) * m for m in (1.0, 1.0, 4.0, 4.0)]
    s, _ = lev.search_groups("e2m1", per_step, [[0, 1], [2, 3]])
    assert 3.0 < float(s[1] / s[0]) < 5.0
    alone, _ = lev.search_groups("e2m1", per_step[2:], [[0, 1]])
    assert torch.equal(s[1], alone[0])


def test_timestep_quant_uses_the_parameters_of_the_timesteps_group() -> None:
    ts, g5 = lev.step_groups(_Sched(), 50, 5)
    scales, zps = torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6]), torch.tensor([-0.2, -0.1, 0.0, -0.3, -0.25])
    m = lev.TimestepQuant("ue2m2", lev.group_table(ts, g5), scales, zps)
    x = torch.linspace(-0.3, 5, 101)
    for t, g in ((980, 0), (800, 0), (780, 1), (420, 2), (0, 4)):
        want = lev.StaticQuant("ue2m2", float(scales[g]), float(zps[g]))(x)
        assert torch.equal(m(x, torch.full((4,), t)), want), t
    assert not torch.equal(m(x, torch.tensor([980])), m(x, torch.tensor([0])))


def test_swap_uses_feeds_the_graphs_timestep_to_a_timestep_quantizer() -> None:
    from msfp_compiler.ops import QUANTIZE

    g = fx.Graph()
    x, t = g.placeholder("sample"), g.placeholder("timestep")
    s, z = g.get_attr("s"), g.get_attr("z")
    g.output(g.call_function(torch.neg, (g.call_function(QUANTIZE, (x, s, z, "e2m1")),)))
    root = torch.nn.Module()
    root.register_buffer("s", torch.tensor(0.5))
    root.register_buffer("z", torch.tensor(0.0))
    gm = fx.GraphModule(root, g)
    qn = next(n.name for n in gm.graph.nodes if n.target is QUANTIZE)
    table = torch.tensor([0] * 500 + [1] * 500)
    tq = lev.TimestepQuant("e2m1", table, torch.tensor([0.25, 1.0]), torch.zeros(2))
    g2 = lev.swap_uses(gm, {(qn, "*"): tq})
    inp = torch.linspace(-2, 2, 17)
    assert torch.equal(g2(inp, torch.tensor([100])), -lev.StaticQuant("e2m1", 0.25, 0.0)(inp))
    assert torch.equal(g2(inp, torch.tensor([900])), -lev.StaticQuant("e2m1", 1.0, 0.0)(inp))


def test_spread_summary_reports_max_over_min_of_the_group_scales() -> None:
    params = {"a": {"block": "b3", "scales": [1.0, 2.0, 1.5], "compiled_scale": 1.5, "rms": [1.0, 1.1, 1.2]},
              "b": {"block": "b3", "scales": [3.0, 3.0, 3.0], "compiled_scale": 1.5, "rms": [2.0, 2.0, 2.0]},
              "c": {"block": "b0", "scales": [1.0, 4.0, 2.5], "compiled_scale": 2.5, "rms": [1.0, 3.0, 2.0]}}
    v = lev.spread_summary(params, "b3")
    assert v["block_quantizers"] == 2 and v["quantizers"] == 3
    assert v["max_ratio"] == 4.0 and v["block_max_ratio"] == 2.0 and v["median_ratio"] == 2.0
    assert v["median_mean_scale_over_compiled"] == 1.0 and abs(v["median_rms_ratio"] - 1.2) < 1e-6


def test_stochastic_rounding_is_unbiased_and_stays_on_the_neighbouring_grid_points() -> None:
    """sr: every output is the scaled grid point just below or just above the input, the mean over many draws is the
    input itself (round-to-nearest is off by up to half a step), and the range saturates like round-to-nearest."""
    q = lev.StochasticQuant("ue2m2", 0.5, -0.25)
    grid = q.z + q.fmt.grid * q.s
    x = torch.tensor([0.1, 0.37, 1.3, 2.0])
    draws = torch.stack([q(x) for _ in range(4000)])
    for j, v in enumerate(x):
        lo, hi = grid[grid <= v].max(), grid[grid >= v].min()
        assert set(draws[:, j].unique().tolist()) <= {float(lo), float(hi)}
        assert float(draws[:, j].mean()) == pytest.approx(float(v), abs=0.02 * float(hi - lo) + 1e-6)
    nearest = lev.StaticQuant("ue2m2", 0.5, -0.25)(x)
    assert float((nearest - x).abs().max()) > 0.05  # the test values are off-grid: the mean above could fail
    big = torch.tensor([-5.0, 100.0])
    assert torch.equal(q(big), lev.StaticQuant("ue2m2", 0.5, -0.25)(big))  # saturates to the grid's ends
