"""formats: exact grids, RNE rounding (ml_dtypes parity for E2M1), saturation, encode/decode, parsing."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from msfp_compiler.errors import MsfpError
from msfp_compiler.formats import ALL_4BIT, FP4_SIGNED, FP4_UNSIGNED, FPFormat, IntFormat, parse_format

NAMES = ["e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0", "int4", "uint4"]
E2M1 = FPFormat(2, 1)

# Magnitude levels, written out by hand from the ExMy definition (bias 2**(E-1)-1, subnormals at exponent 0).
EXPECTED_LEVELS = {
    "e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
    "e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
    "ue2m2": [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7],
    "ue3m1": [0, 0.125, 0.25, 0.375, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24],
    "ue4m0": [0] + [2.0 ** e for e in range(-6, 9)],
    "int4": list(range(8)),
    "uint4": list(range(16)),
}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def _ml_e2m1(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# grids


@pytest.mark.parametrize("name", NAMES)
def test_levels_and_grid_are_exact(name: str) -> None:
    f = parse_format(name)
    assert f.levels.tolist() == EXPECTED_LEVELS[name]
    assert f.bits == 4
    g = f.grid
    assert g.dtype == torch.float32
    assert torch.all(g[1:] > g[:-1]), "grid must be strictly increasing"
    if f.signed:
        assert g.tolist() == [-v for v in reversed(EXPECTED_LEVELS[name][1:])] + EXPECTED_LEVELS[name]
        assert f.min == -f.max
    else:
        assert g.tolist() == EXPECTED_LEVELS[name]
        assert f.min == 0.0
    assert f.max == EXPECTED_LEVELS[name][-1]
    assert f.code_table.numel() == 16


def test_format_families() -> None:
    assert [f.name for f in FP4_SIGNED] == ["e1m2", "e2m1", "e3m0"]
    assert [f.name for f in FP4_UNSIGNED] == ["ue2m2", "ue3m1", "ue4m0"]
    assert sorted(f.name for f in ALL_4BIT) == sorted(NAMES)
    assert all(f.signed for f in FP4_SIGNED) and not any(f.signed for f in FP4_UNSIGNED)


def test_e2m1_grid_matches_ml_dtypes_values() -> None:
    all_codes = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    assert sorted(set(all_codes.tolist())) == E2M1.grid.tolist()
    # Code order is the same as ml_dtypes' bit layout (sign bit = MSB), so encode/decode agree with it too.
    assert np.array_equal(E2M1.code_table.numpy(), all_codes)


# ---------------------------------------------------------------------------------------------------------------
# E2M1 vs ml_dtypes.float4_e2m1fn, bit for bit


def _dense_sweep() -> np.ndarray:
    parts = [np.linspace(-8, 8, (1 << 20) + 1, dtype=np.float32)]
    # Every 2**11-th float32 bit pattern of the whole finite range (all exponents, both signs).
    pats = np.arange(0, 1 << 32, 1 << 11, dtype=np.uint64).astype(np.uint32).view(np.float32)
    parts.append(pats[np.isfinite(pats)])
    # Every midpoint between grid values (the ties), its float32 neighbours, and the grid itself.
    g = E2M1.grid.numpy().astype(np.float64)
    mids = ((g[1:] + g[:-1]) / 2).astype(np.float32)
    for v in np.concatenate([mids, g.astype(np.float32)]):
        around = [v]
        lo = hi = v
        for _ in range(4):
            lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
            around += [lo, hi]
        parts.append(np.array(around, dtype=np.float32))
    special = [0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 0.25, -0.25, 0.2500001, -0.2499999, 5.0, -5.0, 6.0, 6.5,
               7.0, 7.99, 8.0, -8.0, 1e6, -1e6, 1e30, -1e30, 3.4028235e38, -3.4028235e38]
    parts.append(np.array(special, dtype=np.float32))
    return np.concatenate(parts)


def test_e2m1_equals_ml_dtypes_bit_for_bit() -> None:
    x = _dense_sweep()
    assert x.size > 2_000_000
    ours = E2M1.quantize(torch.from_numpy(x)).numpy()
    ref = _ml_e2m1(x)
    diff = np.nonzero(_bits(ours) != _bits(ref))[0]
    assert diff.size == 0, f"{diff.size} mismatches, first x={x[diff[:5]]}: ours {ours[diff[:5]]} ml {ref[diff[:5]]}"


def test_e2m1_ties_saturation_and_signed_zero() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0,  # ties -> even code
                      7.0, 100.0, -100.0, 3e38, -0.0, -0.1, 0.1], dtype=torch.float32)
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -2.0, -4.0, 6.0, 6.0, -6.0, 6.0, -0.0, -0.0, 0.0]
    got = E2M1.quantize(x)
    assert np.array_equal(_bits(got.numpy()), _bits(np.array(want, dtype=np.float32)))
    assert np.array_equal(_bits(got.numpy()), _bits(_ml_e2m1(x.numpy())))


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_e2m1_ml_dtypes_property(xs: list[float]) -> None:
    x = np.array(xs, dtype=np.float32)
    assert np.array_equal(_bits(E2M1.quantize(torch.from_numpy(x)).numpy()), _bits(_ml_e2m1(x)))


# ---------------------------------------------------------------------------------------------------------------
# ties to even code for every format


@pytest.mark.parametrize("name", NAMES)
def test_midpoints_round_to_even_code(name: str) -> None:
    f = parse_format(name)
    lv = f.levels.double()
    mids = ((lv[1:] + lv[:-1]) / 2).float()
    assert torch.equal(mids.double(), (lv[1:] + lv[:-1]) / 2), "midpoints of 4-bit grids are float32-exact"
    got = f.round_to_grid(mids)
    want = torch.stack([lv[i] if i % 2 == 0 else lv[i + 1] for i in range(len(mids))]).float()
    assert torch.equal(got, want)
    # Just off the midpoint the nearest level wins, whatever its parity.
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    assert torch.equal(f.round_to_grid(up), f.levels[1:])
    assert torch.equal(f.round_to_grid(down), f.levels[:-1])
    if f.signed:
        assert torch.equal(f.round_to_grid(-mids), -want)


@pytest.mark.parametrize("name", NAMES + ["ue1m3", "int8", "uint8", "e4m3", "ue5m2"])
def test_fast_rounding_equals_the_table_bit_for_bit(name: str) -> None:
    """round_to_grid (Veltkamp / Round arithmetic) vs round_to_grid_table on every level, tie and threshold +- 3
    ulps, powers of two down to the float32 subnormals, a strided sweep past max, inf, NaN, both signs."""
    f = parse_format(name)
    lv = f.levels.double()
    pts = torch.cat([lv, (lv[1:] + lv[:-1]) / 2, f.thresholds.double(), 2.0 ** torch.arange(-140, 128).double()])
    near = (pts.float().view(torch.int32)[:, None] + torch.arange(-3, 4)[None]).reshape(-1).view(torch.float32)
    top = int(np.float32(f.max * 1.5).view(np.int32))
    sweep = torch.arange(0, top, 997, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([near, sweep, torch.tensor([math.inf, math.nan, 3e38, 1e-45, 0.0])])
    x = torch.cat([x, -x])
    fast, table = f.round_to_grid(x), f.round_to_grid_table(x)
    bad = fast.view(torch.int32) != table.view(torch.int32)
    assert not bad.any(), f"{int(bad.sum())} differ: x={x[bad][:5].tolist()} fast={fast[bad][:5].tolist()}"


@pytest.mark.parametrize("name", ["int4", "uint4"])
def test_int_rounding_is_half_to_even(name: str) -> None:
    f = parse_format(name)
    v = torch.arange(-20, 41, dtype=torch.float32) / 4  # quarters, including every .5 tie
    lo, hi = f.min, f.max
    assert torch.equal(f.round_to_grid(v), torch.round(v).clamp(lo, hi))


# ---------------------------------------------------------------------------------------------------------------
# properties of every 4-bit quantizer (hypothesis), with random scale and, for unsigned, zero point

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@st.composite
def quant_case(draw, name: str | None = None):
    name = name or draw(st.sampled_from(NAMES))
    f = parse_format(name)
    scale = draw(st.floats(min_value=0.0009765625, max_value=1024.0, width=32))
    zp = 0.0 if f.signed else draw(st.floats(min_value=-10.0, max_value=0.0, width=32))
    xs = draw(st.lists(finite, min_size=1, max_size=64))
    return f, float(scale), float(zp), torch.tensor(xs, dtype=torch.float32)


def _q(f, x, s, z) -> torch.Tensor:
    return f.quantize(x, s, z)


@given(quant_case())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_idempotent(case) -> None:
    f, s, z, x = case
    q = _q(f, x, s, z)
    assert torch.equal(_q(f, q, s, z), q)


@given(quant_case())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_monotone(case) -> None:
    f, s, z, x = case
    xs = x.sort().values
    q = _q(f, xs, s, z)
    assert torch.all(q[1:] >= q[:-1]), (xs, q)


@given(quant_case())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_output_on_grid(case) -> None:
    f, s, z, x = case
    q = _q(f, x, s, z)
    points = f.grid * s + z if z != 0 else f.grid * s  # the same float32 operations as quantize
    assert torch.isin(q, points).all(), (q, points)


@given(quant_case())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_error_at_most_half_step_inside_range(case) -> None:
    f, s, z, x = case
    q = _q(f, x, s, z).double()
    xd = x.double()
    g = f.grid.double() * s + z
    lo, hi = float(g[0]), float(g[-1])
    inside = (xd >= lo) & (xd <= hi)
    assume(bool(inside.any()))
    xi, qi = xd[inside], q[inside]
    # the grid interval [g[k-1], g[k]] holding x; its width is the local step
    k = torch.searchsorted(g, xi).clamp(1, g.numel() - 1)
    step = g[k] - g[k - 1]
    slack = 1e-5 * (step + abs(z))  # float32 rounding of (x - z) / s and of z + q * s
    assert torch.all((qi - xi).abs() <= step / 2 + slack), ((qi - xi).abs() - step / 2).max()


@given(quant_case())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_saturates_outside_range(case) -> None:
    f, s, z, x = case
    q = _q(f, x, s, z)
    top, bottom = f.grid[-1] * s + z, f.grid[0] * s + z
    assert torch.all(q[x >= top + 1e-3 * s] == top)
    assert torch.all(q[x <= bottom - 1e-3 * s] == bottom)
    assert torch.all(q <= top) and torch.all(q >= bottom)


@pytest.mark.parametrize("name", NAMES)
def test_per_channel_scale_broadcasts(name: str) -> None:
    f = parse_format(name)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 3
    s = torch.tensor([0.1, 0.5, 1.0, 2.0])[:, None]
    z = torch.zeros(4, 1) if f.signed else torch.tensor([-0.3, -0.2, 0.0, -1.0])[:, None]
    q = f.quantize(x, s, z)
    rows = torch.stack([f.quantize(x[i], float(s[i]), float(z[i])) for i in range(4)])
    assert torch.equal(q, rows)


# ---------------------------------------------------------------------------------------------------------------
# encode / decode


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_round_trip(name: str) -> None:
    f = parse_format(name)
    codes = torch.arange(16, dtype=torch.uint8)
    vals = f.decode(codes)
    back = f.encode(vals)
    if f.signed:
        # code 8 is -0, which encodes back to +0 (code 0); every other code round-trips
        neg_zero = 1 << (f.bits - 1)
        assert back[neg_zero] == 0 and torch.signbit(vals[neg_zero])
        keep = codes != neg_zero
        assert torch.equal(back[keep], codes[keep])
    else:
        assert torch.equal(back, codes)
    # grid values -> codes -> values
    g = f.grid
    assert torch.equal(f.decode(f.encode(g)), g)
    assert f.encode(g).max() <= 15


@given(st.sampled_from(NAMES), st.lists(finite, min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_decode_encode_of_rounded_values(name: str, xs: list[float]) -> None:
    f = parse_format(name)
    q = f.round_to_grid(torch.tensor(xs, dtype=torch.float32))
    assert torch.equal(f.decode(f.encode(q)), q)  # == treats -0 and 0 as equal, as the packed weights do


# ---------------------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("spec,name,cls,signed", [
    ("e2m1", "e2m1", FPFormat, True), ("UE3M1", "ue3m1", FPFormat, False), (" e1m2 ", "e1m2", FPFormat, True),
    ("int4", "int4", IntFormat, True), ("uint4", "uint4", IntFormat, False), ("int8", "int8", IntFormat, True),
    ("e4m3", "e4m3", FPFormat, True),
])
def test_parse(spec: str, name: str, cls, signed: bool) -> None:
    f = parse_format(spec)
    assert isinstance(f, cls) and f.name == name and f.signed == signed
    assert FPFormat.parse(spec) == f
    assert parse_format(f.name) == f  # name round-trips


@pytest.mark.parametrize("spec", ["", "e2", "m1", "e2m1x", "fp4", "se2m1", "ue0m3", "e0m3", "int", "int-4", "nf4"])
def test_parse_errors(spec: str) -> None:
    with pytest.raises(MsfpError) as e:
        parse_format(spec)
    assert "\n" not in str(e.value)


def test_invalid_fp_format() -> None:
    with pytest.raises(MsfpError):
        FPFormat(0, 3)
    with pytest.raises(MsfpError):
        FPFormat(2, -1)
