"""TALoRA + DFA fine-tuning of the quantized graph by data-free distillation from the FP model.

- LoRA (EfficientDM): every quantized conv/linear weight W becomes Q(W + B_k A_k) (LoRA merged *before* weight
  quantization, gradients through the quantizer by the straight-through estimator).
- TALoRA: K LoRAs per layer and ONE router shared by all layers. The router reads the sinusoidal timestep embedding
  and makes a hard one-hot choice of k (forward: argmax; backward: softmax gradient, straight-through). K = 1 is
  plain LoRA (no router).
- DFA: the loss at step t is weighted by gamma_t, the magnitude of the coefficient of the predicted noise in the
  sampler update (DDIM: sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t); DDPM:
  beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))), normalized to mean 1 over the sampler's steps.
- Data: trajectories of the FP model (x_t, t, cond) along the sampler; teacher = FP noise prediction at the same
  input (as EfficientDM). Batches share one timestep, as in sampling, so the router makes one choice per batch.

Choices where the paper is silent (documented in README): the router is an MLP on a 64-d sinusoidal embedding,
warm-started to split the schedule into K equal contiguous segments so no LoRA starts unused; LoRA init A ~ Kaiming,
B = 0; Adam, cosine learning-rate decay.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet
from .capture import UNetSignature, UNetWrapper
from .errors import MsfpError
from .record import record_of

__all__ = ["FinetuneConfig", "TimestepRouter", "TALoRAWeight", "dfa_weights", "attach_talora", "finetune",
           "FinetuneResult", "router_table", "ROUTER_NAME"]

ROUTER_NAME = "talora_router"
QUANTIZE = torch.ops.msfp.quantize.default


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300
    num_loras: int = 2  # K; 1 = plain LoRA (EfficientDM)
    rank: int = 4
    lr: float = 1e-3
    router_lr: float = 1e-2
    batch_size: int = 16
    dfa: bool = True
    learn_act_scales: bool = False  # LSQ-style learnable activation scales
    samples: int = 32  # FP trajectories used as distillation data
    sampler_steps: int = 50  # DDIM steps of those trajectories (and of gamma_t)
    sampler: str = "ddim"
    seed: int = 0
    checkpoint: str | None = None  # write LoRA/router state here (safetensors) at the end
    checkpoint_every: int = 0  # also every N steps when > 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_loras < 1 or self.rank < 1:
            raise MsfpError("--finetune-steps, --num-loras and --lora-rank must be >= 1")


class TimestepRouter(nn.Module):
    """Timestep embedding -> K logits; hard one-hot choice with a straight-through softmax gradient."""

    def __init__(self, num_loras: int, emb_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, num_loras))

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        return get_timestep_embedding(t.reshape(-1).float(), self.emb_dim, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(t))

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        logits = self.logits(timestep[:1])[0]
        soft = logits.softmax(-1)
        hard = torch.nn.functional.one_hot(soft.argmax(), soft.numel()).to(soft.dtype)
        return hard + soft - soft.detach()

    def choose(self, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(t).argmax(-1)


class TALoRAWeight(nn.Module):
    """W -> W + sum_k g_k B_k A_k for a [K] gate g (one-hot in the forward pass)."""

    def __init__(self, weight_shape: torch.Size, num_loras: int, rank: int, generator: torch.Generator):
        super().__init__()
        out_f, in_f = weight_shape[0], math.prod(weight_shape[1:])
        a = torch.randn(num_loras, rank, in_f, generator=generator) / math.sqrt(in_f)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(num_loras, out_f, rank))
        self.shape = tuple(weight_shape)

    def delta(self, k: int) -> torch.Tensor:
        return (self.lora_B[k] @ self.lora_A[k]).reshape(self.shape)

    def forward(self, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        d = torch.einsum("k,kor,kri->oi", gate, self.lora_B, self.lora_A)
        return weight + d.reshape(self.shape)


def dfa_weights(scheduler, num_steps: int, kind: str = "ddim") -> dict[int, float]:
    """gamma_t per sampler timestep: |coefficient of eps in the update|, normalized to mean 1 over the steps."""
    scheduler.set_timesteps(num_steps)
    abar = scheduler.alphas_cumprod.double()
    ts = [int(t) for t in scheduler.timesteps]
    gam = {}
    for t in ts:
        if kind == "ddim":
            prev = t - scheduler.config.num_train_timesteps // num_steps
            a_prev = abar[prev] if prev >= 0 else scheduler.final_alpha_cumprod.double()
            g = (1 - a_prev).sqrt() - a_prev.sqrt() * (1 - abar[t]).sqrt() / abar[t].sqrt()
        elif kind == "ddpm":
            beta = scheduler.betas.double()[t]
            g = beta / ((1 - beta).sqrt() * (1 - abar[t]).sqrt())
        else:
            raise MsfpError(f"DFA: unknown sampler {kind!r}")
        gam[t] = abs(float(g))
    mean = sum(gam.values()) / len(gam)
    return {t: g / mean for t, g in gam.items()}


def attach_talora(gm: fx.GraphModule, cfg: FinetuneConfig) -> list[str]:
    """Insert the router and a TALoRAWeight module on every 4-bit weight quantizer; returns the module names."""
    g = gm.graph
    gen = torch.Generator().manual_seed(cfg.seed)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    timestep = placeholders[1]
    names = []
    gate = None
    if cfg.num_loras > 1:
        gm.add_submodule(ROUTER_NAME, TimestepRouter(cfg.num_loras))
        with g.inserting_after(placeholders[-1]):
            gate = g.call_module(ROUTER_NAME, (timestep,))
    order = {n: i for i, n in enumerate(g.nodes)}
    for q in [n for n in g.nodes if n.op == "call_function" and n.target == QUANTIZE]:
        w = q.args[0]
        rec = record_of(w)
        if rec is None or rec.role != "weight" or rec.bits != 4:
            continue
        name = f"talora_{w.name}"
        weight = gm.get_parameter(w.target) if w.target in dict(gm.named_parameters()) else gm.get_buffer(w.target)
        gm.add_submodule(name, TALoRAWeight(weight.shape, cfg.num_loras, cfg.rank, gen))
        if gate is None:
            gm.get_submodule(name).register_buffer("one", torch.ones(1))
        # Weight quantizers may sit before the placeholders (get_attr order); rebuild them next to their layer,
        # after the router.
        layer = min(q.users, key=lambda u: order[u])
        with g.inserting_before(layer):
            gate_arg = gate if gate is not None else g.get_attr(f"{name}.one")
            lw = g.call_module(name, (w, gate_arg))
            q2 = g.call_function(QUANTIZE, (lw,) + tuple(q.args[1:]))
        q2.meta.update(q.meta)
        q.replace_all_uses_with(q2)
        g.erase_node(q)
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return names


def router_table(gm: fx.GraphModule, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The trained router resolved to a table t -> LoRA index (int64 [num_train_timesteps])."""
    if not hasattr(gm, ROUTER_NAME):
        return torch.zeros(num_train_timesteps, dtype=torch.int64)
    return gm.get_submodule(ROUTER_NAME).choose(torch.arange(num_train_timesteps))


