"""The one verb: ``compile(model, config) -> CompiledModel`` (capture, calibrate, passes, ONNX lowering)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
import torch.fx as fx

from .calibration import CalibBatch, CalibrationSet, collect
from .sampling import make_scheduler
from .capture import UNetSignature, capture, signature_of
from .config import CompileConfig
from .device import exact_fp32, move_graph, move_tensors, resolve_device
from .errors import MsfpError
from .load import LoadedModel
from .pass_manager import PassManager, PassRun
from .record import records

__all__ = ["CompiledModel", "compile", "default_passes", "quantize_passes", "lowering_passes", "LayerSummary",
           "CheckResult"]


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


@dataclass
class CheckResult:
    """ORT vs torch quantized graph on held-out calibration inputs, per sample.

    The pass criterion is the *median* per-sample relative RMSE. Why not the max: ORT and torch sum convolutions
    and evaluate sin/exp in different orders, so a value within an ulp of an FP4 rounding threshold can land on
    the neighbouring grid level in one backend; that flip is a full FP4 step and propagates through the rest of
    the UNet (a flip in the timestep embedding changes the whole sample). A lowering bug shows in every sample, a
    threshold flip in a few, so the median catches bugs while the flips are counted and reported.
    """

    per_sample_rel_rmse: list[float]
    max_abs: float
    tolerance: float

    @property
    def median(self) -> float:
        return float(torch.tensor(self.per_sample_rel_rmse).median())

    @property
    def flipped(self) -> int:
        return sum(e > self.tolerance for e in self.per_sample_rel_rmse)

    @property
    def ok(self) -> bool:
        return self.median <= self.tolerance

    def __str__(self) -> str:
        return (f"ORT vs torch: median rel-RMSE {self.median:.2e} (tolerance {self.tolerance:.0e}), "
                f"max abs {self.max_abs:.3g}, {self.flipped}/{len(self.per_sample_rel_rmse)} samples with "
                f"rounding-threshold flips")


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
        """Run the ONNX in onnxruntime on held-out inputs and compare with the torch quantized graph."""
        from msfp_compiler.export.ort import OrtUNet, session_from_model

        # ORT folds the DequantizeFP4Packed bodies itself here, so the check covers every function body a plain
        # onnxruntime.InferenceSession(path) runs (open_session's predecoding would bypass that body).
        self._need_onnx()
        ort_unet = OrtUNet(session_from_model(self.onnx_model, predecode=False))
        batches = batches or self.calibration.holdout or self.calibration.batches[-1:]
        errs: list[float] = []
        max_abs = 0.0
        for b in batches:
            ref = self(*b.args).double()
            out = ort_unet(*b.args).double()
            dims = tuple(range(1, ref.dim()))
            rel = (out - ref).pow(2).sum(dims).sqrt() / ref.pow(2).sum(dims).sqrt().clamp_min(1e-30)
            errs += rel.tolist()
            max_abs = max(max_abs, float((out - ref).abs().max()))
        return CheckResult(errs, max_abs, tolerance)

    def summary_table(self) -> str:
        rows = [f"{'tensor':<48} {'role':<6} {'format':<6} {'bits':>4} {'neg%':>6} {'silu':>4} {'mse':>10}"]
        for s in self.layers:
            rows.append(f"{s.node:<48} {s.role:<6} {s.fmt:<6} {s.bits:>4} {100 * s.neg_fraction:6.1f} "
                        f"{'yes' if s.after_silu else '':>4} {s.mse:10.3g}")
        return "\n".join(rows)


def quantize_passes(config: CompileConfig, calib: CalibrationSet) -> list:
    """Statistics, format selection and QDQ insertion: the graph after these is the quantized model."""
    from msfp_compiler.passes.annotate_sign import AnnotateSign
    from msfp_compiler.passes.insert_qdq import InsertQDQ
    from msfp_compiler.passes.select_format import SelectFormat

    return [AnnotateSign(calib, config.quant.sample_per_group, config.calib.seed), SelectFormat(config.quant),
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
        data = collect(unet, sig, ft.samples, ft.sampler_steps, ft.seed + 1, sched, num_groups=1, holdout_samples=0,
                       class_embedding=loaded.class_embedding, progress=progress)
        res = finetune(gm, unet, sig, data, ft, make_scheduler(ft.sampler, loaded.scheduler_config), progress)
        info.update(res.log_info(ft))
        report += res.log_report()


def _summaries(gm: fx.GraphModule) -> list[LayerSummary]:
    out = []
    for node, rec in records(gm):
        c = rec.choice
        out.append(LayerSummary(node.name, rec.role, c.fmt, rec.bits, c.signed, rec.after_silu,
                                rec.neg_fraction if rec.role == "act" else 0.0, c.mse, rec.consumers))
    return out


def compile(model: torch.nn.Module | LoadedModel, config: CompileConfig | None = None, *,
            log_dir: str | Path | None = None, dump_graphs: bool = False, progress: bool | None = None,
            calibration: CalibrationSet | None = None, extra_passes: list[Callable] | None = None,
            lower: bool = True) -> CompiledModel:
    """Quantize a diffusers UNet with MSFP (or a baseline scheme) and lower it to ONNX with msfp custom ops.

    Calibration, statistics, the format search and fine-tuning run on ``config.device``; capture and lowering on the
    CPU, and the returned model lives on the CPU. ``lower=False`` stops after the passes: the CompiledModel then
    holds the quantized torch graph only (``onnx_model`` is None), e.g. to sample it on the GPU."""
    from msfp_compiler.export.onnx import lower_to_onnx

    config = config or CompileConfig()
    device = resolve_device(config.device)
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model, Path("<module>"))
    unet = loaded.unet.eval().float()
    home = next(unet.parameters()).device
    sig = signature_of(unet, cond_len=config.calib.text_len)
    pm = PassManager(log_dir=log_dir, dump_graphs=dump_graphs)
    with pm.stage("capture") as (info, _):
        gm, sig = capture(unet.to("cpu"), sig)
        info["nodes"] = len(gm.graph.nodes)
    unet.to(device)
    try:
        # Statistics, the search and fine-tuning in plain FP32 (no TF32 on CUDA): CPU and GPU choose the same
        # formats, and scales agree up to float summation order.
        with exact_fp32():
            if calibration is None:
                sched = make_scheduler(config.calib.scheduler, loaded.scheduler_config)
                calibration = collect(unet, sig, config.calib.num_samples, config.calib.num_steps,
                                      config.calib.seed, sched, config.calib.num_groups,
                                      config.calib.holdout_samples, loaded.class_embedding, progress)
            else:
                calibration = move_tensors(calibration, device)
            gm = pm.run(move_graph(gm, device), quantize_passes(config, calibration))
            if config.finetune is not None:
                _finetune(gm, unet, sig, loaded, config, progress, pm)
            gm = pm.run(gm, lowering_passes(config, extra_passes))
    finally:
        unet.to(home)
    # Lowering, and the CompiledModel, on the CPU.
    gm = move_graph(gm, "cpu")
    calibration = move_tensors(calibration, torch.device("cpu"))
    onnx_model, counts = None, {}
    if lower:
        with pm.stage("lower_onnx") as (info, _):
            example = calibration.holdout[0].args if calibration.holdout else calibration.batches[0].args
            onnx_model, counts = lower_to_onnx(gm, example, sig.input_names)
            info.update(msfp_nodes=counts, onnx_nodes=len(onnx_model.graph.node))
        if not counts:
            raise MsfpError("lowering produced no msfp nodes (nothing was quantized)")
    return CompiledModel(gm, onnx_model, sig, calibration, config, pm.runs, _summaries(gm), counts,
                         loaded.scheduler_config, loaded.class_embedding)
