"""torch.library ops of the fast path: the Triton kernels Inductor should not regenerate, as opaque ops.

``msfp_fast::decode_w4`` / ``decode_w4_group`` (packed 4-bit weights -> E4M3 [N, K], kernels in ``w4_decode``)
``msfp_fast::im2col_e4m3`` (NHWC E4M3 -> im2col rows, kernel in ``im2col``), ``msfp_fast::conv_e4m3`` (the
implicit-GEMM FP8 conv, kernel in ``conv_fp8``) and ``msfp_fast::flash_fp8`` (FP8 flash attention on quantized Q,
K, V, kernel in ``flash_fp8``). Each has a fake implementation (shapes only) so torch.compile traces through it and
Inductor fuses the code around it, a CUDA implementation that launches the Triton kernel (captured by CUDA graphs
like any launch), and the reference in torch ops for every other device (CPU tests, eager CPU runs). The Triton
modules are imported on first use only (flash_fp8's also by its CPU reference, which lives there): their kernels
must be defined after a test has chosen the interpreter (TRITON_INTERPRET is read when a kernel is defined).

Packed layout ("halves"): a row of K codes is K/2 bytes, byte j holding code j in its low nibble and code j + K/2
in its high nibble, so the decode writes two contiguous runs per row (no nibble interleave).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msfp_compiler.ops import get_format

__all__ = ["decode_w4", "decode_w4_group", "im2col_e4m3", "conv_e4m3", "sdpa_fp8", "flash_fp8", "conv_out_size",
           "pack_halves", "unpack_halves", "e4m3_lut", "gn_stats", "gn_scale_shift", "group_scale_shift"]

_FP8 = torch.float8_e4m3fn


def pack_halves(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> [..., K/2] bytes: code j low nibble, code j + K/2 high nibble."""
    k = codes.shape[-1]
    if k % 2:
        raise ValueError(f"packed weights need an even K, got {k}")
    c = codes.to(torch.uint8)
    return (c[..., : k // 2] | (c[..., k // 2:] << 4)).contiguous()


def unpack_halves(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_halves: [..., K/2] bytes -> uint8 codes [..., K]."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def e4m3_lut(fmt: str) -> torch.Tensor:
    """uint8 [16]: the E4M3 bit pattern of each code's value (codes past the table map to 0)."""
    table = get_format(fmt).code_table.float()
    bits = table.to(_FP8).view(torch.uint8)
    if not torch.equal(bits.view(_FP8).float(), table):
        raise ValueError(f"format {fmt} is not exact in E4M3")
    lut = torch.zeros(16, dtype=torch.uint8)
    lut[: bits.numel()] = bits
    return lut


def conv_out_size(h: int, w: int, kernel: list[int], stride: list[int], pads: list[int]) -> tuple[int, int]:
    """(Ho, Wo) of a conv over [H, W] with pads (left, right, top, bottom)."""
    left, right, top, bottom = pads
    return (h + top + bottom - kernel[0]) // stride[0] + 1, (w + left + right - kernel[1]) // stride[1] + 1


@torch.library.custom_op("msfp_fast::decode_w4", mutates_args=())
def decode_w4(packed: torch.Tensor, lut: torch.Tensor, set_index: torch.Tensor | None = None) -> torch.Tensor:
    """packed uint8 [S, N, K/2], lut uint8 [16], set_index int64 [1] or None (set 0) -> E4M3 [N, K], row-major."""
    p = packed[0] if set_index is None else packed.index_select(0, set_index.reshape(1).long())[0]
    return lut[unpack_halves(p).long()].view(_FP8)


@decode_w4.register_kernel("cuda")
def _decode_w4_cuda(packed: torch.Tensor, lut: torch.Tensor, set_index: torch.Tensor | None = None) -> torch.Tensor:
    from .w4_decode import decode_w4_triton

    return decode_w4_triton(packed, lut, set_index)


@decode_w4.register_fake
def _decode_w4_fake(packed: torch.Tensor, lut: torch.Tensor, set_index: torch.Tensor | None = None) -> torch.Tensor:
    return packed.new_empty((packed.shape[1], 2 * packed.shape[2]), dtype=_FP8)


@torch.library.custom_op("msfp_fast::decode_w4_group", mutates_args=())
def decode_w4_group(packed: torch.Tensor, luts: torch.Tensor, row_lut: torch.Tensor, block_layer: torch.Tensor,
                    meta: torch.Tensor) -> torch.Tensor:
    """Several layers' packed weights decoded by one launch (one launch per layer was launch-bound: 280 per SD1.5
    step, most of them a few microseconds).

    packed uint8 [P]: the layers' pack_halves bytes one after another, each layer starting at a multiple of the block
    (P / len(block_layer) bytes, a multiple of 4), every layer's K a multiple of 8 (the kernel moves int32 words);
    luts: uint8 [U, 16] code -> E4M3 tables; row_lut uint8 [rows]: the table of each weight row (the rows of a merged
    layer may come from layers of different formats); block_layer int32 [P / block]: the layer of each block; meta
    int32 [L, 4], in int32 words of packed bytes: (start, K/8, N*K/8, first row in row_lut) of each layer. Returns
    E4M3 [2P]: layer l's [N, K] row-major weights at element 8 * start (the padding between layers is left
    unwritten)."""
    out = torch.zeros(2 * packed.numel(), dtype=torch.uint8, device=packed.device)
    tables = luts.to(torch.int32)
    for start, half, total, row0 in (meta * torch.tensor([4, 4, 4, 1], dtype=meta.dtype)).tolist():
        codes = unpack_halves(packed[start:start + total].view(-1, half))
        rows = tables[row_lut[row0:row0 + codes.shape[0]].long()]  # [N, 16]
        out[2 * start:2 * (start + total)] = torch.gather(rows, 1, codes.long()).reshape(-1).to(torch.uint8)
    return out.view(_FP8)


@decode_w4_group.register_kernel("cuda")
def _decode_w4_group_cuda(packed: torch.Tensor, luts: torch.Tensor, row_lut: torch.Tensor, block_layer: torch.Tensor,
                          meta: torch.Tensor) -> torch.Tensor:
    from .graphed import take_prefetched
    from .w4_decode import decode_w4_group_triton

    prefetched = take_prefetched(packed)  # decoded ahead on a side stream (graphed.GraphedStep)
    return prefetched if prefetched is not None else decode_w4_group_triton(packed, luts, row_lut, block_layer, meta)


@decode_w4_group.register_fake
def _decode_w4_group_fake(packed: torch.Tensor, luts: torch.Tensor, row_lut: torch.Tensor, block_layer: torch.Tensor,
                          meta: torch.Tensor) -> torch.Tensor:
    return packed.new_empty((2 * packed.numel(),), dtype=_FP8)


@torch.library.custom_op("msfp_fast::im2col_e4m3", mutates_args=())
def im2col_e4m3(x: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int]) -> torch.Tensor:
    """x E4M3 [B, H, W, C] -> [B*Ho*Wo, kh*kw*C] (K ordered kh, kw, c; padding E4M3 +0.0); pads (l, r, t, b)."""
    b, h, w, c = x.shape
    ho, wo = conv_out_size(h, w, kernel, stride, pads)
    left, right, top, bottom = pads
    xp = F.pad(x.contiguous().view(torch.uint8), (0, 0, left, right, top, bottom))
    sh, sw = stride
    cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            for i in range(kernel[0]) for j in range(kernel[1])]
    return torch.cat(cols, dim=-1).reshape(b * ho * wo, -1).view(x.dtype)


@im2col_e4m3.register_kernel("cuda")
def _im2col_cuda(x: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int]) -> torch.Tensor:
    from .im2col import im2col_triton

    return im2col_triton(x, kernel, stride, pads)


