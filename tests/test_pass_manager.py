"""pass_manager: the PassManager (order, lint, errors naming the pass, logs, graph dumps) and compile()'s pass list."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from msfp_compiler.errors import MsfpError
from msfp_compiler.pass_manager import Pass, PassManager, PassResult


def _gm() -> fx.GraphModule:
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return fx.symbolic_trace(M())


class AddNeg:
    """A well-behaved pass: inserts neg() before the output."""

    name = "add_neg"

    def __call__(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(torch.neg, (out.args[0],))
        out.args = (neg,)
        return PassResult(gm, True, {"inserted": 1}, ["line one", "line two"])


def nothing(gm):
    return PassResult(gm, False, {"checked": True})


class Breaks:
    """Leaves a node that uses a value defined after it: graph.lint() must reject it."""

    name = "breaks"

    def __call__(self, gm):
        nodes = list(gm.graph.nodes)
        relu, add = nodes[1], nodes[2]
        relu.args = (add,)
        return PassResult(gm, True)


class Raises:
    name = "raises"

    def __init__(self, exc):
        self.exc = exc

    def __call__(self, gm):
        raise self.exc


def test_runs_passes_in_order_and_recompiles(tmp_path: Path) -> None:
    order = []

    def first(gm):
        order.append("first")
        return PassResult(gm, False)

    pm = PassManager([first, AddNeg(), nothing])
    gm = pm(_gm())
    assert order == ["first"]
    assert [r.name for r in pm.runs] == ["first", "add_neg", "nothing"]
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(gm(x), -(torch.relu(x) + 1))  # the new code is live (recompiled)
    run = pm.runs[1]
    assert run.modified and run.nodes_after == run.nodes_before + 1 and run.info == {"inserted": 1}
    assert run.seconds >= 0 and run.peak_rss_mb > 0
    assert not pm.runs[2].modified


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-pass peak RSS needs Linux /proc")
def test_each_pass_reports_its_own_peak_rss_and_cpu_time() -> None:
    def big(gm):
        t = torch.ones(64 * 2**20)  # 256 MB, touched, then freed when the pass returns
        assert float(t[::4096].sum()) == 16384
        return PassResult(gm, False)

    def busy(gm):
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass
        return PassResult(gm, False)

    pm = PassManager([big, nothing, busy])
    pm(_gm())
    peak_big, peak_after = pm.runs[0].peak_rss_mb, pm.runs[1].peak_rss_mb
    assert peak_big > peak_after + 200, (peak_big, peak_after)  # the mark was reset between the passes
    assert pm.runs[2].cpu_seconds >= 0.05 and pm.runs[1].cpu_seconds < 0.05


def test_writes_json_lines_and_text_blocks(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    pm = PassManager([AddNeg(), nothing], log_dir=logs, dump_graphs=True)
    pm.record("capture", 0.5, {"nodes": 4})
    pm(_gm())
    rows = [json.loads(line) for line in (logs / "passes.jsonl").read_text().splitlines()]
    assert [r["pass"] for r in rows] == ["capture", "add_neg", "nothing"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["seconds"] == 0.5 and rows[0]["nodes"] == 4
    assert rows[1]["inserted"] == 1 and rows[1]["modified"] is True and rows[2]["checked"] is True
    assert all(isinstance(r["seconds"], float) and r["cpu_seconds"] >= 0 for r in rows)
    text = (logs / "passes.log").read_text()
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 3
    assert blocks[1].startswith("== pass 1: add_neg") and "nodes 4 -> 5" in blocks[1]
    assert "   inserted: 1" in blocks[1] and "   line one" in blocks[1] and "   line two" in blocks[1]
    dumps = sorted(p.name for p in logs.glob("graph_*.txt"))
    assert dumps == ["graph_01_add_neg.txt", "graph_02_nothing.txt"]
    assert "neg" in (logs / "graph_01_add_neg.txt").read_text()


def test_logs_start_fresh_on_each_manager(tmp_path: Path) -> None:
    for _ in range(2):
        PassManager([nothing], log_dir=tmp_path)(_gm())
    assert len((tmp_path / "passes.jsonl").read_text().splitlines()) == 1


def test_no_log_dir_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    PassManager([AddNeg()], dump_graphs=True)(_gm())
    assert list(tmp_path.iterdir()) == []


def test_invalid_graph_names_the_pass() -> None:
    with pytest.raises(RuntimeError, match="pass 'breaks' left an invalid graph"):
        PassManager([nothing, Breaks()])(_gm())


def test_internal_error_names_pass_and_history() -> None:
    with pytest.raises(RuntimeError, match=r"pass 'raises' failed \(after \['add_neg'\]\)") as e:
        PassManager([AddNeg(), Raises(ValueError("boom"))])(_gm())
    assert isinstance(e.value.__cause__, ValueError)


def test_user_error_passes_through_unchanged() -> None:
    err = MsfpError("node x: bad input")
    with pytest.raises(MsfpError) as e:
        PassManager([Raises(err)])(_gm())
    assert e.value is err


class Checked(Pass):
    """A Pass subclass that records the order of its hooks; ``broken`` makes ensures fail."""

    name = "checked"

    def __init__(self, broken: bool = False):
        self.calls: list[str] = []
        self.broken = broken

    def requires(self, gm):
        self.calls.append("requires")

    def call(self, gm):
        self.calls.append("call")
        return PassResult(gm, False)

    def ensures(self, gm):
        self.calls.append("ensures")
        assert not self.broken, "invariant broken"


def test_pass_base_checks_requires_then_call_then_ensures() -> None:
    p = Checked()
    PassManager([p])(_gm())
    assert p.calls == ["requires", "call", "ensures"]
    with pytest.raises(RuntimeError, match="pass 'checked' failed") as e:
        PassManager([nothing, Checked(broken=True)])(_gm())
    assert "invariant broken" in str(e.value.__cause__)


def test_run_in_parts_with_a_stage_between_keeps_one_log(tmp_path: Path) -> None:
    pm = PassManager(log_dir=tmp_path)
    gm = pm.run(_gm(), [AddNeg()])
    pm.record("train", 0.5, {"steps": 3}, report=["loss 1.0 -> 0.5"])
    pm.run(gm, [nothing])
    rows = [json.loads(line) for line in (tmp_path / "passes.jsonl").read_text().splitlines()]
    assert [r["pass"] for r in rows] == ["add_neg", "train", "nothing"] and rows[1]["steps"] == 3
    assert "loss 1.0 -> 0.5" in (tmp_path / "passes.log").read_text()


def test_compile_runs_the_default_passes_in_order(compiled) -> None:
    names = [r.name for r in compiled.pass_runs]
    assert names == ["capture", "calibrate", "annotate_sign", "select_format", "insert_qdq", "fold_zero_point",
                     "pack_weights", "lower_onnx"]
    by = {r.name: r for r in compiled.pass_runs}
    assert by["capture"].nodes_before == 0 and by["capture"].nodes_after == by["annotate_sign"].nodes_before > 0
    assert by["calibrate"].info["samples"] == compiled.config.calib.num_samples
    assert by["insert_qdq"].info["quantize_nodes"] > 0
    assert by["lower_onnx"].info["msfp_nodes"] == compiled.onnx_op_counts
    # the per-layer summary covers every quantized tensor still in the graph
    assert compiled.layers and {s.role for s in compiled.layers} == {"act", "weight"}
    assert any(not s.signed and s.after_silu for s in compiled.layers)
    table = compiled.summary_table().splitlines()
    assert len(table) == len(compiled.layers) + 1


def test_default_passes_respect_config() -> None:
    from msfp_compiler.calibration import CalibrationSet
    from msfp_compiler.compile import default_passes
    from msfp_compiler.config import CompileConfig

    calib = CalibrationSet([])
    names = lambda cfg: [p.name for p in default_passes(cfg, calib)]  # noqa: E731
    assert names(CompileConfig()) == ["annotate_sign", "select_format", "insert_qdq", "fold_zero_point",
                                      "pack_weights"]
    assert names(CompileConfig(pack_weights=False, fold_zero_point=False)) == ["annotate_sign", "select_format",
                                                                               "insert_qdq"]
