"""Pass infrastructure: the Pass base class, PassResult and the PassManager that runs, validates, times and logs.

A pass transforms a graph: ``Pass.call(gm) -> PassResult`` with an honest ``modified``; ``requires`` checks its
preconditions and ``ensures`` its invariants (as torch.fx's PassBase and onnx_ir's passes do). Passes never print,
train or touch files. The manager is the one place that lints the graph after each pass, measures wall time, CPU
time and peak memory, writes ``passes.jsonl`` (one JSON object per pass or stage) and ``passes.log`` (a readable
block each), and dumps graphs. Stages that are not graph passes (capture, distillation, ONNX lowering) are logged
in the same format through ``record``. The peak RSS of a pass is its own: on Linux the kernel's high-water mark
(VmHWM) is reset before each pass (``/proc/self/clear_refs``); elsewhere it is the process's peak so far.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch.fx as fx

from .errors import MsfpError

__all__ = ["PassResult", "Pass", "PassManager", "PassRun", "peak_rss_mb", "reset_peak_rss"]

log = logging.getLogger("msfp")


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and facts for the log."""

    graph_module: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)  # JSON-able numbers and short strings
    report: list[str] = field(default_factory=list)  # readable lines (e.g. one per layer) for passes.log


class Pass:
    """Base of a graph pass: subclasses set ``name`` and implement ``call``; ``requires``/``ensures`` are optional.

    ``requires`` raises (MsfpError for what a user can cause, AssertionError/RuntimeError for a misordered pipeline)
    when the graph does not meet the pass's preconditions; ``ensures`` checks what the pass promises afterwards.
    """

    name: str = ""

    def requires(self, gm: fx.GraphModule) -> None:
        """Preconditions on the input graph (default: none)."""

    def ensures(self, gm: fx.GraphModule) -> None:
        """Invariants of the output graph (default: none)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        res = self.call(gm)
        self.ensures(res.graph_module)
        return res


@dataclass
class PassRun:
    name: str
    seconds: float
    peak_rss_mb: float
    nodes_before: int
    nodes_after: int
    modified: bool
    info: dict[str, Any]
    cpu_seconds: float = 0.0  # process CPU time (all threads)


def _pass_name(p: Callable) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)


_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak_rss`` (VmHWM), or since process start where /proc is missing."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M)
        if m:
            return int(m.group(1)) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PassManager:
    """Runs passes in order; after each: graph.lint(), recompile, timing, one JSON line + one text block."""

    def __init__(self, passes: Sequence[Callable[[fx.GraphModule], PassResult]] = (), log_dir: Path | None = None,
                 dump_graphs: bool = False):
        self.passes = list(passes)
        self.log_dir = Path(log_dir) if log_dir else None
        self.dump_graphs = dump_graphs
        self.runs: list[PassRun] = []

        self._started = False
        self._done: list[str] = []  # passes run so far, named in the error of a failing pass

    def _start_logs(self) -> None:
        if self._started:
            return
        self._started = True
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for f in ("passes.jsonl", "passes.log"):
                (self.log_dir / f).write_text("")

    def record(self, name: str, seconds: float, info: dict[str, Any], cpu_seconds: float = 0.0,
               report: Sequence[str] | None = None, *, nodes: tuple[int, int] = (0, 0)) -> None:
        """Log a stage that is not an fx pass (capture, ONNX lowering, --check, plots) in the same format; its peak
        RSS is the peak since the previous pass or stage ended. ``nodes``: graph size before and after, where the
        stage has one (capture: 0 -> the captured graph)."""
        self._start_logs()
        run = PassRun(name, seconds, peak_rss_mb(), nodes[0], nodes[1], False, info, cpu_seconds)
        reset_peak_rss()
        self.runs.append(run)
        log.info("stage %-17s %7.3fs  %s", name, seconds,
                 " ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list))))
        self._write(len(self.runs) - 1, run, PassResult(None, False, info, list(report or [])))  # type: ignore[arg-type]

    @contextmanager
    def stage(self, name: str) -> Iterator[tuple[dict[str, Any], list[str]]]:
        """Measure a stage that is not a graph pass (calibration, capture, distillation, lowering) like a pass:
        wall time, CPU time and its own peak RSS. The block fills the yielded (info, report) for the log."""
        info: dict[str, Any] = {}
        report: list[str] = []
        reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        yield info, report
        nodes = (0, int(info.get("nodes", 0))) if name == "capture" else (0, 0)  # capture makes the graph
        self.record(name, time.perf_counter() - t0, info, time.process_time() - c0, report, nodes=nodes)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        return self.run(gm, self.passes)

    def run(self, gm: fx.GraphModule, passes: Sequence[Callable[[fx.GraphModule], PassResult]]) -> fx.GraphModule:
        """Run ``passes`` in order on gm, logging each like the manager's own list (a pipeline run in parts, with
        stages between them, keeps one log)."""
        self._start_logs()
        done = self._done
        for p in passes:
            name = _pass_name(p)
            before = len(gm.graph.nodes)
            reset_peak_rss()
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                res = p(gm)
            except MsfpError:
                raise
            except Exception as e:
                raise RuntimeError(f"pass {name!r} failed (after {done or 'no passes'})") from e
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            gm = res.graph_module
            try:
                gm.graph.lint()
            except Exception as e:
                raise RuntimeError(f"pass {name!r} left an invalid graph: {e}") from e
            gm.recompile()
            run = PassRun(name, seconds, peak_rss_mb(), before, len(gm.graph.nodes), res.modified, res.info, cpu)
            reset_peak_rss()
            self.runs.append(run)
            done.append(name)
            i = len(self.runs) - 1  # log index counts stages recorded before the passes (capture)
            log.info("pass %-18s %7.3fs  nodes %d -> %d  %s", name, seconds, before, run.nodes_after,
                     " ".join(f"{k}={v}" for k, v in res.info.items() if not isinstance(v, (dict, list))))
            self._write(i, run, res)
            if self.dump_graphs and self.log_dir:
                (self.log_dir / f"graph_{i:02d}_{name}.txt").write_text(str(gm.graph))
        return gm

    def _write(self, i: int, run: PassRun, res: PassResult) -> None:
        if not self.log_dir:
            return
        row = {"index": i, "pass": run.name, "seconds": round(run.seconds, 6), "cpu_seconds": round(run.cpu_seconds, 3),
               "peak_rss_mb": round(run.peak_rss_mb, 1),
               "nodes_before": run.nodes_before, "nodes_after": run.nodes_after, "modified": run.modified, **run.info}
        with open(self.log_dir / "passes.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=False, default=str) + "\n")
        nodes = f"  nodes {run.nodes_before} -> {run.nodes_after}" if run.nodes_before or run.nodes_after else ""
        head = (f"== pass {i}: {run.name}  {run.seconds:.3f}s (CPU {run.cpu_seconds:.2f}s){nodes}  "
                f"peak RSS {run.peak_rss_mb:.0f} MB")
        info = [f"   {k}: {v}" for k, v in run.info.items() if not isinstance(v, (dict, list))]
        with open(self.log_dir / "passes.log", "a") as f:
            f.write("\n".join([head, *info, *("   " + line for line in res.report)]) + "\n\n")