@im2col_e4m3.register_fake
def _im2col_fake(x: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int]) -> torch.Tensor:
    b, h, w, c = x.shape
    ho, wo = conv_out_size(h, w, kernel, stride, pads)
    return x.new_empty((b * ho * wo, kernel[0] * kernel[1] * c))


@torch.library.custom_op("msfp_fast::conv_e4m3", mutates_args=())
def conv_e4m3(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int], pads: list[int]) -> torch.Tensor:
    """x E4M3 [B, H, W, C], w E4M3 [N, kh*kw*C] (K ordered kh, kw, c) -> bf16 [B*Ho*Wo, N]: the im2col rows of x
    times w^T, summed in float32 and rounded once (``torch._scaled_mm`` with unit scales); pads (l, r, t, b)."""
    cols = im2col_e4m3(x, kernel, stride, pads)
    return (cols.float() @ w.float().t()).to(torch.bfloat16)


@conv_e4m3.register_kernel("cuda")
def _conv_e4m3_cuda(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int],
                    pads: list[int]) -> torch.Tensor:
    from .conv_fp8 import conv_e4m3_triton

    return conv_e4m3_triton(x, w, kernel, stride, pads)


@conv_e4m3.register_fake
def _conv_e4m3_fake(x: torch.Tensor, w: torch.Tensor, kernel: list[int], stride: list[int],
                    pads: list[int]) -> torch.Tensor:
    b, h, wd, _ = x.shape
    ho, wo = conv_out_size(h, wd, kernel, stride, pads)
    return x.new_empty((b * ho * wo, w.shape[0]), dtype=torch.bfloat16)


