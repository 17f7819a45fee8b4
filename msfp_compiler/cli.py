"""Command-line entry points: ``msfp-compile`` and ``msfp-sample``. They map flags onto configs and call the library.

Errors a user can cause (MsfpError) print one line ``msfp-compile: error: ...`` and exit 2, leaving no output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import MsfpError

__all__ = ["compile_main", "sample_main"]

log = logging.getLogger("msfp")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    _quiet_libraries()


def _quiet_libraries() -> None:
    """The exporter and onnx_ir are chatty at INFO/WARNING about things a user cannot act on. Called again once
    torch is imported (lazily, after argument checks): importing torch configures its loggers."""
    for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._export",
                 "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# Library errors name config fields (they know no flags); the CLI says which flag sets each one.
FIELD_FLAGS = {
    "QuantConfig.scheme": "--scheme", "QuantConfig.act_formats": "--formats",
    "QuantConfig.weight_formats": "--weight-formats", "QuantConfig.weight_granularity": "--granularity",
    "QuantConfig.sign_rule": "--sign-rule", "QuantConfig.keep_8bit": "--keep-8bit",
    "CalibConfig.num_samples": "--calib-samples", "CalibConfig.num_steps": "--calib-steps",
    "CalibConfig.num_groups": "--calib-groups", "CalibConfig.text_len": "--text-len",
    "CalibConfig.scheduler": "--scheduler", "CalibConfig.seed": "--seed",
    "FinetuneConfig.steps": "--finetune-steps", "FinetuneConfig.num_loras": "--num-loras",
    "FinetuneConfig.rank": "--lora-rank", "FinetuneConfig.samples": "--finetune-samples",
    "FinetuneConfig.sampler_steps": "--finetune-sampler-steps", "FinetuneConfig.checkpoint": "--finetune-checkpoint",
    "FinetuneConfig.holdout_samples": "--finetune-holdout", "FinetuneConfig.trajectories": "--finetune-trajectories",
    "FinetuneConfig.lora_8bit": "--no-lora-8bit",
    "load_model.config": "--config", "load_model.trust_pickle": "--trust-pickle",
    "CompileConfig.conv_weights": "--conv-weights",
}


FLAGS = FIELD_FLAGS


def flag_message(message: str) -> str:
    """A library message with config field names replaced by the flags that set them."""
    for field_name, flag in sorted(FIELD_FLAGS.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(field_name, flag)
    return message


def _run(prog: str, main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
         argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    _setup_logging(not getattr(args, "quiet", False))
    try:
        return main(args)
    except MsfpError as e:
        print(f"{prog}: error: {flag_message(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (no output written)", file=sys.stderr)
        return 130


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``prog: error: ...``, exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# The scheme names, without importing config (and torch) just to print --help; tests/test_cli.py checks that this
# is config.SCHEME_NAMES (fp32: the unquantized baseline through the same lowering).
SCHEME_NAMES = ("fp32", "fp4-signed", "int4", "msfp")
LORA_RANK = 32  # FinetuneConfig.rank, likewise without importing config (checked by tests/test_cli.py)
TRAJECTORIES = ("fp", "student", "mixed")  # config.TRAJECTORIES, likewise


def compile_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="msfp-compile", description="Quantize a diffusers UNet to 4-bit (MSFP) and "
                "lower it to ONNX with msfp custom ops that stock onnxruntime runs.")
    p.add_argument("model", help="diffusers model folder, .safetensors (with --config) or .pt checkpoint "
                   "(e.g. demo_out/model.pt from `make demo`)")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--config", help="UNet config JSON for a .safetensors model")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module in a .pt (runs code!)")
    p.add_argument("--scheme", default="msfp", choices=SCHEME_NAMES,
                   help="quantization scheme (default msfp; fp32: the unquantized baseline)")
    p.add_argument("--formats", type=_csv, help="activation candidate formats, e.g. e2m1,ue3m1 (default: scheme's)")
    p.add_argument("--weight-formats", type=_csv, help="weight candidate formats (signed), e.g. e2m1,e3m0")
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor"], help="weight scale granularity")
    p.add_argument("--sign-rule", default="mse", choices=["mse", "stats"],
                   help="mse: signed and unsigned compete everywhere; stats: unsigned only for small bounded negatives")
    p.add_argument("--device", default="cpu",
                   help="where calibration, statistics, the format search and fine-tuning run: cpu or cuda[:N] "
                        "(lowering to ONNX always runs on the CPU; default cpu)")
    p.add_argument("--keep-8bit", type=_csv, default=("first", "last"),
                   help="layers kept at 8 bits: first,last (convs), last_block (the last decoder block: "
                   "up_blocks.N, the full-resolution level; not strict W4A4) and/or module paths, e.g. "
                   "down_blocks.0.resnets.0.conv1, a whole block (mid_block) or an fnmatch pattern "
                   "('*.conv_shortcut'); '' for none (default first,last)")
    p.add_argument("--calib-samples", type=int, help="noise samples for calibration (default: 8, fewer for large "
                   "models, see README 'Calibration size')")
    p.add_argument("--calib-steps", type=int, help="sampler steps per calibration trajectory (default: 10, fewer "
                   "for large models)")
    p.add_argument("--calib-groups", type=int, help="timestep groups for statistics (default 4, at most the steps)")
    p.add_argument("--text-len", type=int, default=1,
                   help="tokens of the random text states used for calibration (default 1; 77 for Stable Diffusion)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"], help="calibration sampler (default ddim)")
    p.add_argument("--seed", type=int, default=0)
    _add_finetune_args(p)
    p.add_argument("--no-pack", action="store_true", help="keep FP32 weights + fake quantization (larger file)")
    p.add_argument("--no-fold", action="store_true", help="do not fold unsigned zero points into biases")
    p.add_argument("--conv-weights", default="int8", metavar="{int8,float32,float32:F}",
                   help="weights of the convs that do not run as integer GEMMs (strided, 8-bit, or on an input "
                        "that is not one quantizer's output): int8 + DequantizeLinear (1 byte a weight in "
                        "onnxruntime), float32 (4 bytes, faster: onnxruntime prepacks constant weights) or float32:F "
                        "(the share F of those weights in FP32, convs with the most output positions first, e.g. "
                        "float32:0.1; default int8)")
    p.add_argument("--log-dir", help="write passes.jsonl, passes.log (and graph dumps) here")
    p.add_argument("--dump-graph", action="store_true", help="with --log-dir: write the fx graph after each pass")
    p.add_argument("--plots", action="store_true", help="with --log-dir: activation histograms and a sign summary")
    p.add_argument("--save-pt2", help="also save the quantized torch program (torch.export) for the Triton runner")
    p.add_argument("--check", action="store_true",
                   help="compare ORT with the torch quantized graph quantizer by quantizer on held-out inputs; on a "
                   "mismatch print FAIL with the first diverging layer, write nothing and exit 1")
    p.add_argument("--tolerance", type=float,
                   help="with --check: bound on a float difference relative to the tensor's largest value "
                   "(default 1e-3); rounding flips at a quantizer threshold are counted, not bounded")
    p.add_argument("--summary", action="store_true", help="print the per-layer format table")
    p.add_argument("-q", "--quiet", action="store_true", help="no pass log or progress on stderr")
    return p


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    """msfp-compile's fine-tuning flags (FinetuneConfig)."""
    ft = p.add_argument_group("fine-tuning (TALoRA + DFA, data-free distillation from the FP model)")
    ft.add_argument("--finetune-steps", type=int, default=0, help="distillation steps; 0 = PTQ only (default 0)")
    ft.add_argument("--num-loras", type=int, default=2, help="LoRAs per layer chosen by the router; 1 = LoRA (default 2)")
    ft.add_argument("--lora-rank", type=int, default=LORA_RANK,
                    help=f"LoRA rank (default {LORA_RANK}, EfficientDM's: lower FID than 4 on both MNIST models)")
    ft.add_argument("--no-dfa", action="store_true", help="unweighted loss instead of DFA's gamma_t weighting")
    ft.add_argument("--learn-act-scales", action="store_true", help="also learn activation scales (LSQ-style)")
    ft.add_argument("--no-lora-8bit", action="store_true",
                    help="LoRAs on the 4-bit weights only; the --keep-8bit layers stay frozen (default: LoRAs on both)")
    ft.add_argument("--finetune-samples", type=int,
                    help="FP trajectories used as data (default: 256 up to ~6M parameters at 50 sampler steps, fewer "
                         "for larger models, at least 32)")
    ft.add_argument("--finetune-trajectories", choices=TRAJECTORIES,
                    help="training inputs: the FP model's sampler trajectories (default), the quantized graph's own "
                         "(labelled by the FP model), or both (default fp)")
    ft.add_argument("--finetune-holdout", type=int, default=0,
                    help="FP trajectories held out of training: their loss before / after is logged (default 0)")
    ft.add_argument("--finetune-sampler-steps", type=int, default=50,
                    help="DDIM steps of those trajectories and of gamma_t; match your sampler (default 50)")
    ft.add_argument("--finetune-checkpoint", help="write LoRA + router tensors here (.safetensors)")


