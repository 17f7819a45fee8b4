#!/usr/bin/env python
"""Where the W4A4 error of an MNIST UNet comes from: a per-group sensitivity study of its quantizers (CPU).

One MSFP PTQ compile of the model (no zero-point folding, no packing, so every quantizer is a plain
``msfp.quantize`` node that can be bypassed), then for each group of quantizers (by kind: weights, time embedding,
time_emb_proj inputs, resnet conv1 / conv2 inputs, skip concatenations, attention projections, attention q/k/v,
up/down samplers, 8-bit first/last; by block: down_blocks.i, mid_block, up_blocks.i):

- ``only``: that group quantized, everything else (weights included) in float;
- ``all_but``: everything quantized (W4A4) but that group.

Metrics per configuration: the one-step noise-prediction error vs FP32 (relative RMSE) at a few timesteps of the
FP32 DDIM trajectories, and the PSNR vs FP32 of a few full DDIM samples from the same noise. Per quantizer of the
W4A4 graph: its local relative quantization error (RMSE of quantize(x) - x over RMS of x) at each probed timestep,
which shows a scale that fits one range of t and not another.

  nice -n 5 python tools/sensitivity_mnist.py --model uncond --samples 8 --out results/mnist
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.fx as fx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from quality_rows import sampler_config, write_json  # noqa: E402

from msfp_compiler.compile import compile as msfp_compile  # noqa: E402
from msfp_compiler.config import CalibConfig, CompileConfig, QuantConfig  # noqa: E402
from msfp_compiler.device import move_graph, resolve_device  # noqa: E402
from msfp_compiler.load import load_model  # noqa: E402
from msfp_compiler.metrics import psnr  # noqa: E402
from msfp_compiler.ops import QUANTIZE  # noqa: E402
from msfp_compiler.sampling import make_scheduler  # noqa: E402

MODELS = {"uncond": ROOT / "examples" / "mnist-uncond", "cond": ROOT / "examples" / "mnist-cond"}

# kind of a quantized tensor from its readable name (msfp_compiler.names), first match wins
KINDS = [
    ("weights", None),
    ("time_embedding", r"^time_embedding\."),
    ("time_emb_proj", r"\.time_emb_proj\.input$"),
    ("skip_concat", r"\.conv_shortcut\.input(\.\d+)?$"),
    ("resnet_conv1", r"\.resnets\.\d+\.conv1\.input$"),
    ("resnet_conv2", r"\.resnets\.\d+\.conv2\.input$"),
    ("attn_qkv", r"\.[qkv]$"),
    ("attn_linear", r"\.attentions\.\d+\..*\.input$"),
    ("samplers", r"\.(up|down)samplers\.\d+\.conv\.input$"),
]


def kind_of(name: str, role: str) -> str:
    if role == "weight":
        return "weights"
    for kind, pat in KINDS[1:]:
        if re.search(pat, name):
            return kind
    return "other"


def block_of(name: str) -> str:
    m = re.match(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", name)
    return m.group(1) if m else "top"


def quantizers(cm) -> list[dict]:
    """Every quantize node of the compiled graph with its readable name, role, kind, block, format and bits."""
    by_node = {s.node: s for s in cm.layers}
    out = []
    for n in cm.graph_module.graph.nodes:
        if n.op != "call_function" or n.target is not QUANTIZE:
            continue
        s = by_node[n.meta["msfp_quantizer_of"]]
        out.append({"node": n.name, "name": s.name, "role": s.role, "fmt": s.fmt, "bits": s.bits,
                    "kind": "first_last_8bit" if s.bits == 8 else kind_of(s.name, s.role), "block": block_of(s.name)})
    return out


def bypassed(gm: fx.GraphModule, keep: set[str]) -> fx.GraphModule:
    """A copy of gm whose quantize nodes outside ``keep`` pass their input through (float)."""
    g2 = copy.deepcopy(gm)
    for n in list(g2.graph.nodes):
        if n.op == "call_function" and n.target is QUANTIZE and n.name not in keep:
            n.replace_all_uses_with(n.args[0])
            g2.graph.erase_node(n)
    g2.graph.eliminate_dead_code()
    g2.recompile()
    return g2


class _QuantError(fx.Interpreter):
    """Runs the graph and keeps, per quantize node, the relative RMSE of its output against its input."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.err: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is QUANTIZE:
            x = self.env[n.args[0]]
            self.err[n.name] = float((out - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt().clamp_min(1e-12))
        return out


@torch.no_grad()
def trajectories(eps_fn, noise: torch.Tensor, cond, sched, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """FP32 DDIM: the timesteps and the x_t fed at each step."""
    sched.set_timesteps(steps)
    x, xs, ts = noise.clone(), [], []
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        xs.append(x.clone())
        ts.append(int(t))
        x = sched.step(eps_fn(x, tt, cond), t, x).prev_sample
    return ts, xs


@torch.no_grad()
def run_sampler(fn, noise, cond, sched, steps: int) -> torch.Tensor:
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        x = sched.step(fn(x, tt, cond), t, x).prev_sample
    return x.clamp(-1, 1)


def caller(gm, cond):
    return (lambda x, t, c: gm(x, t, c)) if cond is not None else (lambda x, t, c: gm(x, t))


class Probe:
    """The FP32 reference of one noise batch: trajectories, samples and noise predictions at the probed steps."""

    def __init__(self, loaded, args, dev: torch.device):
        unet = loaded.unet
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.n, self.steps, self.dev = args.samples, args.steps, dev
        self.noise = torch.randn((self.n, *shape), generator=torch.Generator().manual_seed(args.seed)).to(dev)
        self.cond = None
        if loaded.class_embedding is not None:  # labels 0..9 repeating, as eval_mnist
            labels = torch.arange(self.n) % loaded.class_embedding.shape[0]
            self.cond = loaded.class_embedding[labels][:, None, :].float().to(dev)
        fp = (lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample) if self.cond is not None else \
            (lambda x, t, c: unet(x, t).sample)
        # --no-clip-sample: the same DDIM without clipping the predicted x0 (FP32 reference and trajectories included)
        self.sched = make_scheduler("ddim", sampler_config(loaded, args))
        self.ts, self.xs = trajectories(fp, self.noise, self.cond, self.sched, args.steps)
        self.ref = run_sampler(fp, self.noise, self.cond, self.sched, args.steps).cpu()
        self.probe = [int(i) for i in args.probe_steps.split(",")]
        with torch.no_grad():
            self.eps_ref = {i: fp(self.xs[i], self.t(i), self.cond) for i in self.probe}

    def t(self, i: int) -> torch.Tensor:
        return torch.full((self.n,), self.ts[i], device=self.dev)

    @torch.no_grad()
    def measure(self, g: fx.GraphModule) -> dict:
        """One-step eps error at the probed steps, and PSNR / background of full samples, vs FP32."""
        f = caller(g, self.cond)
        res: dict = {"eps_rel_rmse": {}}
        for i in self.probe:
            e, r = f(self.xs[i], self.t(i), self.cond), self.eps_ref[i]
            res["eps_rel_rmse"][self.ts[i]] = float((e - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt())
        res["eps_rel_rmse_mean"] = sum(res["eps_rel_rmse"].values()) / len(self.probe)
        s = run_sampler(f, self.noise, self.cond, self.sched, self.steps).cpu()
        res["psnr"] = psnr(s, self.ref)
        res["background"] = float(s[:, :, :2, :].mean())  # top rows: background in every digit
        res["background_fp32"] = float(self.ref[:, :, :2, :].mean())
        return res

    @torch.no_grad()
    def local_errors(self, gm: fx.GraphModule) -> dict[str, dict[int, float]]:
        """Per quantize node and probed timestep: RMSE(q(x) - x) / RMS(x) in the fully quantized graph."""
        out: dict[str, dict[int, float]] = {}
        for i in self.probe:
            it = _QuantError(gm)
            it.run(self.xs[i], self.t(i), *((self.cond,) if self.cond is not None else ()))
            for k, v in it.err.items():
                out.setdefault(k, {})[self.ts[i]] = v
        return out


def reference_configs(qs: list[dict]) -> dict[str, set[str]]:
    """Whole-model configurations: the quantize nodes each keeps."""
    # EfficientDM's scope (its quant_model.py): conv/linear only (attention matmul operands stay float), modules named
    # 'skip' (the 1x1 shortcut conv of a resnet whose channels change: our conv_shortcut) and 'op' (the downsampling
    # conv) left in float, the time-embedding MLP and first / last conv at 8 bits (bypassed here: float).
    scope_float = re.compile(r"(\.conv_shortcut\.|\.downsamplers\.\d+\.conv\.|^time_embedding\.|\.[qkv]$)")
    return {"W4A4": {q["node"] for q in qs},
            "W4A32 (weights only)": {q["node"] for q in qs if q["role"] == "weight" or q["bits"] == 8},
            "W32A4 (activations only)": {q["node"] for q in qs if q["role"] == "act"},
            "EfficientDM scope": {q["node"] for q in qs if not scope_float.search(q["name"])}}


def quantizer_groups(qs: list[dict], blocks: bool = True) -> dict[str, set[str]]:
    """Groups by kind (every quantizer) and, with ``blocks``, by block (4-bit activation quantizers)."""
    groups: dict[str, set[str]] = {}
    for q in qs:
        groups.setdefault(f"kind:{q['kind']}", set()).add(q["node"])
        if blocks and q["role"] == "act" and q["bits"] == 4:
            groups.setdefault(f"block:{q['block']}", set()).add(q["node"])
    return groups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="uncond")
    p.add_argument("--scheme", default="msfp")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=8, help="DDIM samples per configuration (PSNR vs FP32)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--probe-steps", default="0,10,25,40,48", help="trajectory step indices of the one-step probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-blocks", action="store_true", help="groups by kind only")
    p.add_argument("--keep-8bit", default="first,last")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "mnist")
    p.add_argument("--device", default="cpu", help="compile and measure there (cuda: the Triton msfp ops)")
    p.add_argument("--no-clip-sample", action="store_true",
                   help="sample without clipping DDIM's predicted x0 to [-1, 1] (the model's scheduler config clips)")
    return p