@torch.library.custom_op("msfp_fast::sdpa_fp8", mutates_args=())
def sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: float, descale_k: float, descale_v: float,
             scale_o: float, attn_scale: float) -> torch.Tensor:
    """FP8 attention: q, k, v E4M3 [B, H, S, D] (views of [B, S, H, D] memory) holding values / descale; returns
    E4M3 O * scale_o, [B, H, S, Dv] in the same layout. CUDA: cuDNN's FP8 flash attention (``attention_fp8``).
    Elsewhere this reference of its rounding: P = exp(s - rowmax) rounded to E4M3 at scale ``P_SCALE`` before P @ V,
    the row sum from the unrounded P, O rounded to E4M3 (cuDNN's online softmax rounds P against the running row
    maximum, so the two agree to E4M3 rounding, not bit for bit)."""
    from .attention_fp8 import P_SCALE

    qf, kf, vf = q.float() * descale_q, k.float() * descale_k, v.float() * descale_v
    s = qf @ kf.transpose(-1, -2) * attn_scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p8 = (p * P_SCALE).to(_FP8).float() / P_SCALE
    o = (p8 @ vf) / p.sum(-1, keepdim=True) * scale_o
    return o.to(_FP8).transpose(1, 2).contiguous().transpose(1, 2)


@sdpa_fp8.register_kernel("cuda")
def _sdpa_fp8_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: float, descale_k: float,
                   descale_v: float, scale_o: float, attn_scale: float) -> torch.Tensor:
    from .attention_fp8 import sdpa_fp8_cudnn

    return sdpa_fp8_cudnn(q, k, v, descale_q, descale_k, descale_v, scale_o, attn_scale)


@sdpa_fp8.register_fake
def _sdpa_fp8_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: float, descale_k: float,
                   descale_v: float, scale_o: float, attn_scale: float) -> torch.Tensor:
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1]), dtype=_FP8).transpose(1, 2)


@torch.library.custom_op("msfp_fast::flash_fp8", mutates_args=())
def flash_fp8(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descale_q: float, descale_k: float,
              descale_v: float, shift_v: float, attn_scale: float) -> torch.Tensor:
    """FP8 attention on E4M3 grid values: q [B, H, S, D], k [B, H, T, D], vt [B, H, D, T] (V transposed), each
    holding values / descale -> bfloat16 softmax(attn_scale q k^T) v + shift_v, [B, H, S, D] viewing [B, S, H, D]
    memory. CUDA: our Triton flash kernel (``flash_fp8.flash_fp8_triton``, P rounded to E4M3 before P @ V);
    elsewhere ``flash_fp8.flash_fp8_reference`` (the same rounding against the row's maximum)."""
    from .flash_fp8 import flash_fp8_reference

    return flash_fp8_reference(q, k, vt, descale_q, descale_k, descale_v, shift_v, attn_scale)


