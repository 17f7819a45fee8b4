"""Command-line entry points: ``msfp-compile`` and ``msfp-sample``. They map flags onto configs and call the library.

Errors a user can cause (MsfpError) print one line ``msfp-compile: error: ...`` and exit 2, leaving no output file.
"""

from __future__ import annotations

import argparse
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
    # The exporter and onnx_ir are chatty at INFO/WARNING about things a user cannot act on.
    for name in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


# Config fields as the flags that set them: library errors name fields, the CLI speaks in flags.
FLAGS = {"QuantConfig.scheme": "--scheme", "QuantConfig.act_formats": "--formats",
         "QuantConfig.weight_formats": "--weight-formats", "QuantConfig.weight_granularity": "--granularity",
         "QuantConfig.sign_rule": "--sign-rule", "QuantConfig.keep_8bit": "--keep-8bit",
         "CalibConfig.num_samples": "--calib-samples", "CalibConfig.num_steps": "--calib-steps",
         "CalibConfig.num_groups": "--calib-groups", "CalibConfig.text_len": "--text-len",
         "FinetuneConfig.steps": "--finetune-steps", "FinetuneConfig.num_loras": "--num-loras",
         "FinetuneConfig.rank": "--lora-rank"}


def flag_message(message: str) -> str:
    """A library error message with config field names replaced by the flags that set them."""
    for field, flag in sorted(FLAGS.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(field, flag)
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


def compile_parser() -> argparse.ArgumentParser:
    from .config import SCHEMES

    p = _Parser(prog="msfp-compile", description="Quantize a diffusers UNet to 4-bit (MSFP) and "
                "lower it to ONNX with msfp custom ops that stock onnxruntime runs.")
    p.add_argument("model", help="diffusers model folder, .safetensors (with --config) or .pt checkpoint")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--config", help="UNet config JSON for a .safetensors model")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module in a .pt (runs code!)")
    p.add_argument("--scheme", default="msfp", choices=sorted(SCHEMES), help="quantization scheme (default msfp)")
    p.add_argument("--formats", type=_csv, help="activation candidate formats, e.g. e2m1,ue3m1 (default: scheme's)")
    p.add_argument("--weight-formats", type=_csv, help="weight candidate formats (signed), e.g. e2m1,e3m0")
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor"], help="weight scale granularity")
    p.add_argument("--sign-rule", default="mse", choices=["mse", "stats"],
                   help="mse: signed and unsigned compete everywhere; stats: unsigned only for small bounded negatives")
    p.add_argument("--device", default="cpu",
                   help="where calibration, statistics, the format search and fine-tuning run: cpu or cuda[:N] "
                        "(lowering to ONNX always runs on the CPU; default cpu)")
    p.add_argument("--keep-8bit", type=_csv, default=("first", "last"),
                   help="layers kept at 8 bits: first,last (convs) and/or node names; '' for none (default first,last)")
    p.add_argument("--calib-samples", type=int, default=8, help="noise samples for calibration (default 8)")
    p.add_argument("--calib-steps", type=int, default=10, help="sampler steps per calibration trajectory (default 10)")
    p.add_argument("--calib-groups", type=int, default=4, help="timestep groups for statistics (default 4)")
    p.add_argument("--text-len", type=int, default=1,
                   help="tokens of the random text states used for calibration (default 1; 77 for Stable Diffusion)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "ddpm"], help="calibration sampler (default ddim)")
    p.add_argument("--seed", type=int, default=0)
    ft = p.add_argument_group("fine-tuning (TALoRA + DFA, data-free distillation from the FP model)")
    ft.add_argument("--finetune-steps", type=int, default=0, help="distillation steps; 0 = PTQ only (default 0)")
    ft.add_argument("--num-loras", type=int, default=2, help="LoRAs per layer chosen by the router; 1 = LoRA (default 2)")
    ft.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (default 4)")
    ft.add_argument("--no-dfa", action="store_true", help="unweighted loss instead of DFA's gamma_t weighting")
    ft.add_argument("--learn-act-scales", action="store_true", help="also learn activation scales (LSQ-style)")
    ft.add_argument("--finetune-samples", type=int, default=32, help="FP trajectories used as data (default 32)")
    ft.add_argument("--finetune-sampler-steps", type=int, default=50,
                    help="DDIM steps of those trajectories and of gamma_t; match your sampler (default 50)")
    ft.add_argument("--finetune-checkpoint", help="write LoRA + router tensors here (.safetensors)")
    p.add_argument("--no-pack", action="store_true", help="keep FP32 weights + fake quantization (larger file)")
    p.add_argument("--no-fold", action="store_true", help="do not fold unsigned zero points into biases")
    p.add_argument("--log-dir", help="write passes.jsonl, passes.log (and graph dumps) here")
    p.add_argument("--dump-graph", action="store_true", help="with --log-dir: write the fx graph after each pass")
    p.add_argument("--plots", action="store_true", help="with --log-dir: activation histograms and a sign summary")
    p.add_argument("--save-pt2", help="also save the quantized torch program (torch.export) for the Triton runner")
    p.add_argument("--check", action="store_true", help="compare ORT with the torch quantized graph on held-out inputs")
    p.add_argument("--tolerance", type=float, default=1e-3, help="--check median relative RMSE bound (default 1e-3)")
    p.add_argument("--summary", action="store_true", help="print the per-layer format table")
    p.add_argument("-q", "--quiet", action="store_true", help="no pass log on stderr")
    return p


def _out_path(path: str) -> Path:
    out = Path(path)
    if not out.parent.resolve().is_dir():
        raise MsfpError(f"{out}: output folder {out.parent} does not exist")
    if not os.access(out.parent.resolve(), os.W_OK):
        raise MsfpError(f"{out}: output folder {out.parent} is not writable")
    return out


def _compile(args: argparse.Namespace) -> int:
    from .compile import compile
    from .config import CalibConfig, CompileConfig, FinetuneConfig, QuantConfig
    from .load import load_model

    out = _out_path(args.out)
    if args.plots and not args.log_dir:
        raise MsfpError("--plots needs --log-dir")
    quant = QuantConfig(scheme=args.scheme, act_formats=args.formats or None, weight_formats=args.weight_formats or None,
                        weight_granularity=args.granularity, sign_rule=args.sign_rule, keep_8bit=args.keep_8bit)
    calib = CalibConfig(num_samples=args.calib_samples, num_steps=args.calib_steps, num_groups=args.calib_groups,
                        scheduler=args.scheduler, seed=args.seed, text_len=args.text_len)
    ft = None
    if args.finetune_steps:
        ft = FinetuneConfig(steps=args.finetune_steps, num_loras=args.num_loras, rank=args.lora_rank,
                            dfa=not args.no_dfa, learn_act_scales=args.learn_act_scales,
                            samples=args.finetune_samples, sampler_steps=args.finetune_sampler_steps,
                            seed=args.seed, checkpoint=args.finetune_checkpoint)
    cfg = CompileConfig(quant=quant, calib=calib, pack_weights=not args.no_pack, fold_zero_point=not args.no_fold,
                        finetune=ft, device=args.device)
    from .device import resolve_device

    resolve_device(cfg.device)  # before loading a large model: no CUDA is a one-line error
    loaded = load_model(args.model, args.config, args.trust_pickle)
    log.info("msfp-compile: %s (%s, %.2fM parameters), scheme %s", args.model, type(loaded.unet).__name__,
             sum(p.numel() for p in loaded.unet.parameters()) / 1e6, args.scheme)
    cm = compile(loaded, cfg, log_dir=args.log_dir, dump_graphs=args.dump_graph)
    if args.plots:
        from .plots import write_plots

        write_plots(cm, Path(args.log_dir))
    status = 0
    if args.check:
        res = cm.check(args.tolerance)
        print(str(res))
        if not res.ok:
            status = 1
    cm.save(out)
    if args.save_pt2:
        cm.save_pt2(args.save_pt2)
    acts = [s for s in cm.layers if s.role == "act" and s.bits == 4]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {sum(cm.onnx_op_counts.values())} msfp nodes "
          f"{json.dumps(cm.onnx_op_counts)}; activations: {sum(not s.signed for s in acts)} unsigned, "
          f"{sum(s.signed for s in acts)} signed FP4")
    if args.summary:
        print(cm.summary_table())
    return status


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
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _sample(args: argparse.Namespace) -> int:
    import torch

    from msfp_compiler.export.ort import OrtUNet, ddim_sample, open_session, save_grid

    out = _out_path(args.out)
    if args.steps < 1 or args.num < 1:
        raise MsfpError("--steps and --num must be >= 1")
    if args.backend == "triton":
        return _sample_triton(args, out)
    unet = OrtUNet(open_session(args.model, args.threads))
    cond = None
    if unet.cond:
        labels = torch.tensor([int(x) for x in (args.labels or [str(i % 10) for i in range(10)])])
        labels = labels.repeat((args.num + len(labels) - 1) // len(labels))[: args.num]
        if args.class_embedding:
            from safetensors.torch import load_file

            table = load_file(args.class_embedding)["weight"]
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

        runner = torch.compile(build_fast(gm, "cuda", inplace=True), mode="max-autotune")
    else:
        runner = TritonRunner(gm, cuda_graphs=True)
    # torch.export records the guards diffusers' blocks put on the batch (batch <= 63 for the UNets we tried), so
    # the program is sampled in chunks; chunk i uses seed + i.
    chunk = 32
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
