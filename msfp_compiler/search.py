"""MSE search of clip range (scale) and zero point for one format over calibration values.

Signed formats: scale = r * absmax / fmt.max over a grid of clip ratios r. Unsigned formats: the zero point is the low
clip l = f * min(x) (f from 1 down to 0) and the scale maps [l, l + r * (max - l)] onto the grid; the 2-D (f, r)
search runs on a coarse grid, then on a finer grid around the coarse optimum. Rows of a 2-D input are searched
independently (per-channel weights); candidates are evaluated in vectorized chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Format

__all__ = ["SearchResult", "SortedValues", "search_scale", "exact_mse", "quant_mse_direct"]

_CHUNK_ELEMS = 1 << 24  # bound on candidates x values evaluated at once by the direct evaluator


@dataclass
class SearchResult:
    scale: torch.Tensor  # [rows]
    zero_point: torch.Tensor  # [rows]
    mse: torch.Tensor  # [rows], mean squared error per row

    @property
    def total_mse(self) -> float:
        return float(self.mse.mean())


def quant_mse_direct(fmt: Format, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """MSE per (candidate, row) by quantizing every value: x [rows, n], s and z [k, rows] -> [k, rows]."""
    k = s.shape[0]
    step = max(1, _CHUNK_ELEMS // max(x.numel(), 1))
    out = []
    for i in range(0, k, step):
        sc, zc = s[i:i + step, :, None], z[i:i + step, :, None]
        q = zc + fmt.round_to_grid((x[None] - zc) / sc) * sc
        out.append((q - x[None]).pow(2).mean(dim=2))
    return torch.cat(out)


class SortedValues:
    """Rows sorted once, with prefix sums of x and x^2, so a candidate's MSE costs O(levels * log n), not O(n).

    Quantization maps the interval between consecutive decision boundaries to one level q, so the squared error
    of that bucket is S2 - 2 q S1 + q^2 n from prefix sums (float64 to keep the cancellation harmless).
    """

    def __init__(self, x: torch.Tensor):
        xs = x.float().sort(dim=1).values.double()  # float32 -> float64 is exact and monotone: same order
        rows, n = xs.shape
        self.xs = xs
        self.p1 = xs.new_zeros(rows, n + 1)  # p[:, i] = sum of the i smallest values
        self.p2 = xs.new_zeros(rows, n + 1)
        torch.cumsum(xs, 1, out=self.p1[:, 1:])
        torch.cumsum(xs.square(), 1, out=self.p2[:, 1:])
        self.n = n

    def mse(self, fmt: Format, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[k, rows] scales / zero points -> [k, rows] MSE (ties at a boundary may go either way)."""
        grid = fmt.grid.double().to(self.xs.device)
        bounds = (grid[1:] + grid[:-1]) / 2
        k, rows = s.shape
        s64, z64 = s.double().T[:, :, None], z.double().T[:, :, None]  # [rows, k, 1]
        bx = (z64 + s64 * bounds).reshape(rows, -1)  # boundary positions in x-space, [rows, k * nb]
        idx = torch.searchsorted(self.xs, bx).reshape(rows, k, -1)
        edges = torch.cat([idx.new_zeros(rows, k, 1), idx, idx.new_full((rows, k, 1), self.n)], 2)
        p1 = torch.gather(self.p1, 1, edges.reshape(rows, -1)).reshape(rows, k, -1)
        p2 = torch.gather(self.p2, 1, edges.reshape(rows, -1)).reshape(rows, k, -1)
        cnt, s1, s2 = edges.diff(dim=2).double(), p1.diff(dim=2), p2.diff(dim=2)
        q = z64 + s64 * grid  # [rows, k, levels]
        err = (s2 - 2 * q * s1 + q.pow(2) * cnt).sum(2) / self.n
        return err.clamp_min(0).T.float()


def _pick(fmt: Format, x: SortedValues, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, SearchResult]:
    s = s.clamp_min(torch.finfo(torch.float32).tiny)
    err = x.mse(fmt, s, z)
    i = err.argmin(dim=0)
    cols = torch.arange(s.shape[1], device=s.device)
    return i, SearchResult(s[i, cols], z[i, cols], err[i, cols])


def search_scale(fmt: Format, x: torch.Tensor, num_ratios: int = 40, num_zero_points: int = 12,
                 min_ratio: float = 0.3, sorted_values: SortedValues | None = None, exact: bool = True) -> SearchResult:
    """Best (scale, zero point) per row of x by grid search; x is [rows, n] or [n].

    ``sorted_values`` (``SortedValues(x)``) lets the candidates of one tensor share one sort: sorting is the
    largest cost of the search on big weights (SD1.5: ~45% of select_format when every format sorted again).
    ``exact=False`` reports the prefix-sum MSE (which may send values exactly on a boundary to the other level)
    instead of quantizing x once more; ``exact_mse`` computes the exact one later, e.g. for the winner only.
    """
    x = x.float().reshape(1, -1) if x.dim() == 1 else x.float().reshape(x.shape[0], -1)
    rows = x.shape[0]
    sv = sorted_values if sorted_values is not None else SortedValues(x)
    if fmt.signed:
        ratios = torch.linspace(min_ratio, 1.0, num_ratios, device=x.device)
        amax = x.abs().amax(dim=1)
        s = ratios[:, None] * amax[None] / fmt.max
        res = _pick(fmt, sv, s, torch.zeros_like(s))[1]
        return exact_mse(fmt, x, res) if exact else res
    lo, hi = x.amin(dim=1), x.amax(dim=1)

    def grid(fr: torch.Tensor, rr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fr, rr: [k, rows] zero-point fraction and clip ratio -> scale, zero point [k, rows]
        z = torch.where(lo < 0, fr * lo, lo.expand_as(fr))
        return rr * (hi - z).clamp_min(0) / fmt.max, z

    nf, nr = max(2, num_zero_points), max(2, num_ratios)
    f0, r0 = torch.linspace(1.0, 0.0, nf, device=x.device), torch.linspace(min_ratio, 1.0, nr, device=x.device)
    ff, rr = torch.meshgrid(f0, r0, indexing="ij")
    ff, rr = ff.reshape(-1, 1).expand(-1, rows), rr.reshape(-1, 1).expand(-1, rows)
    i, _ = _pick(fmt, sv, *grid(ff, rr))
    cols = torch.arange(rows, device=x.device)
    fb, rb = ff[i, cols], rr[i, cols]
    # Refine on a finer grid spanning one coarse step either side of the coarse optimum.
    df, dr = 1.0 / (nf - 1), (1.0 - min_ratio) / (nr - 1)
    fo = torch.linspace(-df, df, 5, device=x.device)
    ro = torch.linspace(-dr, dr, 9, device=x.device)
    fo, ro = torch.meshgrid(fo, ro, indexing="ij")
    ff2 = (fb[None] + fo.reshape(-1, 1)).clamp(0.0, 1.0)
    rr2 = (rb[None] + ro.reshape(-1, 1)).clamp(min_ratio * 0.5, 1.0)
    res = _pick(fmt, sv, *grid(ff2, rr2))[1]
    return exact_mse(fmt, x, res) if exact else res


def exact_mse(fmt: Format, x: torch.Tensor, res: SearchResult) -> SearchResult:
    """Set the result's MSE by real quantization of x ([rows, n] or [n])."""
    x = x.float().reshape(1, -1) if x.dim() == 1 else x.float().reshape(x.shape[0], -1)
    res.mse = quant_mse_direct(fmt, x, res.scale[None], res.zero_point[None])[0]
    return res