@flash_fp8.register_kernel("cuda")
def _flash_fp8_cuda(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descale_q: float, descale_k: float,
                    descale_v: float, shift_v: float, attn_scale: float) -> torch.Tensor:
    from .flash_fp8 import flash_fp8_triton

    q, k, vt = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, vt))
    return flash_fp8_triton(q, k, vt, descale_q, descale_k, descale_v, shift_v, attn_scale)


@flash_fp8.register_fake
def _flash_fp8_fake(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, descale_q: float, descale_k: float,
                    descale_v: float, shift_v: float, attn_scale: float) -> torch.Tensor:
    b, h, s, d = q.shape
    return q.new_empty((b, s, h, d), dtype=torch.bfloat16).transpose(1, 2)


@torch.library.custom_op("msfp_fast::gn_stats", mutates_args=())
def gn_stats(parts: list[torch.Tensor], groups: int, eps: float) -> torch.Tensor:
    """GroupNorm statistics of the channel concatenation of parts ([N, C_i, H, W] each) -> float32 [2, N, G]: each
    (sample, group)'s mean and 1 / sqrt(biased variance + eps). CUDA: ``gn_stats.gn_stats_triton`` (tiles of NHWC
    rows, partials combined exactly per group by a second kernel); elsewhere this reference (torch.var_mean per group,
    float32)."""
    x = torch.cat([t.float() for t in parts], dim=1) if len(parts) > 1 else parts[0].float()
    n = x.shape[0]
    var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=-1, correction=0)
    return torch.stack([mean, torch.rsqrt(var + eps)])


@gn_stats.register_kernel("cuda")
def _gn_stats_cuda(parts: list[torch.Tensor], groups: int, eps: float) -> torch.Tensor:
    from .gn_stats import gn_stats_triton

    return gn_stats_triton(parts, groups, eps)


@gn_stats.register_fake
def _gn_stats_fake(parts: list[torch.Tensor], groups: int, eps: float) -> torch.Tensor:
    return parts[0].new_empty((2, parts[0].shape[0], groups), dtype=torch.float32)


@torch.library.custom_op("msfp_fast::gn_scale_shift", mutates_args=())
def gn_scale_shift(parts: list[torch.Tensor], groups: int, eps: float, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """GroupNorm of the channel concatenation of parts as one scale and shift per (sample, channel) -> float32
    [2, N, C]: ``rstd * w`` and ``(-mean * rstd) * w + b`` (w = 1, b = 0 where None), so that the normalization is
    ``x * scale + shift``. CUDA: ``gn_stats.gn_stats_triton(affine=...)`` (the combine kernel writes them); elsewhere
    from ``gn_stats``' reference in the same float32 operations."""
    mean, rstd = gn_stats(parts, groups, eps)
    return torch.stack(group_scale_shift(mean, rstd, sum(t.shape[1] for t in parts), weight, bias))


def group_scale_shift(mean: torch.Tensor, rstd: torch.Tensor, channels: int, weight: torch.Tensor | None,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's per-(sample, channel) scale ``rstd * w`` and shift ``(-mean * rstd) * w + b`` ([N, C] each,
    float32) from each (sample, group)'s mean ([N, G]) and 1 / std (N * G elements, any shape)."""
    n = mean.shape[0]
    groups = mean.numel() // n
    scale = rstd.reshape(n, groups, 1).expand(n, groups, channels // groups).reshape(n, channels)
    shift = -mean.reshape(n, groups, 1).expand(n, groups, channels // groups).reshape(n, channels) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


@gn_scale_shift.register_kernel("cuda")
def _gn_scale_shift_cuda(parts: list[torch.Tensor], groups: int, eps: float, weight: torch.Tensor | None,
                         bias: torch.Tensor | None) -> torch.Tensor:
    from .gn_stats import gn_stats_triton

    return gn_stats_triton(parts, groups, eps, affine=(weight, bias))


@gn_scale_shift.register_fake
def _gn_scale_shift_fake(parts: list[torch.Tensor], groups: int, eps: float, weight: torch.Tensor | None,
                         bias: torch.Tensor | None) -> torch.Tensor:
    return parts[0].new_empty((2, parts[0].shape[0], sum(t.shape[1] for t in parts)), dtype=torch.float32)
