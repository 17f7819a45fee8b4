"""The W4A8 small-M GEMM (export/triton/w4_gemm.py, op ``msfp_fast::w4a8_gemm``) against decode + a float64 GEMM.
Without CUDA the kernel runs in Triton's interpreter on small shapes.

Tolerance: the products of two E4M3 values are exact in fp32, so the kernel and the reference differ only in the
order (and, on Hopper's FP8 wgmma, the precision) of the fp32 accumulation: |got - ref| <= 2^-12 * (|A| @ |W|^T)
element-wise, far below one weight code's step (a wrong nibble or table moves an output by a whole product)."""

from __future__ import annotations

import pytest
import torch

from .triton_env import DEV  # first: sets TRITON_INTERPRET before the kernels are defined

from msfp_compiler.export.triton import fast_ops as O  # noqa: E402
from msfp_compiler.export.triton.w4_gemm import w4a8_gemm_triton  # noqa: E402
from msfp_compiler.ops import get_format  # noqa: E402


def _problem(m: int, k: int, parts: list[tuple[str, int]], seed: int = 0):
    """E4M3 activations [M, K], packed weights of one or several formats (a merged layer), and the exact values."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(m, k, generator=gen) * 3).to(torch.float8_e4m3fn)
    codes = [torch.randint(0, get_format(f).code_table.numel(), (n, k), generator=gen, dtype=torch.uint8)
             for f, n in parts]
    w = torch.cat([get_format(f).code_table.double()[c.long()] for (f, _), c in zip(parts, codes)])
    luts = torch.stack([O.e4m3_lut(f) for f, _ in parts])
    row_lut = torch.cat([torch.full((n,), i, dtype=torch.uint8) for i, (_, n) in enumerate(parts)])
    return a, O.pack_halves(torch.cat(codes)), luts, row_lut, w


def _check(got: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    ref = a.double() @ w.t()
    bound = 2.0**-12 * (a.double().abs() @ w.abs().t())
    err = (got.double().cpu() - ref).abs()
    assert torch.all(err <= bound), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("m,k,parts,tiles", [
    (5, 64, [("e2m1", 24)], (1, 16, 16, 16)),  # one tile, M and N short of it
    (40, 96, [("int4", 16), ("e1m2", 20), ("ue4m0", 9)], (1, 16, 32, 16)),  # merged formats, ragged N
    (33, 160, [("e2m1", 48)], (3, 32, 16, 16)),  # split-K over 5 K steps: 2 + 2 + 1
    (16, 80, [("e3m0", 16)], (2, 16, 16, 32)),  # K/2 = 40: the last K step half masked
])
def test_w4a8_gemm_kernel(m: int, k: int, parts, tiles) -> None:
    a, packed, luts, row_lut, w = _problem(m, k, parts)
    split, bm, bn, bkh = tiles
    got = w4a8_gemm_triton(a.to(DEV), packed.to(DEV), luts.to(DEV), row_lut.to(DEV), split, bm, bn, bkh)
    assert got.shape == (split, m, w.shape[0]) and got.dtype == torch.float32
    _check(got.sum(0), a, w)
    if split > 1:  # every split holds its own share (none empty, none repeated)
        assert all(got[s].abs().sum() > 0 for s in range(split))


def test_w4a8_gemm_op_and_config() -> None:
    """The registered op (reference on the CPU, the kernel on CUDA) returns the partials the config announces."""
    a, packed, luts, row_lut, w = _problem(20, 128, [("e2m1", 32), ("int4", 16)], seed=3)
    split = O.w4a8_config(20, 48, 128)[0]
    got = torch.ops.msfp_fast.w4a8_gemm(a.to(DEV), packed.to(DEV), luts.to(DEV), row_lut.to(DEV))
    assert got.shape == (split, 20, 48)
    _check(got.sum(0), a, w)
    with pytest.raises(ValueError, match="must match"):
        w4a8_gemm_triton(a[:, :64].contiguous(), packed, luts, row_lut, 1, 16, 16, 16)


@pytest.mark.parametrize("m,n,k", [(64, 320, 640), (77, 1280, 768), (1024, 1280, 11520), (256, 5120, 1280)])
def test_w4a8_config_fills_the_gpu(m: int, n: int, k: int) -> None:
    """SD1.5 small-M shapes: no empty split, and about two programs per SM or every K step split."""
    split, bm, bn, bkh = O.w4a8_config(m, n, k)
    iters = -(-(k // 2) // bkh)
    per = -(-iters // split)
    assert (split - 1) * per < iters <= split * per
    programs = -(-m // bm) * -(-n // bn) * split
    assert programs >= 132 or per == 1
