"""4-bit number formats: signed/unsigned minifloats (ExMy) and INT4, with exact grids and RNE rounding.

A format is described by its non-negative *magnitude grid* ``levels``: the values of the codes with sign bit 0,
in code order (which for every format here is also increasing order). Rounding picks the nearest level and, on a
tie, the level with an even code, which is IEEE round-to-nearest-even (the mantissa LSB is the code LSB). Signed
formats mirror the levels; the sign is kept separately, so ``-0.1`` rounds to ``-0.0`` exactly as
``ml_dtypes.float4_e2m1fn`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch

from .errors import MsfpError

__all__ = ["FPFormat", "IntFormat", "Format", "parse_format", "FP4_SIGNED", "FP4_UNSIGNED", "ALL_4BIT"]


class _GridFormat:
    """Shared rounding/encoding over a magnitude grid; subclasses define ``levels`` and ``signed``."""

    signed: bool

    @property
    def name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def bits(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @cached_property
    def levels(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @cached_property
    def grid(self) -> torch.Tensor:
        """All representable unscaled values, sorted, float32 (``-0`` merged with ``0``)."""
        lv = self.levels
        if not self.signed:
            return lv.clone()
        return torch.cat([-lv[1:].flip(0), lv])

    @property
    def max(self) -> float:
        return float(self.levels[-1])

    @property
    def min(self) -> float:
        return -self.max if self.signed else 0.0

    @cached_property
    def thresholds(self) -> torch.Tensor:
        """Decision thresholds on |v|: level index = #{i : thresholds[i] < |v|}, float32-exact RNE.

        Threshold i sits at the midpoint of levels i and i+1. A value exactly at a midpoint must go up only when the
        upper code (i+1) is even, i.e. i odd; for odd i the threshold is moved one float32 ulp down, so a strict
        comparison sends the midpoint up. The ONNX function body uses the same table, hence the same bits.
        """
        lv = self.levels.double()
        mids = ((lv[1:] + lv[:-1]) / 2).float()
        down = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
        odd = torch.arange(mids.numel()) % 2 == 1
        return torch.where(odd, down, mids)

    def round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Round unscaled values onto the grid: nearest, ties to even code, saturating (float32 in and out)."""
        return self.round_to_grid_table(v)

    def round_to_grid_table(self, v: torch.Tensor) -> torch.Tensor:
        """round_to_grid by the threshold table (any grid; NaN goes to +-max). The definition the fast paths are
        tested against."""
        v = v.float()
        a = v.abs() if self.signed else v.clamp_min(0.0)
        idx = torch.searchsorted(self.thresholds.to(v.device), a.contiguous(), right=False)
        q = self.levels.to(v.device)[idx]
        return torch.copysign(q, v) if self.signed else q

    def quantize(
        self,
        x: torch.Tensor,
        scale: Union[float, torch.Tensor] = 1.0,
        zero_point: Union[float, torch.Tensor] = 0.0,
    ) -> torch.Tensor:
        """Fake quantization onto ``zero_point + scale * grid`` (scale/zero_point broadcast against x)."""
        # Python-number zero point / unit scale skip the arithmetic so that -0.0 survives (ml_dtypes parity).
        if not torch.is_tensor(zero_point) and zero_point == 0:
            if not torch.is_tensor(scale) and scale == 1:
                return self.round_to_grid(x)
            return self.round_to_grid(x / scale) * scale
        return zero_point + self.round_to_grid((x - zero_point) / scale) * scale

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """Unscaled values already on the grid -> integer codes (uint8, 0..2**bits-1). Sign bit is the MSB."""
        a = v.abs() if self.signed else v
        idx = torch.searchsorted(self.levels.to(v.device), a.float().contiguous())
        if self.signed:
            idx = idx + (torch.signbit(v) & (a > 0)).to(idx.dtype) * (1 << (self.bits - 1))
        return idx.to(torch.uint8)

    @cached_property
    def code_table(self) -> torch.Tensor:
        """Value of every code 0..2**bits-1 (float32); the decode lookup table used by packed weights."""
        n = 1 << self.bits
        if not self.signed:
            return self.levels.clone()
        half = n // 2
        return torch.cat([self.levels[:half], -self.levels[:half]])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_table.to(codes.device)[codes.long()]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FPFormat(_GridFormat):
    """Minifloat with ``exp_bits`` exponent and ``man_bits`` mantissa bits, an optional sign bit, bias 2**(E-1)-1.

    All codes are finite (no inf/NaN), subnormals when the exponent field is 0 (as OCP E2M1). The bias only fixes
    the unscaled grid; the per-layer scale moves it anywhere.
    """

    exp_bits: int
    man_bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if self.exp_bits < 1 or self.man_bits < 0:
            raise MsfpError(f"invalid FP format: exp_bits={self.exp_bits} man_bits={self.man_bits}")

    @property
    def bits(self) -> int:
        return self.exp_bits + self.man_bits + int(self.signed)

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}e{self.exp_bits}m{self.man_bits}"

    # Rounding constants: the one definition that round_to_grid, the ONNX function bodies (export/msfp_ops.py) and
    # the Triton kernels (export/triton/kernels.py) read.

    @property
    def emin(self) -> int:
        """Exponent of the first normal binade (the subnormal step is 2**(emin - man_bits))."""
        return 1 - self.bias

    @property
    def min_normal(self) -> float:
        """2**emin: below it the grid is uniform (subnormals)."""
        return 2.0**self.emin

    @property
    def split_factor(self) -> float:
        """Veltkamp's C = 2**(23 - M) + 1: g = C * a, g + (a - g) is a rounded to M + 1 significant bits (RNE)."""
        return 2.0 ** (23 - self.man_bits) + 1.0

    @property
    def split_floor(self) -> float:
        """K = 1.5 * 2**(emin + 23 - M): g = max(C * a, K) keeps the rounding step at the subnormal spacing."""
        return 1.5 * 2.0 ** (self.emin + 23 - self.man_bits)

    @property
    def subnormal_magic(self) -> float:
        """2**23 * the subnormal spacing: (a + magic) - magic rounds a onto the uniform subnormal grid (RNE)."""
        return 2.0 ** (self.emin - self.man_bits + 23)

    @property
    def mantissa_shift(self) -> int:
        """float32 mantissa bits dropped when rounding a normal value to M bits."""
        return 23 - self.man_bits

    @cached_property
    def levels(self) -> torch.Tensor:
        vals = []
        for e in range(1 << self.exp_bits):
            for m in range(1 << self.man_bits):
                frac = m / (1 << self.man_bits)
                vals.append(2.0 ** (1 - self.bias) * frac if e == 0 else 2.0 ** (e - self.bias) * (1 + frac))
        return torch.tensor(vals, dtype=torch.float32)

    def round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Round unscaled values onto the grid: nearest, ties to even code, saturating (float32 in and out).

        M >= 1: Veltkamp splitting, 3-4x faster than the table search and bit-identical to it (also for NaN, which
        goes to +-max: fmin ignores NaN). With C = 2^(23-M) + 1, g = max(C*a, K), r = g + (a - g) is a rounded to
        M+1 significant bits, ties to even; the floor K = 1.5 * 2^(emin+23-M) keeps the step at 2^(emin-M) in the
        subnormal range. The ONNX bodies (QuantizeFP) use the same arithmetic; the Triton kernels round the float32
        bits instead (export/triton/kernels.py), from the same constants.
        """
        if self.man_bits == 0:  # power-of-two grids: Veltkamp's ties would need a parity fix, the table is exact
            return self.round_to_grid_table(v)
        v = v.float()
        a = torch.fmin(v.abs() if self.signed else v.clamp_min(0.0), torch.tensor(self.max))
        g = (a * self.split_factor).clamp_min_(self.split_floor)
        r = (a - g).add_(g)
        return torch.copysign(r, v) if self.signed else r

    @staticmethod
    def parse(spec: str) -> "Format":
        return parse_format(spec)


@dataclass(frozen=True)
class IntFormat(_GridFormat):
    """Uniform integer grid: signed symmetric (-(2**(b-1)-1)..2**(b-1)-1, as Q-Diffusion) or unsigned 0..2**b-1."""

    int_bits: int = 4
    signed: bool = True

    @property
    def bits(self) -> int:
        return self.int_bits

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.int_bits}"

    def round_to_grid(self, v: torch.Tensor) -> torch.Tensor:
        """Round half to even and saturate; NaN goes to +-max as in the table path."""
        v = v.float()
        a = torch.fmin(v.abs() if self.signed else v.clamp_min(0.0), torch.tensor(self.max)).round_()
        return torch.copysign(a, v) if self.signed else a.add_(0.0)  # -0.0 -> +0.0, as the table's level 0

    @cached_property
    def levels(self) -> torch.Tensor:
        # Signed INT is sign-magnitude like the FP formats (symmetric -7..7, code 8 is -0), so one encoder serves all.
        n = (1 << (self.int_bits - 1)) if self.signed else (1 << self.int_bits)
        return torch.arange(n, dtype=torch.float32)


Format = Union[FPFormat, IntFormat]

_FP_RE = re.compile(r"^(u?)e(\d+)m(\d+)$")
_INT_RE = re.compile(r"^(u?)int(\d+)$")


def parse_format(spec: str) -> Format:
    """``"e2m1"`` -> signed E2M1, ``"ue3m1"`` -> unsigned E3M1, ``"int4"`` / ``"uint4"`` -> integer grids."""
    s = spec.strip().lower()
    if m := _FP_RE.match(s):
        return FPFormat(int(m.group(2)), int(m.group(3)), signed=not m.group(1))
    if m := _INT_RE.match(s):
        return IntFormat(int(m.group(2)), signed=not m.group(1))
    raise MsfpError(f"unknown format {spec!r} (expected e.g. e2m1, ue3m1, int4, uint4)")


FP4_SIGNED = tuple(FPFormat(e, 3 - e, True) for e in (1, 2, 3))
FP4_UNSIGNED = tuple(FPFormat(e, 4 - e, False) for e in (2, 3, 4))
ALL_4BIT = FP4_SIGNED + FP4_UNSIGNED + (IntFormat(4, True), IntFormat(4, False))
