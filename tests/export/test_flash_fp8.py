"""Our Triton FP8 flash attention (``export/triton/flash_fp8.py``, op ``msfp_fast::flash_fp8``,
build_fast(attention="fp8-triton")): the interpreter on the CPU (small shapes), the real kernel on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .triton_env import DEV  # first: sets TRITON_INTERPRET before the kernels are defined

from msfp_compiler.export.triton import fast as FA  # noqa: E402
from msfp_compiler.export.triton.flash_fp8 import FLASH_TILE, flash_fp8_reference, flash_fp8_triton  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
SCALES = (0.3, 0.25, 0.5, 0.1)  # descale q, k, v and V's zero point


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _operands(b: int, h: int, s: int, t: int, d: int, seed: int = 0) -> tuple:
    """Signed E2M1 grid values as E4M3: q [B, H, S, D] and k [B, H, T, D] viewing [B, S, H, D] memory (as the
    rewrite passes them), vt [B, H, D, T] contiguous."""
    gen = torch.Generator().manual_seed(seed)

    def grid(*shape: int) -> torch.Tensor:
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return (E2M1[torch.randint(0, 8, shape, generator=gen)] * sign).to(torch.float8_e4m3fn)

    return grid(b, s, h, d).transpose(1, 2), grid(b, t, h, d).transpose(1, 2), grid(b, h, d, t)


def _exact(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, scale: float) -> torch.Tensor:
    dq, dk, dv, zv = SCALES
    return F.scaled_dot_product_attention(q.float() * dq, k.float() * dk, vt.float().transpose(-1, -2) * dv,
                                          scale=scale) + zv


# The interpreter's float32 -> bf16 stores truncate (the GPU's round to nearest): ~0.4% rel-RMSE against the
# reference on its own. A kernel error is several times that: a partial key tile left unmasked ~5%, V's zero point
# 5% off ~3% (session 17's review, by mutation).
TOL = 1e-2


@pytest.mark.parametrize("d", [40, 16])
def test_flash_fp8_one_key_block_is_the_reference(d: int) -> None:
    """Keys in one BLOCK_N tile (the head dim masked to BLOCK_D, a partial query tile): the kernel is its reference,
    and a few percent from exact attention (only P is rounded to E4M3)."""
    q, k, vt = (x.to(DEV) for x in _operands(1, 2, 40, 96, d))
    got = flash_fp8_triton(q, k, vt, *SCALES, d ** -0.5, tile=(32, 128, 4, 1, False))
    assert got.dtype == torch.bfloat16 and got.shape == (1, 2, 40, d) and got.transpose(1, 2).is_contiguous()
    ref = flash_fp8_reference(q.cpu(), k.cpu(), vt.cpu(), *SCALES, d ** -0.5)
    assert _rel(got.cpu(), ref) < TOL
    assert 1e-3 < _rel(got.cpu(), _exact(q.cpu(), k.cpu(), vt.cpu(), d ** -0.5)) < 0.05


@pytest.mark.parametrize("t", [150, 128])
def test_flash_fp8_key_blocks(t: int) -> None:
    """Several key tiles, the last one partial (150: masked scores) or not (128: SD1.5's case, no mask), two samples
    and heads, queries past one tile: the running-max softmax equals its tile-by-tile reference, and is within P's
    E4M3 rounding of exact attention."""
    q, k, vt = (x.to(DEV) for x in _operands(2, 2, 70, t, 40, seed=1))
    got = flash_fp8_triton(q, k, vt, *SCALES, 0.2, tile=(32, 32, 4, 1, False)).cpu()
    assert _rel(got, flash_fp8_reference(q.cpu(), k.cpu(), vt.cpu(), *SCALES, 0.2, block_n=32)) < TOL
    assert _rel(got, _exact(q.cpu(), k.cpu(), vt.cpu(), 0.2)) < 0.05


def test_flash_fp8_rejects_mismatched_operands() -> None:
    q, k, vt = _operands(1, 1, 8, 32, 16)
    with pytest.raises(ValueError, match="no keys"):
        flash_fp8_triton(q, k[:, :, :0], vt[..., :0], *SCALES, 0.25)
    with pytest.raises(ValueError, match="do not match"):
        flash_fp8_triton(q, k, vt.transpose(-1, -2), *SCALES, 0.25)
    with pytest.raises(ValueError, match="E4M3"):
        flash_fp8_triton(q.float(), k, vt, *SCALES, 0.25)


@pytest.mark.skipif(DEV.type != "cuda", reason="SD1.5's shapes and the f16x2 exponentials (inline PTX): GPU only")
@pytest.mark.parametrize("tile", [FLASH_TILE, (128, 128, 8, 3, False), (128, 64, 4, 3, False)])
@pytest.mark.parametrize("t, d", [(4096, 40), (1024, 80)])
def test_flash_fp8_sd15_shapes(tile: tuple, t: int, d: int) -> None:
    """SD1.5's self-attentions at 64x64 and 32x32 (batch 2, 8 heads): each tile within P's E4M3 rounding of the
    reference and of exact attention."""
    q, k, vt = (x.to(DEV) for x in _operands(2, 8, t, t, d, seed=2))
    got = flash_fp8_triton(q, k, vt, *SCALES, d ** -0.5, tile=tile)
    assert _rel(got, flash_fp8_reference(q, k, vt, *SCALES, d ** -0.5, block_n=tile[1])) < 0.03
    assert _rel(got, _exact(q, k, vt, d ** -0.5)) < 0.05


def test_build_fast_triton_fp8_attention(compiled_cond, monkeypatch) -> None:
    """attention="fp8-triton": each admitted attention becomes flash_fp8_fq (q, k, v's fake quantizers inside), the
    model runs and traces as one graph, and stays near the bf16-attention build (P rounded to E4M3 on top; the tiny
    random model's 4-bit decisions amplify it, as test_build_fast_fp8_attention's bound says)."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    assert FA.build_fast(gm, "cpu", attention="fp8-triton").report.fp8_attention == 0  # below FP8_ATTENTION_MIN_KV
    monkeypatch.setattr(FA, "FP8_ATTENTION_MIN_KV", 1)
    plain, fp8 = FA.build_fast(gm, DEV), FA.build_fast(gm, DEV, attention="fp8-triton")
    n = sum(node.target is FA.flash_fp8_fq for node in fp8.gm.graph.nodes)
    assert n == fp8.report.fp8_attention >= 2
    assert fp8.report.fake_quant == plain.report.fake_quant - 3 * n
    with torch.no_grad():
        a, b = plain(*args), fp8(*args)
        assert torch.isfinite(b).all() and _rel(b, a) < 0.6
        assert torch.equal(torch.compile(fp8, backend="eager", fullgraph=True)(*args), b)


_FLASH_PTX = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from msfp_compiler.export.triton import flash_fp8 as F
names = ("q_ptr k_ptr vt_ptr o_ptr qk_scale o_scale o_shift S T H sqb sqh sqs skb skh skt svb svh svd sob sos "
         "soh").split()
sig = dict(zip(names, ["*fp8e4nv"] * 3 + ["*bf16"] + ["fp32"] * 3 + ["i32"] * 15))
bm, bn, warps, stages, _ = F.FLASH_TILE  # the default tile, both exponential forms
for e16 in (False, True):
    const = dict(D=40, BLOCK_D=64, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=True, EXP16=e16, PS=F.P_SCALE, RNE_BITS=False)
    src = ASTSource(F._flash_fp8_kernel, {**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    opts = {"num_warps": warps, "num_stages": stages}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    assert f"m64n{bn}k32.f32.e4m3.e4m3" in ptx and "m64n64k32.f32.e4m3.e4m3" in ptx, e16  # both MMAs: FP8 wgmma
    assert ("ex2.approx.f16x2" in ptx) == e16, e16
print("ok")
"""


@pytest.mark.skipif(DEV.type == "cuda", reason="the GPU runs the kernel itself")
def test_flash_fp8_compiles_for_hopper() -> None:
    """Without a GPU: the kernel compiles for sm_90 (Triton's real compiler, in a process without the interpreter),
    Q K^T and P V both as FP8 wgmma (K-major operands: V^T memory), the exponentials as f16x2 only with exp16."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", _FLASH_PTX], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