def _out_path(path: str, flag: str = "--out") -> Path:
    """An output file path that can be written: checked before any work, by creating (and removing) a file there."""
    import tempfile

    out = Path(path)
    if out.is_dir():
        raise MsfpError(f"{flag} {out}: is a folder; give a file name inside it (e.g. {out / 'model.onnx'})")
    parent = out.parent
    for anc in [parent, *parent.parents]:  # the nearest existing ancestor tells a missing folder from a file
        if anc.exists():
            if not anc.is_dir():
                raise MsfpError(f"{flag} {out}: {anc} is a file, not a folder")
            if anc != parent:
                raise MsfpError(f"{flag} {out}: output folder {parent} does not exist")
            break
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MsfpError(f"{flag} {out}: output folder {parent} is not writable ({e.strerror or e})") from None
    return out


def _log_dir(path: str) -> Path:
    """--log-dir: created now (with parents) and written to once, so it cannot fail after the compile."""
    d = Path(path)
    for anc in [d, *d.parents]:
        if anc.exists():
            if not anc.is_dir():
                raise MsfpError(f"--log-dir {d}: {anc} is a file, not a folder")
            break
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MsfpError(f"--log-dir {d}: cannot create it ({e.strerror or e})") from None
    _out_path(str(d / "passes.log"), "--log-dir")
    return d


