#!/usr/bin/env python
"""The W4A4 quality table at MNIST scale, computed on the GPU: 2 models x 8 rows x 3 seeds.

Rows (names as results/quality.json's digits tables): FP32, INT4 PTQ, FP4 signed PTQ, MSFP PTQ, INT4 + LoRA,
MSFP + LoRA, MSFP + TALoRA, MSFP + TALoRA + DFA. Each row is compiled with ``msfp_compiler.compile`` on --device
(calibration, statistics, format search and fine-tuning there; lowering to ONNX on the CPU); a seed is both the
calibration / fine-tuning seed and the sampling noise seed. Samples come from the torch quantized graph on the device
(the Triton kernels of export/triton/runtime.py implement the msfp ops on CUDA), DDIM --steps steps, --samples
samples in batches of --batch. Metrics: FID in the feature space of the committed MNIST classifier (generated vs the
5000 real digits), PSNR vs the FP32 samples of the same noise, label accuracy (cond). For the seeds in --check-seeds
every row's ONNX is run in onnxruntime against the torch graph on held-out calibration inputs (CompiledModel.check).

Every (model, seed, row) is one task process, --jobs at a time (small models leave the GPU mostly idle and
compilation is CPU work); each writes OUT/task_<model>_<seed>_<row>.json and its samples, and the parent merges them
into OUT/quality_mnist.json + quality_mnist.md (PSNR vs the FP32 samples of the same noise is computed there).

  python tools/eval_mnist.py --device cuda --jobs 16 --out results/mnist --table results/quality_mnist.json
  python tools/eval_mnist.py --device cpu --samples 20 --steps 4 --finetune-steps 2 --calib-samples 2 \
      --calib-steps 4 --seeds 0 --rows fp32,msfp+talora+dfa --models uncond          # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from quality_rows import (ALIASES, ROWS, Row, add_table_arguments, args_row_config, class_labels,  # noqa: E402
                          compile_facts, parse_rows, sampler_config, slug, write_json)

from msfp_compiler.capture import UNetWrapper, signature_of  # noqa: E402
from msfp_compiler.compile import check_layer_names  # noqa: E402
from msfp_compiler.compile import compile as msfp_compile  # noqa: E402
from msfp_compiler.config import CompileConfig  # noqa: E402
from msfp_compiler.device import move_graph, resolve_device  # noqa: E402
from msfp_compiler.digits import load_classifier  # noqa: E402
from msfp_compiler.errors import MsfpError  # noqa: E402
from msfp_compiler.load import load_model  # noqa: E402
from msfp_compiler.metrics import classifier_accuracy, classifier_features, frechet_distance, psnr  # noqa: E402
from msfp_compiler.mnist import load_mnist_images  # noqa: E402

MODELS = {"uncond": ROOT / "examples" / "mnist-uncond", "cond": ROOT / "examples" / "mnist-cond"}
CLASSIFIER = ROOT / "examples" / "mnist_classifier.safetensors"
HALF = 2500  # samples per seed of the tables before session 10: FID is also reported on the first HALF


@contextlib.contextmanager
def gpu_slot(folder: Path, slots: int, gpu: str):
    """Hold one of ``slots`` lock files of this GPU while sampling (0: no limit). Sampling saturates the GPU, so a
    few tasks at a time finish as fast in total as all at once, but they finish one after another (a time limit
    then cuts whole tasks, not every task) and their activations need not all fit in GPU memory together."""
    if slots <= 0:
        yield
        return
    while True:
        for k in range(slots):
            fh = open(folder / f".gpu{gpu}_slot{k}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(0.5)


@torch.no_grad()
def ddim(eps_fn, n: int, steps: int, seed: int, cond: torch.Tensor | None, scheduler_config: dict | None,
         shape: tuple[int, int, int], device: torch.device, batch: int) -> torch.Tensor:
    """Deterministic DDIM (msfp_compiler.sampling with the model's scheduler config); noise from a CPU generator
    seeded with seed, drawn for all n at once (results do not depend on the batch size). Returns [n, C, H, W]."""
    from msfp_compiler.sampling import make_scheduler, sample

    sched = make_scheduler("ddim", scheduler_config)
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for s in range(0, n, batch):
        x = noise[s:s + batch].to(device)
        c = cond[s:s + batch].to(device) if cond is not None else None
        fn = eps_fn if c is None else (lambda xt, tt, c=c: eps_fn(xt, tt, c))
        out.append(sample(fn, x, sched, steps).clamp(-1, 1).cpu())
    return torch.cat(out)


def keep_8bit_names(patterns: str) -> tuple[str, ...]:
    """--keep-8bit -> QuantConfig.keep_8bit: "first", "last", "last_block", layer paths and fnmatch patterns over
    them (``*.conv_shortcut``); the library expands and validates them (msfp_compiler.names)."""
    return tuple(dict.fromkeys(p.strip() for p in patterns.split(",") if p.strip()))


def compile_config(row: Row, args, seed: int) -> CompileConfig:
    cfg = args_row_config(row, args, seed, args.device, batch_size=args.finetune_batch, lr=args.lora_lr,
                          log_every=args.log_every, learn_act_scales=args.learn_act_scales,
                          holdout_samples=args.finetune_holdout,
                          time_budget_s=args.finetune_time_budget)
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, keep_8bit=keep_8bit_names(args.keep_8bit),
                                                              quantize_attention=not args.float_attention))


def _eps_fn(model_key: str, row: Row, loaded, sig, args, seed: int, device: torch.device, info: dict):
    """The noise predictor of a row on the device: the FP32 UNet, or the row compiled there (facts into info)."""
    if row.scheme is None:
        return UNetWrapper(loaded.unet.float().eval().to(device), sig)
    check = seed in args.check_seeds
    t0 = time.perf_counter()
    cm = msfp_compile(loaded, compile_config(row, args, seed), progress=False, lower=check)
    info["compile_seconds"] = round(time.perf_counter() - t0, 2)
    info.update(compile_facts(cm))
    if check:
        chk = cm.check()
        info["onnx_check"] = chk.info()  # per-quantizer verdict (msfp_compiler.check): flips counted, not failed
        print(f"[{model_key} seed {seed}] {row.name}: {chk}", flush=True)
    return move_graph(cm.graph_module, device)


def _sample_and_score(eps_fn, loaded, sig, args, seed: int, device: torch.device, info: dict) -> torch.Tensor:
    """Samples of one row (holding a GPU slot), FID against the real digits and label accuracy into info."""
    shape = (sig.in_channels, sig.sample_size, sig.sample_size)
    labels, cond = class_labels(loaded, args.samples)
    t1 = time.perf_counter()
    with gpu_slot(args.out, args.gpu_slots if device.type == "cuda" else 0, os.environ.get("CUDA_VISIBLE_DEVICES", "")):
        info["slot_wait_seconds"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        # Sampling repeats one batch shape 50 times: let cuDNN pick its fastest convolutions (summation order only).
        torch.backends.cudnn.benchmark = device.type == "cuda"
        imgs = ddim(eps_fn, args.samples, args.steps, seed, cond, sampler_config(loaded, args), shape, device,
                    args.batch)
        info["sample_seconds"] = round(time.perf_counter() - t1, 2)
        clf = load_classifier(args.classifier).to(device)
        real, _ = load_mnist_images(sig.sample_size)
        real_feats = classifier_features(clf, real.to(device)).cpu()
        feats = classifier_features(clf, imgs.to(device)).cpu()
        info["fid"] = frechet_distance(feats, real_feats)
        if args.samples > HALF:  # the earlier tables' sample count: rows of both sizes stay comparable
            info[f"fid_first_{HALF}"] = frechet_distance(feats[:HALF], real_feats)
        if cond is not None:
            info["label_accuracy"] = classifier_accuracy(clf, imgs.to(device), labels)
    return imgs


def run_task(model_key: str, seed: int, row: Row, args) -> dict:
    """One row of one model and seed: compile (on the device), sample, FID / accuracy; the samples are saved as
    OUT/samples_<model>_<seed>_<row>.pt (fp16) for PSNR against FP32 at merge time."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        import msfp_compiler.export.triton.runtime  # noqa: F401  (Triton kernels become the CUDA msfp ops)

        # Sampling: TF32 tensor-core convolutions (10-bit mantissa, far below the 4-bit quantization noise);
        # compile() switches TF32 off around calibration, statistics and fine-tuning itself.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # fine-tuning progress lines
    t0 = time.perf_counter()
    loaded = load_model(args.model_dir.get(model_key, MODELS[model_key]))
    sig = signature_of(loaded.unet)
    info: dict = {"seed": seed}
    tag = f"[{model_key} seed {seed}] {row.name}"
    print(f"{tag}: start", flush=True)
    eps_fn = _eps_fn(model_key, row, loaded, sig, args, seed, device, info)
    imgs = _sample_and_score(eps_fn, loaded, sig, args, seed, device, info)
    torch.save(imgs.half(), args.out / f"samples_{model_key}_{seed}_{slug(row.name)}.pt")
    if seed == args.grid_seed:
        from msfp_compiler.export.ort import save_grid

        save_grid(imgs[:80], args.out / f"samples_{model_key}_{slug(row.name)}.png", nrow=10)
    info["task_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"{tag}: FID {info['fid']:.3f}" + (f" acc {info['label_accuracy']:.4f}" if "label_accuracy" in info else "")
          + f" ({info['task_seconds']:.0f}s)", flush=True)
    return info


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES values, one per GPU the tasks may use (the parent never touches the GPU itself)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


@torch.no_grad()
def reference_fids(classifier: Path, n: int) -> dict:
    """FID between real digits only: the floor a perfect model reaches with n samples against all 5000."""
    clf = load_classifier(classifier)
    real, _ = load_mnist_images()
    feats = classifier_features(clf, real)
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    return {f"real_{n}_vs_all": frechet_distance(feats[perm[:n]], feats),
            "real_half_vs_half": frechet_distance(feats[perm[: len(perm) // 2]], feats[perm[len(perm) // 2:]])}


def merge(out: Path, settings: dict, table_path: Path | None = None) -> dict:
    """Shard files -> {model: {row: {metric: [per seed]}}} in ``table_path`` (default OUT/quality_mnist.json) and the
    markdown table OUT/quality_mnist.md."""
    table: dict = {}
    for f in sorted(out.glob("task_*.json")):
        task = json.loads(f.read_text())
        model, seed, row, info = task["model"], task["seed"], task["row"], task["info"]
        ref = out / f"samples_{model}_{seed}_fp32.pt"
        mine = out / f"samples_{model}_{seed}_{slug(row)}.pt"
        if row != "FP32" and ref.exists() and mine.exists():
            info["psnr_vs_fp32"] = psnr(torch.load(mine).float(), torch.load(ref).float())
        dst = table.setdefault(model, {}).setdefault(row, {"seeds": []})
        dst["seeds"].append(seed)
        for k, v in info.items():
            if k != "seed":
                dst.setdefault(k, []).append(v)
    table = {m: {r: rows[r] for r in ROWS if r in rows} for m, rows in table.items()}  # the digits table's order
    for model in table.values():  # seed order within each row
        for row in model.values():
            order = sorted(range(len(row["seeds"])), key=row["seeds"].__getitem__)
            for k in row:
                if len(row[k]) == len(order):
                    row[k] = [row[k][i] for i in order]
    res = {**{k: table[k] for k in ("uncond", "cond") if k in table}, "settings": settings}
    write_json(table_path or out / "quality_mnist.json", res, indent=1)
    (out / "quality_mnist.md").write_text(markdown(res))
    plot_loss_curves(res, out / "loss_curves.png")
    return res


def plot_loss_curves(res: dict, path: Path) -> Path | None:
    """Fine-tuning loss (interval means) per fine-tuned row, one panel per model, one line per seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [m for m in ("uncond", "cond") if m in res]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (name, row) in enumerate(res[model].items()):
            for j, curve in enumerate(row.get("loss_curve") or []):
                if curve:
                    steps, loss = zip(*curve)
                    ax.plot(steps, loss, color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
        ax.set(title=f"mnist-{model}: distillation loss (DFA-weighted where DFA)", xlabel="step", ylabel="loss",
               yscale="log")
        if ax.get_legend_handles_labels()[0]:  # a model without fine-tuned rows has no lines to name
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(vals: list[float], fmt: str = "{:.2f}") -> tuple[float, float, str]:
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, s, (fmt.format(m) + " ± " + fmt.format(s)) if len(vals) > 1 else fmt.format(m)


def _check_cell(row: dict) -> str:
    chk = [c for c in row.get("onnx_check", []) if c]
    if not chk:
        return "—"
    c = chk[0]
    return ("PASS" if c["ok"] else "**FAIL**") + f" ({c['flips']} flips)"


def compare(a: list[float], b: list[float]) -> str:
    """'lower' / 'higher' when the seeds' ranges of a and b are disjoint, else 'tie' (a difference inside the
    seeds' spread); 'one seed' when either row has a single seed (no spread to judge by)."""
    if min(len(a), len(b)) < 2:
        return "one seed"
    if max(a) < min(b):
        return "lower"
    if min(a) > max(b):
        return "higher"
    return "tie"


def goal_lines(table: dict) -> list[str]:
    """The issue's goals for one model, each with its verdict (ties called ties)."""
    out = []
    fid = {k: v["fid"] for k, v in table.items()}
    if "FP32" in fid and "MSFP + TALoRA + DFA" in fid:
        r = statistics.fmean(fid["MSFP + TALoRA + DFA"]) / statistics.fmean(fid["FP32"])
        out.append(f"- MSFP + TALoRA + DFA / FP32 mean FID: {r:.3f} (goal <= 1.10: {'met' if r <= 1.10 else 'missed'})")
    for a, b in (("MSFP PTQ", "FP4 signed PTQ"), ("MSFP PTQ", "INT4 PTQ"), ("MSFP + TALoRA + DFA", "MSFP + LoRA")):
        if a in fid and b in fid:
            d = statistics.fmean(fid[a]) - statistics.fmean(fid[b])
            v = compare(fid[a], fid[b])
            word = {"lower": "below", "higher": "ABOVE", "tie": "tie (the seeds' ranges overlap)",
                    "one seed": "undecided (a single seed has no spread)"}[v]
            out.append(f"- {a} vs {b}: {d:+.2f} FID, {word} ({len(fid[a])} vs {len(fid[b])} seeds)")
    return out


def _ft_steps(st: dict) -> str:
    if st.get("finetune_time_budget"):
        return f"up to {st['finetune_steps']} steps (cosine schedule fitted to {st['finetune_time_budget']:g} s)"
    return f"{st['finetune_steps']} steps"


def _scope(st: dict) -> str:
    """The table heading's quantization scope: what --keep-8bit (and --float-attention) left out of W4A4."""
    keep = st.get("keep_8bit", "first,last")
    out = {"first,last": "W4A4, first/last conv 8-bit", "": "W4A4, every layer", "*": "W8A8, every layer 8-bit"}.get(
        keep, f"W4A4 except 8-bit {keep}")
    out += ", LoRAs on the 8-bit layers too" if st.get("lora_8bit") and keep else ""
    return out + (", attention operands in float" if st.get("float_attention") else "")


def markdown(res: dict) -> str:
    lines: list[str] = []
    st = res["settings"]
    for model in ("uncond", "cond"):
        table = res.get(model)
        if not table:
            continue
        cond = any("label_accuracy" in r for r in table.values())
        fp = statistics.fmean(table["FP32"]["fid"]) if "FP32" in table else None
        lines += [f"### mnist-{model} ({_scope(st)}, {st['samples']} samples, DDIM {st['steps']})", "",
                  "| method | FID (MNIST-classifier features) ↓ | / FP32 | PSNR vs FP32 (dB) ↑ |"
                  + (" label acc ↑ |" if cond else "") + " ORT check (seed 0) | seeds |",
                  "|---|---|---|---|" + ("---|" if cond else "") + "---|---|"]
        for name in ROWS:
            r = table.get(name)
            if not r:
                continue
            m, _, txt = _ms(r["fid"])
            ratio = f"{m / fp:.3f}" if fp else "—"
            ps = [p for p in r.get("psnr_vs_fp32", []) if p is not None]
            ptxt = _ms(ps)[2] if ps else "—"
            acc = f" {_ms([100 * a for a in r['label_accuracy']], '{:.1f}')[2]}% |" if cond else ""
            lines.append(f"| {name} | {txt} | {ratio} | {ptxt} |{acc} {_check_cell(r)} | {len(r['fid'])} |")
        lines += ["", *goal_lines(table), ""]
    lines += [f"Mean ± standard deviation over seeds {st['seeds']} (each seed: calibration and fine-tuning seed and "
              f"sampling noise). Fine-tuning {_ft_steps(st)} at batch {st['finetune_batch']}, LoRA rank "
              f"{st['lora_rank']}, {st['finetune_samples']} FP trajectories; calibration {st['calib_samples']} "
              f"samples x {st['calib_steps']} steps; device {st['device']}.", ""]
    missing = {k: st.get(k) or [] for k in ("failed_tasks", "cut_at_time_limit", "not_started")}
    if any(missing.values()):
        lines += ["Incomplete run: " + "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in missing.items()
                                                if v) + ". Each row shows the seeds that finished.", ""]
    ref = st.get("reference_fid")
    if ref:
        floor = ref[f"real_{st['samples']}_vs_all"]
        lines += [f"FID floor of real digits in the same feature space: {st['samples']} real vs all 5000: "
                  f"{floor:.2f}; half vs half (2500 each): {ref['real_half_vs_half']:.2f}.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_arguments(p, samples=5000, steps=50, calib_samples=32, calib_steps=50, finetune_steps=800,
                        finetune_samples=64, out=ROOT / "results" / "mnist")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--late-rows", default="", help="rows launched after every seed of the others (a time limit "
                                                   "cuts these first)")
    p.add_argument("--batch", type=int, default=2500, help="sampling batch")
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--finetune-time-budget", type=float, default=None, metavar="S",
                   help="fit each fine-tuning's cosine schedule (at most --finetune-steps) to S seconds")
    p.add_argument("--learn-act-scales", action="store_true", help="fine-tuning also learns the activation scales")
    p.add_argument("--finetune-holdout", type=int, default=0, metavar="N",
                   help="FP trajectories held out of fine-tuning; their loss before / after goes into each row")
    p.add_argument("--keep-8bit", default="first,last", metavar="LAYERS",
                   help="layers kept at 8 bits: first, last, last_block (the last up block) and fnmatch patterns "
                        "over layer paths, e.g. 'first,last,time_embedding.*,*.conv_shortcut,*.downsamplers.*' "
                        "(EfficientDM's scope)")
    p.add_argument("--float-attention", action="store_true",
                   help="leave the q, k, v operands of attention in float (EfficientDM quantizes conv/linear only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="plain FP32 convolutions while sampling")
    p.add_argument("--check-seeds", default="0", help="seeds whose rows are checked in onnxruntime")
    p.add_argument("--grid-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="parallel task processes (spread over the visible GPUs)")
    p.add_argument("--gpu-slots", type=int, default=4, help="tasks sampling on one GPU at a time (0: no limit)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="seconds: launch no task in the last --launch-margin seconds, stop the tasks still running "
                        "at S and merge what finished (each finished task has its file already)")
    p.add_argument("--launch-margin", type=float, default=90.0, metavar="S")
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # "model:seed:row", set by the parent
    p.add_argument("--threads", type=int, default=2, help="CPU threads per task process")
    p.add_argument("--merge-only", action="store_true", help="only merge the task files already in --out")
    p.add_argument("--table", type=Path, default=None,
                   help="write the merged JSON here instead of OUT/quality_mnist.json (the committed table: "
                        "results/quality_mnist.json)")
    p.add_argument("--classifier", type=Path, default=CLASSIFIER)
    p.add_argument("--model-dir", action="append", default=[], metavar="KEY=DIR",
                   help="use DIR for model KEY (uncond/cond) instead of examples/mnist-KEY")
    return p


def task_list(args) -> list[tuple[str, int, Row]]:
    """(model, seed, row) in launch order: FP32 rows first (cheap, and every ratio needs them), then seed by seed the
    fine-tuned (longest) rows before the PTQ rows, --late-rows last: a time limit cuts whole seeds, not whole rows."""
    rows = parse_rows(args.rows)
    if ROWS["FP32"] in rows:  # FP32 first: the PSNR reference of the same noise
        rows = [ROWS["FP32"]] + [r for r in rows if r is not ROWS["FP32"]]
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [(m.strip(), s, r) for s in seeds for m in args.models.split(",") for r in rows]
    late = set(parse_rows(args.late_rows))
    tasks.sort(key=lambda x: (x[2].scheme is not None, x[2] in late, x[1], not x[2].num_loras))
    return tasks


def run_tasks(tasks, args, base: list[str]) -> tuple[list[str], list[str], list[str], int]:
    """One subprocess per task, --jobs at a time, round-robin over the GPUs, cut at --time-limit: (failed, cut,
    not started, GPU count)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    gpus = visible_gpus() if resolve_device(args.device).type == "cuda" else []
    deadline = time.perf_counter() + args.time_limit if args.time_limit else float("inf")
    running: list[tuple[tuple, subprocess.Popen]] = []
    failed, cut, skipped = [], [], []
    for i, (m, s, r) in enumerate(tasks):
        while len([q for _, q in running if q.poll() is None]) >= args.jobs and time.perf_counter() < deadline:
            time.sleep(0.2)
        if time.perf_counter() > deadline - args.launch_margin:
            skipped.append(f"{m}:{s}:{r.name}")
            continue
        log = open(args.out / f"log_{m}_{s}_{slug(r.name)}.txt", "w")
        alias = next(a for a, name in ALIASES.items() if name == r.name)
        task_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if len(gpus) > 1 else env
        cmd = [sys.executable, __file__, *base, "--task", f"{m}:{s}:{alias}"]
        running.append(((m, s, r.name), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=task_env)))
    for key, q in running:
        try:
            rc = q.wait(timeout=max(0.0, deadline - time.perf_counter()) if deadline < float("inf") else None)
        except subprocess.TimeoutExpired:
            q.terminate()
            try:
                q.wait(10)
            except subprocess.TimeoutExpired:
                q.kill()
                q.wait()
            cut.append(":".join(map(str, key)))
            continue
        if rc != 0:
            failed.append(":".join(map(str, key)))
    return failed, cut, skipped, len(gpus)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model_dir = dict(kv.split("=", 1) for kv in args.model_dir)
    args.check_seeds = {int(s) for s in args.check_seeds.split(",") if s.strip()}
    gpus = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if not args.task and len(set(gpus)) < len(gpus):  # CUDA then sees no device at all (call 11's first command)
        print(f"eval_mnist: CUDA_VISIBLE_DEVICES={','.join(gpus)} names a GPU twice, which hides every GPU from CUDA; "
              "list each GPU once (task i runs on entry i mod n)", file=sys.stderr)
        return 2
    if args.keep_8bit != "first,last" and not args.task:  # a pattern matching nothing: before any task starts
        for m in args.models.split(","):
            try:
                check_layer_names(load_model(args.model_dir.get(m.strip(), MODELS[m.strip()])).unet,
                                  keep_8bit_names(args.keep_8bit))
            except MsfpError as e:
                print(f"eval_mnist: {str(e).replace('QuantConfig.keep_8bit', '--keep-8bit')}", file=sys.stderr)
                return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.task:
        model, seed, alias = args.task.split(":")
        row = ROWS[ALIASES.get(alias, alias)]
        info = run_task(model, int(seed), row, args)
        write_json(args.out / f"task_{model}_{seed}_{slug(row.name)}.json",
                   {"model": model, "seed": int(seed), "row": row.name, "info": info})
        return 0
    t0 = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("samples", "steps", "batch", "calib_samples", "calib_steps",
                                              "finetune_steps", "finetune_samples", "finetune_batch", "lora_rank",
                                              "lora_lr", "device", "tf32", "finetune_time_budget",
                                              "learn_act_scales", "lora_8bit", "keep_8bit", "float_attention",
                                              "finetune_holdout", "finetune_trajectories", "no_clip_sample")}
    settings["seeds"] = [int(s) for s in args.seeds.split(",")]
    failed: list[str] = []
    if not args.merge_only:
        base = list(argv if argv is not None else sys.argv[1:])
        failed, cut, skipped, gpus = run_tasks(task_list(args), args, base)
        settings.update(wall_seconds=round(time.perf_counter() - t0, 1), failed_tasks=failed, cut_at_time_limit=cut,
                        not_started=skipped, gpus=gpus or None)
        if cut or skipped:
            print(f"time limit: {len(cut)} task(s) stopped, {len(skipped)} not started", file=sys.stderr)
    else:
        settings["wall_seconds"] = None
    settings["reference_fid"] = reference_fids(args.classifier, args.samples)
    if torch.cuda.is_available():
        settings["gpu"] = torch.cuda.get_device_name()
    res = merge(args.out, settings, args.table)
    print((args.out / "quality_mnist.md").read_text())
    if failed:
        print(f"failed tasks: {', '.join(failed)} (see {args.out}/log_*.txt)", file=sys.stderr)
        return 1
    return 0 if res else 1


if __name__ == "__main__":
    sys.exit(main())