def prepare(loaded, args, dev: torch.device) -> tuple[fx.GraphModule, list[dict], Probe]:
    """Compile the model (``args.scheme`` PTQ, no zero-point folding or packing: every quantizer stays a bypassable
    ``msfp.quantize`` node), its quantizers with their local errors, and the FP32 reference."""
    loaded.unet.float().eval()
    cfg = CompileConfig(quant=QuantConfig(scheme=args.scheme, keep_8bit=tuple(args.keep_8bit.split(","))),
                        calib=CalibConfig(num_samples=args.calib_samples, num_steps=args.calib_steps, seed=args.seed),
                        fold_zero_point=False, pack_weights=False, device=args.device)
    cm = msfp_compile(loaded, cfg, progress=False, lower=False)
    gm = move_graph(cm.graph_module, dev)
    loaded.unet.to(dev)
    qs = quantizers(cm)
    pr = Probe(loaded, args, dev)
    local = pr.local_errors(gm)
    for q in qs:
        q["local_rel_rmse"] = local[q["node"]]
    return gm, qs, pr


def run_study(gm: fx.GraphModule, qs: list[dict], pr: Probe, args, tag: str) -> dict:
    """Measure the reference configurations and every group (only / all but), saving after each measurement."""
    t0 = time.perf_counter()
    configs: dict[str, dict] = {}
    study: dict[str, dict] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> dict:  # after every measurement: a cut run keeps what it measured
        res = {"model": args.model, "scheme": args.scheme, "settings": vars(args) | {"out": str(args.out)},
               "probe_timesteps": [pr.ts[i] for i in pr.probe], "configs": configs, "groups": study,
               "quantizers": qs, "seconds": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg(),
               "device": str(pr.dev)}
        write_json(args.out / f"sensitivity_{tag}.json", res, indent=1)
        (args.out / f"sensitivity_{tag}.md").write_text(markdown(res))
        return res

    for name, keep in reference_configs(qs).items():
        configs[name] = {"quantizers": len(keep), **pr.measure(bypassed(gm, keep))}
        print(f"{name:<40} {configs[name]['psnr']:6.2f} dB  eps {configs[name]['eps_rel_rmse_mean']:.4f}", flush=True)
        save()
    all_nodes = {q["node"] for q in qs}
    for gname, members in quantizer_groups(qs, not args.no_blocks).items():
        row = {"quantizers": len(members), "only": pr.measure(bypassed(gm, members)),
               "all_but": pr.measure(bypassed(gm, all_nodes - members))}
        study[gname] = row
        print(f"{gname:<40} n={len(members):3d} only {row['only']['psnr']:6.2f} dB | all-but "
              f"{row['all_but']['psnr']:6.2f} dB", flush=True)
        save()
    return save()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dev = resolve_device(args.device)
    if dev.type == "cuda":
        import msfp_compiler.export.triton.runtime  # noqa: F401  (Triton kernels become the CUDA msfp ops)

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    t0 = time.perf_counter()
    gm, qs, pr = prepare(load_model(MODELS[args.model]), args, dev)
    print(f"compiled in {time.perf_counter() - t0:.0f}s: {len(qs)} quantizers", flush=True)
    tag = f"{args.model}_{args.scheme}" + ("" if args.keep_8bit == "first,last" else
                                           "_keep" + re.sub(r"\W+", "-", args.keep_8bit))
    print(markdown(run_study(gm, qs, pr, args, tag)))
    return 0


