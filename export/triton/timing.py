"""Device time of a CUDA-graph replay: what a kernel costs inside a captured step (the fast path's runtime choice
of conv tiles, ``conv_fp8.pick_conv_config``, and the GPU benchmarks through ``tools/gpu_timing.py`` use this one
helper)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["graphed_ms"]


def graphed_ms(fn: Callable[[], Any], rep: int = 50) -> float:
    """Median milliseconds of fn replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: no host launch
    cost, so one launch and two launches compare by their device time). Where fn cannot be captured here (e.g.
    during another capture on this device) it is timed launched instead (``do_bench``)."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except RuntimeError:
        return float(do_bench(fn, warmup=5, rep=rep, return_mode="median"))
