"""FP8 attention on the quantized q, k, v (``msfp_fast::sdpa_fp8``, ``fast.sdpa_fp8_fq``, build_fast(attention="fp8")).

On the CPU the op is its torch reference (P and O rounded to E4M3); on CUDA it is cuDNN's FP8 flash attention
(export/triton/attention_fp8.py, needs nvidia-cudnn-frontend), checked against that reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msfp_compiler.export.triton import fast as FA
from msfp_compiler.export.triton import fast_ops as O

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def _grid(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    """Signed E2M1 grid values in [B, H, S, D] views of [B, S, H, D] memory, as the rewrite passes them."""
    b, h, s, d = shape
    g = E2M1[torch.randint(0, 8, (b, s, h, d), generator=gen)] * (torch.randint(0, 2, (b, s, h, d), generator=gen) * 2 - 1)
    return g.transpose(1, 2)


def test_sdpa_fp8_rounds_p_and_o_only() -> None:
    """The op on exact E4M3 grid operands: close to float SDPA of the same values (only P and O are rounded to
    E4M3: a few percent), its output E4M3 in BSHD memory; on CUDA, cuDNN agrees with the reference."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_grid((2, 2, 128, 64), gen) for _ in range(3))
    sq, sk, sv, so = 0.05, 0.07, 0.1, 1.5
    ref = F.scaled_dot_product_attention(q * sq, k * sk, v * sv, scale=0.125)
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    cpu = O.sdpa_fp8(q8, k8, v8, sq, sk, sv, so, 0.125)
    assert cpu.dtype == torch.float8_e4m3fn and cpu.transpose(1, 2).is_contiguous()
    err = _rel(cpu.float() / so, ref)
    assert 1e-3 < err < 0.05, err  # rounded (not exact), but only to E4M3
    if DEV.type == "cuda":
        got = O.sdpa_fp8(*(t.to(DEV) for t in (q8, k8, v8)), sq, sk, sv, so, 0.125).cpu()
        assert got.transpose(1, 2).is_contiguous() and _rel(got.float(), cpu.float()) < 0.05


def test_build_fast_fp8_attention(compiled_cond, monkeypatch) -> None:
    """attention="fp8": each admitted attention becomes sdpa_fp8_fq (q, k, v's fake quantizers go inside it), the
    model runs and traces as one graph, and stays near the bf16-attention build (P and O rounded to E4M3 on top;
    the random tiny model's 4-bit decisions amplify it, as test_build_fast_on_compiled_cond_unet's bound says)."""
    gm = compiled_cond.graph_module
    args = [a.to(DEV) for a in compiled_cond.calibration.batches[0].args]
    assert FA.build_fast(gm, "cpu", attention="fp8").report.fp8_attention == 0  # tiny: below FP8_ATTENTION_MIN_KV
    monkeypatch.setattr(FA, "FP8_ATTENTION_MIN_KV", 1)
    plain, fp8 = FA.build_fast(gm, DEV), FA.build_fast(gm, DEV, attention="fp8")
    n = sum(node.target is FA.sdpa_fp8_fq for node in fp8.gm.graph.nodes)
    assert n == fp8.report.fp8_attention >= 2 and "FP8 attentions" in str(fp8.report)
    assert fp8.report.fake_quant == plain.report.fake_quant - 3 * n
    with torch.no_grad():
        a, b = plain(*args), fp8(*args)
        assert torch.isfinite(b).all() and _rel(b, a) < 0.6
        assert torch.equal(torch.compile(fp8, backend="eager", fullgraph=True)(*args), b)
    with pytest.raises(ValueError, match="attention mode"):
        FA.build_fast(gm, "cpu", attention="fp4")


def test_fp8_head_dim() -> None:
    assert [FA.fp8_head_dim(d) for d in (2, 40, 64, 80, 160)] == [64, 64, 64, 80, 160]