def markdown(res: dict) -> str:
    ts = res["probe_timesteps"]
    lines = [f"### Sensitivity of mnist-{res['model']} ({res['scheme']} PTQ): which quantizers cost what", "",
             "PSNR of DDIM samples vs FP32 of the same noise; eps error = relative RMSE of the noise prediction vs "
             f"FP32 at t = {', '.join(map(str, ts))} (mean).", "",
             "| configuration | quantizers | PSNR (dB) | eps rel-RMSE |", "|---|---|---|---|"]
    for name, r in res["configs"].items():
        lines.append(f"| {name} | {r['quantizers']} | {r['psnr']:.2f} | {r['eps_rel_rmse_mean']:.4f} |")
    lines += ["", "| group | quantizers | only this group: PSNR / eps | all but this group: PSNR / eps |",
              "|---|---|---|---|"]
    for g, r in res["groups"].items():
        lines.append(f"| {g} | {r['quantizers']} | {r['only']['psnr']:.2f} / {r['only']['eps_rel_rmse_mean']:.4f} | "
                     f"{r['all_but']['psnr']:.2f} / {r['all_but']['eps_rel_rmse_mean']:.4f} |")
    worst = sorted((q for q in res["quantizers"] if q["role"] == "act"),
                   key=lambda q: -max(q["local_rel_rmse"].values()))[:12]
    lines += ["", "Activation quantizers with the largest local error (RMSE(q(x) - x) / RMS(x)) per probed t:", "",
              "| tensor | format | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
    for q in worst:
        lines.append(f"| {q['name']} | {q['fmt']} | " + " | ".join(f"{q['local_rel_rmse'][t]:.3f}" for t in ts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
