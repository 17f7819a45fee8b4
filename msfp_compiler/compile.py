"""The one verb: ``compile(model, config) -> CompiledModel`` (capture, calibrate, passes, ONNX lowering)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
import torch.fx as fx

from .calibration import CalibBatch, CalibrationSet, collect
from .capture import UNetSignature, capture, signature_of
from .check import CheckResult, check_onnx
from .config import FP32_SCHEME, CompileConfig
from .device import exact_fp32, move_graph, move_tensors, resolve_device
from .errors import MsfpError
from .load import LoadedModel
from .pass_manager import PassManager, PassRun, reset_peak_rss
from .record import records
from .sampling import make_scheduler

__all__ = ["CompiledModel", "compile", "default_passes", "quantize_passes", "lowering_passes", "LayerSummary",
           "CheckResult"]

log = logging.getLogger("msfp")


@dataclass
class LayerSummary:
    node: str
    role: str
    fmt: str
    bits: int
    signed: bool
    after_silu: bool
    neg_fraction: float
    mse: float
    consumers: list[str]
    name: str = ""  # readable: module path of the layer reading it (names.py)


@dataclass
class CompiledModel:
    graph_module: fx.GraphModule  # the quantized torch graph (reference semantics of the ONNX)
    onnx_model: onnx.ModelProto | None  # None when compiled with lower=False
    signature: UNetSignature
    calibration: CalibrationSet
    config: CompileConfig
    pass_runs: list[PassRun] = field(default_factory=list)
    layers: list[LayerSummary] = field(default_factory=list)
    onnx_op_counts: dict[str, int] = field(default_factory=dict)
    scheduler_config: dict | None = None
    class_embedding: torch.Tensor | None = None
    pass_manager: PassManager | None = None  # logs later stages (--check, plots) into the same passes.log

    def log_stage(self, name: str, seconds: float, info: dict, cpu_seconds: float = 0.0,
                  report: list[str] | None = None) -> None:
        """Record a stage run after compile() (--check, plots) in passes.log / passes.jsonl."""
        if self.pass_manager is not None:
            self.pass_manager.record(name, seconds, info, cpu_seconds, report=report)
            self.pass_runs = self.pass_manager.runs

    def _need_onnx(self) -> None:
        if self.onnx_model is None:
            raise MsfpError("this model was compiled with lower=False: it has no ONNX to save or check")

    def save(self, path: str | Path) -> Path:
        from msfp_compiler.export.onnx import save_atomic

        self._need_onnx()
        save_atomic(self.onnx_model, Path(path))
        return Path(path)

    def save_pt2(self, path: str | Path) -> Path:
        """The quantized program via torch.export.save (for the Triton GPU runner)."""
        args = self.calibration.holdout[0].args if self.calibration.holdout else self.calibration.batches[0].args
        ep = torch.export.export(self.graph_module, args, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in args))
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.export.save(ep, str(tmp))
        tmp.replace(path)
        return path

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.graph_module(*args)

    def check(self, tolerance: float = 1e-3, batches: list[CalibBatch] | None = None) -> CheckResult:
        """Run the ONNX in onnxruntime on held-out inputs and compare it with the torch quantized graph quantizer
        by quantizer (msfp_compiler.check): rounding flips are counted, anything else fails and is named."""
        self._need_onnx()
        batches = batches or self.calibration.holdout or self.calibration.batches[-1:]
        return check_onnx(self.graph_module, self.onnx_model, batches, tolerance)

    def summary_table(self) -> str:
        w = max([48] + [len(s.name or s.node) for s in self.layers])
        rows = [f"{'tensor':<{w}} {'role':<6} {'format':<6} {'bits':>4} {'neg%':>6} {'silu':>4} {'mse':>10}"]
        for s in self.layers:
            rows.append(f"{s.name or s.node:<{w}} {s.role:<6} {s.fmt:<6} {s.bits:>4} {100 * s.neg_fraction:6.1f} "
                        f"{'yes' if s.after_silu else '':>4} {s.mse:10.3g}")
        return "\n".join(rows)


def quantize_passes(config: CompileConfig, calib: CalibrationSet) -> list:
    """Statistics, format selection and QDQ insertion: the graph after these is the quantized model."""
    from msfp_compiler.passes.annotate_sign import AnnotateSign
    from msfp_compiler.passes.insert_qdq import InsertQDQ
    from msfp_compiler.passes.select_format import SelectFormat

    return [AnnotateSign(calib, config.quant.sample_per_group, config.calib.seed,
                         config.quant.quantize_attention, config.quant.split_concat), SelectFormat(config.quant),
            InsertQDQ()]


def lowering_passes(config: CompileConfig, extra: list[Callable] | None = None) -> list:
    """Passes that prepare the quantized graph for lowering (after fine-tuning, when it runs)."""
    from msfp_compiler.passes.fold_zero_point import FoldZeroPoint
    from msfp_compiler.passes.fuse_talora import FuseTALoRA
    from msfp_compiler.passes.pack_weights import PackWeights

    passes: list = [FuseTALoRA()] if config.finetune is not None else []
    passes += list(extra or [])
    if config.fold_zero_point:
        passes.append(FoldZeroPoint())
    if config.pack_weights:
        passes.append(PackWeights())
    return passes


def default_passes(config: CompileConfig, calib: CalibrationSet, extra: list[Callable] | None = None) -> list:
    """Every graph pass compile runs, in order (the distillation stage, when configured, runs after insert_qdq)."""
    return quantize_passes(config, calib) + lowering_passes(config, extra)


def _finetune(gm: fx.GraphModule, unet: torch.nn.Module, sig: UNetSignature, loaded: LoadedModel,
              config: CompileConfig, progress: bool | None, pm: PassManager) -> None:
    """The distillation stage: FP trajectories as data, TALoRA training on gm in place, logged like a pass."""
    from .distillation import finetune

    ft = config.finetune
    with pm.stage("finetune") as (info, report):
        sched = make_scheduler(ft.sampler, loaded.scheduler_config)
        # Held-out trajectories from a seed of their own: the same set whatever ft.samples is, so runs with more or
        # fewer training trajectories are probed on the same inputs. Student-only training labels its own inputs,
        # so the FP outputs are not kept there.
        data = collect(unet, sig, ft.samples, ft.sampler_steps, ft.seed + 1, sched, num_groups=1,
                       holdout_samples=ft.holdout_samples, class_embedding=loaded.class_embedding,
                       progress=progress, keep_outputs=ft.trajectories != "student", holdout_seed=ft.seed + 3)
        res = finetune(gm, unet, sig, data, ft, make_scheduler(ft.sampler, loaded.scheduler_config), progress)
        info.update(res.log_info(ft))
        report += res.log_report()


def _calibrate(unet: torch.nn.Module, gm: fx.GraphModule, sig: UNetSignature, loaded: LoadedModel,
               config: CompileConfig, progress: bool | None, pm: PassManager) -> CalibrationSet:
    """The calibration stage, through the captured graph so the same forwards give annotate_sign its statistics."""
    c = config.calib
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    sched = make_scheduler(c.scheduler, loaded.scheduler_config)
    calibration = collect(unet, sig, c.num_samples, c.num_steps, c.seed, sched, c.num_groups, c.holdout_samples,
                          loaded.class_embedding, progress, graph=gm, sample_per_group=config.quant.sample_per_group,
                          stats_seed=c.seed, attention=config.quant.quantize_attention,
                          split_concat=config.quant.split_concat)
    pm.record("calibrate", time.perf_counter() - t0,
              {"samples": c.num_samples, "steps": c.num_steps, "groups": len(calibration.groups),
               "holdout_samples": c.holdout_samples, "statistics": "from the same forwards (captured graph)",
               **({"size_rule": c.note} if c.note else {})},
              time.process_time() - c0)
    return calibration


def _lower(gm: fx.GraphModule, calibration: CalibrationSet, sig: UNetSignature, config: CompileConfig,
           unet_config: dict, pm: PassManager) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The ONNX lowering stage (on the CPU)."""
    from msfp_compiler.export.onnx import lower_to_onnx

    log.info("lowering to ONNX (torch.onnx.export) ...")
    with pm.stage("lower_onnx") as (info, _):
        # not the hold-out: --check must not change the model (fp32 has no calibration batches, only the example)
        example = (calibration.batches or calibration.holdout)[0].args
        onnx_model, counts = lower_to_onnx(gm, example, sig.input_names, integer=config.integer_kernels,
                                           conv_weights=config.conv_weights, unet_config=unet_config)
        info.update(msfp_nodes=counts, onnx_nodes=len(onnx_model.graph.node))
    if not counts and config.quant.scheme != FP32_SCHEME:
        raise MsfpError("lowering produced no msfp nodes (nothing was quantized)")
    return onnx_model, counts


