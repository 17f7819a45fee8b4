"""cuDNN's FP8 flash attention (through cudnn-frontend's Python graph API): the CUDA side of ``msfp_fast::sdpa_fp8``.

One cuDNN graph per (shapes, strides, scales), built on first use and cached; each call binds the tensors' device
addresses and runs on the current stream (CUDA-graph capturable: measured in ``bench_gpu_kernels --sections
fp8attn``). Q, K, V are E4M3 [B, H, S, D] views of [B, S, H, D] memory (BSHD; D a multiple of 16), per-tensor
descales; P is scaled by ``P_SCALE`` into E4M3 (cuDNN's FP8 forward rounds the probabilities to E4M3 before P @ V);
O comes back as E4M3 times ``scale_o`` (cuDNN 9.19 on Hopper has no bf16 O for the FP8 forward), in the same BSHD
layout. Needs the ``nvidia-cudnn-frontend`` package (1.15 measured; newer ones need cuda-python) and the libcudnn
torch loaded (found by soname).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["P_SCALE", "sdpa_fp8_cudnn", "build_sdpa_fp8"]

P_SCALE = 448.0  # P in [0, 1] -> E4M3's whole range
_FP8 = torch.float8_e4m3fn
_GRAPHS: dict[tuple, Any] = {}
_HANDLES: dict[int, Any] = {}


class _Graph:
    """A built cuDNN FP8 SDPA graph for one set of shapes and strides, its workspace and scale tensors."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 descale: tuple[float, float, float], scale_o: float, attn_scale: float,
                 p_scale: float = P_SCALE) -> None:
        import cudnn

        torch.backends.cudnn.version()  # loads torch's libcudnn first: the frontend finds it by soname
        dev = q.device.index or 0
        if dev not in _HANDLES:
            _HANDLES[dev] = cudnn.create_handle()
        self.handle = _HANDLES[dev]
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        tq, tk, tv = (g.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)
                      for n, t in (("q", q), ("k", k), ("v", v)))
        one = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        ts = [g.tensor(name=n, **one) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=ts[0], descale_k=ts[1], descale_v=ts[2],
                                          descale_s=ts[3], scale_s=ts[4], scale_o=ts[5], generate_stats=False,
                                          attn_scale=attn_scale, use_causal_mask=False)
        o_type = cudnn.data_type.BFLOAT16 if out.dtype == torch.bfloat16 else e4m3  # bf16: not on Hopper (9.19)
        o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(o_type)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.uids = g, [t.get_uid() for t in (tq, tk, tv, o)]
        self.ws = torch.empty(max(1, g.get_workspace_size()), device=q.device, dtype=torch.uint8)
        vals = [*descale, 1.0 / p_scale, p_scale, scale_o]
        self.scalars = [torch.full((1, 1, 1, 1), float(x), device=q.device) for x in vals]
        self.amax = [torch.empty(1, 1, 1, 1, device=q.device) for _ in range(2)]
        self.fixed = {t.get_uid(): x.data_ptr() for t, x in zip([*ts, amax_s, amax_o], [*self.scalars, *self.amax])}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        import cudnn

        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        pack = {**self.fixed, **{u: t.data_ptr() for u, t in zip(self.uids, (q, k, v, out))}}
        self.graph.execute(pack, self.ws.data_ptr(), handle=self.handle)


def build_sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   descale: tuple[float, float, float], scale_o: float, attn_scale: float,
                   p_scale: float = P_SCALE) -> _Graph:
    """The cuDNN FP8 SDPA graph for these tensors' shapes and strides (uncached; ``sdpa_fp8_cudnn`` caches): called
    as ``graph(q, k, v, out)``, it writes ``out`` (E4M3, or bf16 where the backend has it) on the current stream.
    P is scaled by ``p_scale`` into E4M3, O by ``scale_o``."""
    return _Graph(q, k, v, out, descale, scale_o, attn_scale, p_scale)


def sdpa_fp8_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: float, descale_k: float,
                   descale_v: float, scale_o: float, attn_scale: float) -> torch.Tensor:
    """E4M3 O * scale_o of softmax(attn_scale * (q dq)(k dk)^T) (v dv), [B, H, S, Dv] view of BSHD memory."""
    b, h, s, _ = q.shape
    out = torch.empty(b, s, h, v.shape[-1], device=q.device, dtype=_FP8).transpose(1, 2)
    key = (q.device, *(tuple(t.shape) + t.stride() for t in (q, k, v)), descale_q, descale_k, descale_v, scale_o,
           attn_scale)
    if key not in _GRAPHS:
        _GRAPHS[key] = _Graph(q, k, v, out, (descale_q, descale_k, descale_v), scale_o, attn_scale)
    _GRAPHS[key](q, k, v, out)
    return out
