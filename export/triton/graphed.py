"""One CUDA graph per fast-path step, captured by hand; optionally the packed-weight decode on a side stream.

``GraphedStep`` compiles the fast-path module with Inductor's default mode and captures one whole step with
``torch.cuda.graph``; a call copies the inputs and replays. torch.compile's own CUDA graphs (mode
"reduce-overhead", CUDA graph trees) cost host time on every call (their input, memory-pool and liveness checks),
which an event-timed step sees as idle GPU: at batch 1 on SD1.5 (H200) the W4A4 step took 5.65 ms that way and
4.86 ms captured here, bf16 6.0-7.4 ms against 5.39 ms (docs/triton.md, session 6).

The decode of the packed 4-bit weights (``msfp_fast::decode_w4_group``, 15 launches per SD1.5 step, ~0.45 ms) reads
no activation. With ``prefetch=True`` it runs ahead of its consumers on a second stream:

* ``DecodePrefetch`` launches every group's decode on a side stream at the start of the step, into
  buffers of its own, and records an event after each group;
* the compiled graph (Inductor, default mode: no CUDA graphs of its own) runs on the main stream; its
  ``decode_w4_group`` calls find their group prefetched (``take_prefetched``, by the packed tensor's address): the
  main stream waits for that group's event and the op returns the prefetched buffer, so the decode overlaps the
  layers before the group's first consumer;
* the side stream joins the main stream at the end, and ``torch.cuda.graph`` records the fork, the event waits and
  the join as graph edges; a replay runs the whole step with one launch.

The prefetched buffers hold every group's E4M3 weights at once (2 bytes per packed byte: 860 MB on SD1.5) where
the in-line decode needed one group's 64 MiB at a time: working memory, not resident weights (the codes stay 4-bit).
Measured at batch 1 on SD1.5: 4.92 ms against 4.86 ms in line (the decode kernels slow the main stream's kernels
they run next to, and the captured step leaves few idle gaps to fill), so the default is ``prefetch=False``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

__all__ = ["DecodePrefetch", "GraphedStep", "PerShape", "graphed_by_shape", "take_prefetched"]

_ACTIVE: "DecodePrefetch | None" = None


def take_prefetched(packed: torch.Tensor) -> torch.Tensor | None:
    """The prefetched decode of this group's packed codes while a ``DecodePrefetch`` is active (the current stream
    then waits for it), else None (the caller decodes in line)."""
    return None if _ACTIVE is None else _ACTIVE.take(packed)


class DecodePrefetch:
    """The decode groups of a fast-path module, decoded on a side stream ahead of their consumers."""

    def __init__(self, groups: list[torch.nn.Module], priority: int = 0):
        """groups: ``fast.DecodeGroup`` modules on one CUDA device; priority: of the side stream (0 is the default
        and the lowest, the same as the capture stream's)."""
        self.groups = groups
        dev = groups[0].packed.device
        self.side = torch.cuda.Stream(device=dev, priority=priority)
        self.out = [torch.empty(2 * g.packed.numel(), dtype=torch.float8_e4m3fn, device=dev) for g in groups]
        self.events = [torch.cuda.Event() for _ in groups]
        self.index = {(g.packed.data_ptr(), g.packed.numel()): i for i, g in enumerate(groups)}
        self.taken = 0  # groups the last step took prefetched (all of them unless the module's buffers moved)

    def launch(self) -> None:
        """Fork the side stream from the current one and decode every group on it, an event after each."""
        from .w4_decode import decode_w4_group_triton

        self.taken = 0
        self.side.wait_stream(torch.cuda.current_stream())  # the previous step's readers of the buffers are done
        with torch.cuda.stream(self.side):
            for g, out, ev in zip(self.groups, self.out, self.events):
                decode_w4_group_triton(g.packed, g.luts, g.row_lut, g.block_layer, g.meta, out=out)
                ev.record()

    def take(self, packed: torch.Tensor) -> torch.Tensor | None:
        i = self.index.get((packed.data_ptr(), packed.numel()))
        if i is None:
            return None
        torch.cuda.current_stream().wait_event(self.events[i])
        self.taken += 1
        return self.out[i]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Launch the decodes; inside, decode ops take their prefetched group; on exit the side stream joins."""
        global _ACTIVE
        self.launch()
        _ACTIVE = self
        try:
            yield
        finally:
            _ACTIVE = None
            torch.cuda.current_stream().wait_stream(self.side)


class GraphedStep:
    """``fn(*inputs)`` (a torch.compile'd fast-path module, default mode, or ``TritonRunner``'s graph) captured as one
    CUDA graph, with the module's decode groups decoded in line (default) or prefetched on a side stream
    (``prefetch=True``).

    Calls copy the tensor inputs into the captured ones (other arguments are fixed at capture) and replay; the
    returned output is the graph's output buffer, overwritten by the next call (clone it to keep it)."""

    def __init__(self, fn: Callable[..., Any], module: torch.nn.Module, example: tuple,
                 prefetch: bool = False, warmup: int = 2):
        """module: the fast-path module fn runs (its ``DecodeGroup`` submodules are prefetched); example: inputs of
        the shapes and dtypes every call passes (the first warm-up call compiles)."""
        self.prefetch = None
        if prefetch:
            from .fast import DecodeGroup

            groups = [m for m in module.modules() if isinstance(m, DecodeGroup)]
            self.prefetch = DecodePrefetch(groups) if groups else None
        self.fn = fn
        self.inputs = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # warm-up outside the capture (compiles, autotunes)
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = self._run()

    def _run(self) -> Any:
        if self.prefetch is None:
            return self.fn(*self.inputs)
        with self.prefetch.active():
            return self.fn(*self.inputs)

    def __call__(self, *args: Any) -> Any:
        for dst, src in zip(self.inputs, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        return self.output


class PerShape:
    """``build(example)`` once per new combination of input shapes and dtypes, then reused: a CUDA graph replays
    fixed shapes, and a sampler calls with a full chunk and then a smaller last one. A step's output is its own
    buffer (GraphedStep's), so the output of one shape survives calls of another."""

    def __init__(self, build: Callable[[tuple], Callable[..., torch.Tensor]]):
        self.build = build
        self.steps: dict[tuple, Callable[..., torch.Tensor]] = {}

    def __call__(self, *args: Any) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self.build(args)
        return step(*args)


def graphed_by_shape(module: torch.nn.Module, prefetch: bool = False) -> PerShape:
    """The fast-path module as the benchmark times it (tools/bench_gpu_sd15.py ``--fast-mode graph``): Inductor's
    default mode with static shapes (one specialization per batch size, not a dynamic batch after the second one),
    captured by ``GraphedStep`` once per input shapes."""
    fn = torch.compile(module, dynamic=False)
    return PerShape(lambda example: GraphedStep(fn, module, example, prefetch=prefetch))