def _validate_compile_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, so a typo fails in a second, not after loading and calibrating."""
    def at_least(flag: str, value: int | None, lo: int) -> None:
        if value is not None and value < lo:
            raise MsfpError(f"{flag} must be >= {lo} (got {value})")

    at_least("--calib-samples", args.calib_samples, 1)
    at_least("--calib-steps", args.calib_steps, 1)
    at_least("--calib-groups", args.calib_groups, 1)
    if args.calib_steps is not None and args.calib_groups is not None and args.calib_groups > args.calib_steps:
        raise MsfpError(f"--calib-groups {args.calib_groups} exceeds --calib-steps {args.calib_steps} "
                        "(each timestep group needs at least one step)")
    at_least("--text-len", args.text_len, 1)
    at_least("--finetune-steps", args.finetune_steps, 0)
    at_least("--finetune-holdout", args.finetune_holdout, 0)
    for flag, value in (("--num-loras", args.num_loras), ("--lora-rank", args.lora_rank),
                        ("--finetune-samples", args.finetune_samples),
                        ("--finetune-sampler-steps", args.finetune_sampler_steps)):
        at_least(flag, value, 1)
    if not args.finetune_steps:
        given = [f for f, v in (("--finetune-checkpoint", args.finetune_checkpoint), ("--no-dfa", args.no_dfa),
                                ("--finetune-holdout", args.finetune_holdout),
                                ("--finetune-trajectories", args.finetune_trajectories),
                                ("--finetune-samples", args.finetune_samples),
                                ("--learn-act-scales", args.learn_act_scales),
                                ("--no-lora-8bit", args.no_lora_8bit)) if v]
        if given:
            raise MsfpError(f"{', '.join(given)} only apply to fine-tuning; add --finetune-steps N (N >= 1)")
    for flag, on in (("--plots", args.plots), ("--dump-graph", args.dump_graph)):
        if on and not args.log_dir:
            raise MsfpError(f"{flag} needs --log-dir")
    if args.tolerance is not None and not args.check:
        raise MsfpError("--tolerance only applies with --check")
    if args.tolerance is not None and not args.tolerance > 0:
        raise MsfpError(f"--tolerance must be > 0 (got {args.tolerance})")
    if args.config and not Path(args.config).is_file():
        raise MsfpError(f"--config {args.config}: no such file")
    if not Path(args.model).exists():
        raise MsfpError(f"{args.model}: no such file or folder")


def _act_formats_line(cm) -> str:
    """'34 unsigned (ue2m2 20, ue3m1 14), 32 signed (e2m1 32), 2 at 8 bits' -- formats by name, whatever the scheme."""
    acts = [s for s in cm.layers if s.role == "act"]
    parts = []
    for label, group in (("unsigned", [s for s in acts if s.bits == 4 and not s.signed]),
                         ("signed", [s for s in acts if s.bits == 4 and s.signed])):
        if group:
            counts: dict[str, int] = {}
            for s in group:
                counts[s.fmt] = counts.get(s.fmt, 0) + 1
            parts.append(f"{len(group)} {label} ({', '.join(f'{f} {n}' for f, n in sorted(counts.items()))})")
    eight = sum(s.bits == 8 for s in acts)
    if eight:
        parts.append(f"{eight} at 8 bits")
    return ", ".join(parts) or "none"


def _quant_finetune_configs(args: argparse.Namespace):
    """QuantConfig and FinetuneConfig (None without --finetune-steps) from the flags."""
    from .config import FinetuneConfig, QuantConfig

    quant = QuantConfig(scheme=args.scheme, act_formats=args.formats or None, weight_formats=args.weight_formats or None,
                        weight_granularity=args.granularity, sign_rule=args.sign_rule, keep_8bit=args.keep_8bit)
    if not args.finetune_steps:
        return quant, None
    return quant, FinetuneConfig(steps=args.finetune_steps, num_loras=args.num_loras, rank=args.lora_rank,
                                 dfa=not args.no_dfa, learn_act_scales=args.learn_act_scales,
                                 lora_8bit=not args.no_lora_8bit,
                                 samples=args.finetune_samples or FinetuneConfig.samples,
                                 sampler_steps=args.finetune_sampler_steps, holdout_samples=args.finetune_holdout,
                                 trajectories=args.finetune_trajectories or FinetuneConfig.trajectories,
                                 seed=args.seed, checkpoint=args.finetune_checkpoint)


def _plots(cm, log_dir: Path) -> None:
    """--plots, logged as a stage of passes.log."""
    import time

    from .plots import write_plots

    t0, c0 = time.perf_counter(), time.process_time()
    written = write_plots(cm, log_dir)
    cm.log_stage("plots", time.perf_counter() - t0, {"files": len(written), "folder": str(log_dir / "plots")},
                 time.process_time() - c0)


def _compile(args: argparse.Namespace) -> int:
    import time

    _validate_compile_args(args)
    out = _out_path(args.out)
    for flag, path in (("--save-pt2", args.save_pt2), ("--finetune-checkpoint", args.finetune_checkpoint)):
        if path:
            _out_path(path, flag)
    if args.log_dir:
        _log_dir(args.log_dir)
    log.info("msfp-compile: importing torch ...")
    from .compile import compile
    from .calibration import default_calibration
    from .config import CalibConfig, CompileConfig
    from .load import load_model

    _quiet_libraries()
    quant, ft = _quant_finetune_configs(args)  # the configs validate themselves: before the model loads
    from .config import parse_conv_weights

    parse_conv_weights(args.conv_weights)  # CompileConfig checks it again, but only after loading and calibrating
    from .device import resolve_device

    resolve_device(args.device)  # before loading a large model: no CUDA is a one-line error
    t0 = time.perf_counter()
    log.info("msfp-compile: loading %s ...", args.model)
    loaded = load_model(args.model, args.config, args.trust_pickle)
    n_params = sum(p.numel() for p in loaded.unet.parameters())
    log.info("msfp-compile: %s (%s, %.2fM parameters) loaded in %.1fs, scheme %s", args.model,
             type(loaded.unet).__name__, n_params / 1e6, time.perf_counter() - t0, args.scheme)
    samples, steps, groups, rule = default_calibration(n_params, args.calib_groups or 4, args.calib_samples,
                                                       args.calib_steps)
    if ft is not None and args.finetune_samples is None:
        from .capture import signature_of
        from .distillation import default_finetune_samples

        n, ft_rule = default_finetune_samples(n_params, ft.sampler_steps, signature_of(loaded.unet).sample_size)
        ft = dataclasses.replace(ft, samples=n, note=ft_rule)
    # held-out trajectories only feed --check: without it they would cost calibration time for nothing
    calib = CalibConfig(num_samples=samples, num_steps=steps, num_groups=groups, holdout_samples=2 if args.check else 0,
                        scheduler=args.scheduler, seed=args.seed, text_len=args.text_len, note=rule)
    cfg = CompileConfig(quant=quant, calib=calib, pack_weights=not args.no_pack, fold_zero_point=not args.no_fold,
                        conv_weights=args.conv_weights, finetune=ft, device=args.device)
    cm = compile(loaded, cfg, log_dir=args.log_dir, dump_graphs=args.dump_graph)
    if args.plots:
        _plots(cm, Path(args.log_dir))
    if args.check:
        tol = args.tolerance if args.tolerance is not None else 1e-3
        c0 = time.process_time()
        res = cm.check(tol)
        cm.log_stage("check", res.seconds, res.info(), time.process_time() - c0, report=res.report())
        print(str(res))
        if not res.ok:
            print(f"msfp-compile: --check failed; {out} not written", file=sys.stderr)
            return 1
    cm.save(out)
    if args.save_pt2:
        cm.save_pt2(args.save_pt2)
    n_msfp = sum(v for k, v in cm.onnx_op_counts.items() if k[0].isupper())  # op names; the rest: int8_weights, ...
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {n_msfp} msfp nodes "
          f"{json.dumps(cm.onnx_op_counts)}; activations: {_act_formats_line(cm)}")
    if args.summary:
        print(cm.summary_table())
    return 0


def compile_main(argv: Sequence[str] | None = None) -> int:
    return _run("msfp-compile", _compile, compile_parser(), argv)


def sample_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="msfp-sample", description="DDIM-sample images from a compiled ONNX UNet in "
                "onnxruntime and save a grid.")
    p.add_argument("model", help="compiled .onnx (ORT backend) or .pt2 from --save-pt2 (Triton backend)")
    p.add_argument("--backend", default="ort", choices=["ort", "triton"],
                   help="ort: onnxruntime on CPU (default); triton: the quantized program on a CUDA GPU")
    p.add_argument("--out", required=True, help="output PNG grid")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("-n", "--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", type=_csv, help="class labels for a conditional model (cycled), e.g. 0,1,2")
    p.add_argument("--class-embedding", help="class_embedding.safetensors for labels -> encoder_hidden_states")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--fast", action="store_true", help="with --backend triton: the torch.compile fast path "
                   "(bf16 activations, FP8 GEMMs; see docs/triton.md) instead of the exact Triton runner")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def _onnx_inputs(path: str) -> dict[str, list]:
    """Input name -> shape of an ONNX file, read without its weights (a second, not a session)."""
    import onnx

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception as e:  # DecodeError and friends: not an ONNX file
        raise MsfpError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200] if str(e) else e})") from e
    return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def _validate_sample_args(args: argparse.Namespace) -> list[int] | None:
    """Everything checked before a session opens (numbers, the output path, then what the model takes); returns
    the parsed labels."""
    for flag, value in (("--steps", args.steps), ("-n/--num", args.num), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise MsfpError(f"{flag} must be >= 1 (got {value})")
    labels = None
    if args.labels is not None:
        try:
            labels = [int(x) for x in args.labels]
        except ValueError:
            raise MsfpError(f"--labels: expected integers, e.g. 0,1,2 (got {','.join(args.labels)})") from None
        if not labels or min(labels) < 0:
            raise MsfpError("--labels: expected non-negative integers, e.g. 0,1,2")
    if args.class_embedding and not Path(args.class_embedding).is_file():
        raise MsfpError(f"--class-embedding {args.class_embedding}: no such file")
    _out_path(args.out)
    if args.backend == "triton":
        if labels is not None or args.class_embedding:
            raise MsfpError("--backend triton samples unconditional models only (no --labels / --class-embedding)")
        return labels
    if not Path(args.model).is_file():
        raise MsfpError(f"{args.model}: no such ONNX file")
    inputs = _onnx_inputs(args.model)
    cond = next((n for n in inputs if n not in ("sample", "timestep")), None)
    for flag, given in (("--labels", labels is not None), ("--class-embedding", bool(args.class_embedding))):
        if given and cond is None:
            raise MsfpError(f"{flag}: {args.model} is an unconditional model (inputs sample, timestep)")
    if cond == "encoder_hidden_states" and labels is not None and not args.class_embedding:
        raise MsfpError(f"--labels needs --class-embedding: {args.model} takes encoder_hidden_states, and labels "
                        "become states through the model's class-embedding table (e.g. "
                        "examples/digits-cond/class_embedding.safetensors)")
    if cond == "class_labels" and args.class_embedding:
        raise MsfpError(f"--class-embedding: {args.model} takes class_labels directly; pass --labels only")
    return labels


def _sample(args: argparse.Namespace) -> int:
    labels_given = _validate_sample_args(args)
    out = _out_path(args.out)
    if args.backend == "triton":
        return _sample_triton(args, out)
    import torch

    from msfp_compiler.export.ort import OrtUNet, ddim_sample, open_session, save_grid

    unet = OrtUNet(open_session(args.model, args.threads))
    cond = None
    if unet.cond:
        labels = torch.tensor(labels_given or [i % 10 for i in range(10)])
        labels = labels.repeat((args.num + len(labels) - 1) // len(labels))[: args.num]
        if args.class_embedding:
            from safetensors.torch import load_file

            try:
                table = load_file(args.class_embedding)["weight"]
            except Exception as e:
                raise MsfpError(f"--class-embedding {args.class_embedding}: not a safetensors file with a 'weight' "
                                f"table ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
            if int(labels.max()) >= table.shape[0]:
                raise MsfpError(f"--labels: {int(labels.max())} is out of range; the class-embedding table has "
                                f"{table.shape[0]} classes")
            cond = table[labels].unsqueeze(1).float()
        elif unet.cond == "class_labels":
            cond = labels
        else:
            dim = unet.cond_shape[-1]
            cond = torch.randn(args.num, 1, int(dim), generator=torch.Generator().manual_seed(args.seed + 1))
    imgs = ddim_sample(unet, args.num, args.steps, args.seed, cond)
    save_grid(imgs, out)
    print(f"wrote {out}: {args.num} samples, {args.steps} DDIM steps")
    return 0


SAMPLE_CHUNK = 32  # samples per call of the Triton backend's step


def _sample_triton(args: argparse.Namespace, out: Path) -> int:
    import torch

    from msfp_compiler.export.ort import save_grid

    if not torch.cuda.is_available():
        raise MsfpError("--backend triton needs a CUDA GPU (none found)")
    if not str(args.model).endswith(".pt2") or not Path(args.model).is_file():
        raise MsfpError(f"{args.model}: --backend triton needs the .pt2 written by msfp-compile --save-pt2")
    from msfp_compiler.export.triton.runtime import TritonRunner, load_pt2, sample_ddim

    gm = load_pt2(args.model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) > 3:
        raise MsfpError(f"{args.model}: --backend triton takes (sample, timestep[, text states]) programs")
    shape = placeholders[0].meta["val"].shape
    cond = None
    if len(placeholders) == 3:  # text-conditioned (SD-style): random text states of the traced length and width
        cshape = placeholders[2].meta["val"].shape
        if not placeholders[2].meta["val"].is_floating_point():
            raise MsfpError(f"{args.model}: --backend triton needs float text states as the third input")
        cond = torch.randn(args.num, int(cshape[1]), int(cshape[2]),
                           generator=torch.Generator().manual_seed(args.seed + 1))
    if args.fast:
        from msfp_compiler.export.triton.fast import build_fast
        from msfp_compiler.export.triton.graphed import graphed_by_shape

        # the configuration benchmarked in docs/triton.md (Inductor, each step one CUDA graph). One graph per chunk
        # shape, not the last chunk padded to the chunk size: no steps spent on padding rows (-n 16 would run 32),
        # and a sample's result does not depend on them (the FP8 GEMM's kernel choice depends on the row count)
        runner = graphed_by_shape(build_fast(gm, "cuda", inplace=True))
    else:
        runner = TritonRunner(gm, cuda_graphs=True)
    # torch.export records the guards diffusers' blocks put on the batch (batch <= 63 for the UNets we tried), so
    # the program is sampled in chunks; chunk i uses seed + i.
    chunk = SAMPLE_CHUNK
    imgs = torch.cat([sample_ddim(runner, (min(chunk, args.num - i), int(shape[1]), int(shape[2]), int(shape[3])),
                                  args.steps, args.seed + i // chunk,
                                  cond=None if cond is None else cond[i:i + chunk].cuda())
                      for i in range(0, args.num, chunk)])
    save_grid(imgs.float().cpu(), out)
    how = "Inductor fast path, bf16 + FP8 GEMMs" if args.fast else "Triton"
    print(f"wrote {out}: {args.num} samples, {args.steps} DDIM steps on {torch.cuda.get_device_name()} ({how})"
          + (f"; channels 0-2 of the {int(shape[1])}-channel output shown as RGB" if int(shape[1]) > 3 else ""))
    return 0


def sample_main(argv: Sequence[str] | None = None) -> int:
    return _run("msfp-sample", _sample, sample_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(compile_main())
