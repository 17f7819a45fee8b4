"""How the GPU benchmarks time things (tools/bench_triton.py, bench_gpu_sd15.py, bench_gpu_kernels.py): one helper.

* ``kernel_ms``: median of ``triton.testing.do_bench`` (L2 flushed before each run, launch cost included): a kernel
  or a few launches on their own.
* ``graphed_ms``: median of ``triton.testing.do_bench_cudagraph``: device time without Python launch cost (the
  library's ``msfp_compiler.export.triton.timing.graphed_ms``, which the conv tuner uses too).
* ``step_ms``: median / min / max of CUDA-event times of single calls (a whole UNet step), with
  ``torch.compiler.cudagraph_mark_step_begin`` before each call for torch.compile's CUDA graphs.
* ``cuda_graph``: capture ``fn(*args)`` once (after warm-up on a side stream); returns the replay.
* ``hold_gpu_lock``: an exclusive flock held until the process ends, so benchmarks in parallel processes time one
  at a time.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from msfp_compiler.export.triton.timing import graphed_ms

__all__ = ["kernel_ms", "graphed_ms", "step_ms", "cuda_graph", "hold_gpu_lock"]


def kernel_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn (triton.testing.do_bench; ``warmup`` / ``rep`` in milliseconds)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def step_ms(fn: Callable[[], Any], iters: int, warmup: int = 3, mark_step: bool = False) -> dict:
    """Median / min / max of CUDA-event timings of fn (one call each), as a JSON-ready dict."""
    for _ in range(warmup):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return {"median_ms": round(statistics.median(ts), 4), "min_ms": round(min(ts), 4), "max_ms": round(max(ts), 4),
            "iters": iters}


def cuda_graph(fn: Callable[..., Any], args: tuple) -> Callable[[], Any]:
    """Capture fn(*args) once; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    return g.replay


def hold_gpu_lock(path: str) -> float:
    """Wait for an exclusive flock on ``path`` and hold it until the process ends; returns the seconds waited."""
    import fcntl
    import time

    t0 = time.perf_counter()
    lock = open(path, "a")  # noqa: SIM115  (never closed: the lock lives as long as the process)
    fcntl.flock(lock, fcntl.LOCK_EX)
    _HELD.append(lock)
    return time.perf_counter() - t0


_HELD: list = []  # the open lock files (a closed or collected file would release its lock)