def check_layer_names(unet: torch.nn.Module, keep_8bit: tuple[str, ...]) -> None:
    """keep_8bit names must be 'first', 'last', 'last_block' (a UNet with up_blocks), module paths of layers (or of
    blocks holding layers) or fnmatch patterns matching at least one layer path."""
    from .names import CONV_NAMES, expand_keep_names, layer_matches, model_layer_names, unknown_keep_error

    valid = model_layer_names(unet)
    keep = expand_keep_names(keep_8bit, valid)
    unknown = [k for k in keep if k not in CONV_NAMES and not any(layer_matches(k, v) for v in valid)]
    if unknown:
        raise unknown_keep_error(unknown, valid)


def _summaries(gm: fx.GraphModule) -> list[LayerSummary]:
    from .names import tensor_names

    names = tensor_names(gm)
    out = []
    for node, rec in records(gm):
        c = rec.choice
        out.append(LayerSummary(node.name, rec.role, c.fmt, rec.bits, c.signed, rec.after_silu,
                                rec.neg_fraction if rec.role == "act" else 0.0, c.mse, rec.consumers,
                                names.get(node.name, node.name)))
    return out


def compile(model: torch.nn.Module | LoadedModel, config: CompileConfig | None = None, *,
            log_dir: str | Path | None = None, dump_graphs: bool = False, progress: bool | None = None,
            calibration: CalibrationSet | None = None, extra_passes: list[Callable] | None = None,
            lower: bool = True) -> CompiledModel:
    """Quantize a diffusers UNet with MSFP (or a baseline scheme) and lower it to ONNX with msfp custom ops.

    Calibration, statistics, the format search and fine-tuning run on ``config.device``; capture and lowering on the
    CPU, and the returned model lives on the CPU. ``lower=False`` stops after the passes: the CompiledModel then
    holds the quantized torch graph only (``onnx_model`` is None), e.g. to sample it on the GPU."""
    config = config or CompileConfig()
    device = resolve_device(config.device)
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model, Path("<module>"))
    unet = loaded.unet.eval().float()
    home = next(unet.parameters()).device
    check_layer_names(unet, config.quant.keep_8bit)  # before the minutes of calibration, not after
    sig = signature_of(unet, cond_len=config.calib.text_len)
    fp32 = config.quant.scheme == FP32_SCHEME
    if fp32 and calibration is None:
        # nothing to calibrate: one random batch is the export example and the check's hold-out
        from .capture import example_inputs

        args = example_inputs(sig, 2, torch.Generator().manual_seed(config.calib.seed))
        calibration = CalibrationSet([], [CalibBatch(*args)])
    pm = PassManager(log_dir=log_dir, dump_graphs=dump_graphs)
    with pm.stage("capture") as (info, _):
        gm, sig = capture(unet.to("cpu"), sig)
        info["nodes"] = len(gm.graph.nodes)
    unet.to(device)
    gm = move_graph(gm, device)
    try:
        # Statistics, the search and fine-tuning in plain FP32 (no TF32 on CUDA): CPU and GPU choose the same
        # formats, and scales agree up to float summation order.
        with exact_fp32():
            if calibration is None:
                calibration = _calibrate(unet, gm, sig, loaded, config, progress, pm)
            else:
                calibration = move_tensors(calibration, device)
            if not fp32:
                gm = pm.run(gm, quantize_passes(config, calibration))
                if config.finetune is not None:
                    _finetune(gm, unet, sig, loaded, config, progress, pm)
                gm = pm.run(gm, lowering_passes(config, extra_passes))
    finally:
        unet.to(home)
    # Lowering, and the CompiledModel, on the CPU.
    gm = move_graph(gm, "cpu")
    calibration = move_tensors(calibration, torch.device("cpu"))
    onnx_model, counts = _lower(gm, calibration, sig, config, dict(unet.config), pm) if lower else (None, {})
    return CompiledModel(gm, onnx_model, sig, calibration, config, pm.runs, _summaries(gm), counts,
                         loaded.scheduler_config, loaded.class_embedding, pm)