def _warm_start_router(router: TimestepRouter, k: int, T: int = 1000, steps: int = 300) -> None:
    """Fit the router to K equal contiguous timestep segments, so every LoRA starts with its own timesteps."""
    t = torch.arange(T)
    target = (t * k // T).clamp_max(k - 1)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    emb = router.embed(t)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(router.mlp(emb), target)
        loss.backward()
        opt.step()


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0
    table: torch.Tensor | None = None
    gammas: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def _teacher_data(teacher: nn.Module, sig: UNetSignature, data: CalibrationSet):
    model = UNetWrapper(teacher, sig).eval()
    return [(b, model(*b.args)) for b in data.batches]


def _eval_loss(gm, items, gammas) -> float:
    with torch.no_grad():
        tot = 0.0
        for b, y in items:
            tot += gammas.get(int(b.timestep[0]), 1.0) * float((gm(*b.args) - y).pow(2).mean())
        return tot / len(items)


def finetune(gm: fx.GraphModule, teacher: nn.Module, sig: UNetSignature, data: CalibrationSet,
             cfg: FinetuneConfig, scheduler, progress: bool | None = None) -> FinetuneResult:
    """Distill the FP model into the quantized graph with (TA)LoRA and optional DFA; modifies gm in place."""
    attach_talora(gm, cfg)
    torch.manual_seed(cfg.seed)
    if hasattr(gm, ROUTER_NAME):
        _warm_start_router(gm.get_submodule(ROUTER_NAME), cfg.num_loras,
                           scheduler.config.num_train_timesteps)
    gammas = dfa_weights(scheduler, cfg.sampler_steps, cfg.sampler) if cfg.dfa else {}
    return _train(gm, teacher, sig, data, cfg, gammas, progress)


def _train(gm, teacher, sig, data, cfg, gammas, progress) -> FinetuneResult:
    for p in gm.parameters():
        p.requires_grad_(False)
    lora = [p for n, p in gm.named_parameters() if n.startswith("talora_") and not n.startswith(ROUTER_NAME)]
    router = [p for n, p in gm.named_parameters() if n.startswith(ROUTER_NAME)]
    groups = [{"params": lora, "lr": cfg.lr}]
    if router:
        groups.append({"params": router, "lr": cfg.router_lr})
    if cfg.learn_act_scales:
        scales = _make_act_scales_learnable(gm)
        groups.append({"params": scales, "lr": cfg.lr * 0.1})
    for grp in groups:
        for p in grp["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    items = _teacher_data(teacher, sig, data)
    probe = items[:: max(1, len(items) // 8)]
    res = FinetuneResult(gammas=gammas)
    res.initial_loss = _eval_loss(gm, probe, gammas)
    gen = torch.Generator().manual_seed(cfg.seed)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(cfg.steps), desc="finetune", disable=not show, leave=False)
    t0 = time.perf_counter()
    for step in bar:
        b, y = items[int(torch.randint(len(items), (1,), generator=gen))]
        n = b.sample.shape[0]
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        args = tuple(a[idx] for a in b.args)
        w = gammas.get(int(b.timestep[0]), 1.0)
        loss = w * (gm(*args) - y[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        res.losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(res.losses[-10:]) / len(res.losses[-10:]):.4g}")
        if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_state(gm, cfg.checkpoint)
    for p in gm.parameters():
        p.requires_grad_(False)
    res.seconds = time.perf_counter() - t0
    res.final_loss = _eval_loss(gm, probe, gammas)
    res.table = router_table(gm)
    if cfg.checkpoint:
        save_state(gm, cfg.checkpoint)
    return res


def _make_act_scales_learnable(gm: fx.GraphModule) -> list[nn.Parameter]:
    """Turn activation-quantizer scale buffers into parameters (LSQ-style learned step size)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == QUANTIZE:
            rec = record_of(n.args[0])
            s = n.args[1]
            if rec is not None and rec.role == "act" and s.op == "get_attr" and s.target in dict(gm.named_buffers()):
                val = gm.get_buffer(s.target)
                delattr(gm, s.target)
                p = nn.Parameter(val.clone())
                gm.register_parameter(s.target, p)
                out.append(p)
    return out


def save_state(gm: fx.GraphModule, path: str) -> None:
    """LoRA + router (+ learned scales) tensors as safetensors, written atomically."""
    from pathlib import Path

    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in gm.named_parameters() if p.requires_grad or "talora" in n}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


@dataclass
class FinetunePass:
    """Pass wrapper: TALoRA/LoRA + DFA distillation on the quantized graph (adds LoRA modules and the router)."""

    teacher: nn.Module
    sig: UNetSignature
    data: CalibrationSet
    config: FinetuneConfig
    scheduler: object
    progress: bool | None = None
    name: str = "finetune"
    result: FinetuneResult | None = None

    def __call__(self, gm: fx.GraphModule):
        from .pass_manager import PassResult

        self.result = r = finetune(gm, self.teacher, self.sig, self.data, self.config, self.scheduler, self.progress)
        info = {"steps": self.config.steps, "num_loras": self.config.num_loras, "rank": self.config.rank,
                "dfa": self.config.dfa, "initial_loss": round(r.initial_loss, 6), "final_loss": round(r.final_loss, 6),
                "train_seconds": round(r.seconds, 2)}
        report = [f"distillation loss (DFA-weighted probe) {r.initial_loss:.5f} -> {r.final_loss:.5f}"]
        if r.gammas:
            ts = sorted(r.gammas)
            report.append("gamma_t: " + " ".join(f"{t}:{r.gammas[t]:.2f}" for t in ts[:: max(1, len(ts) // 10)]))
        return PassResult(gm, True, info, report)
