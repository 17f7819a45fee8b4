"""TALoRA (timestep-aware LoRA): K LoRAs per quantized layer and one router shared by all layers.

- LoRA (EfficientDM): every quantized conv/linear weight W becomes Q(W + B_k A_k) (LoRA merged *before* weight
  quantization, gradients through the quantizer by the straight-through estimator).
- The router reads the sinusoidal timestep embedding and makes a hard one-hot choice of k (forward: argmax;
  backward: softmax gradient, straight-through). K = 1 is plain LoRA (no router).
- After training the router depends on the timestep only: ``router_table`` resolves it to a t -> k table, which
  passes/fuse_talora.py bakes into the graph as ``msfp::select_weight(table, timestep, [W_0, ..., W_K-1])`` on each
  layer: one op that the ONNX lowering and the Triton runner recognize by name.

Choices where the paper is silent (documented in README): the router is an MLP on a 64-d sinusoidal embedding,
warm-started to split the schedule into K equal contiguous segments so no LoRA starts unused; LoRA init
A ~ Kaiming, B = 0.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from .config import FinetuneConfig
from .errors import MsfpError
from .ops import QUANTIZE
from .record import record_of

__all__ = ["ROUTER_NAME", "TimestepRouter", "TALoRAWeight", "attach_talora", "router_table", "warm_start_router",
           "select_weight", "SELECT_WEIGHT", "chosen_set"]

ROUTER_NAME = "talora_router"


def chosen_set(table: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The weight set of a batch, int64 [1]: ``table[timestep[0]]`` (samplers give a batch one timestep)."""
    return table[timestep[:1]]


@torch.library.custom_op("msfp::select_weight", mutates_args=())
def select_weight(table: torch.Tensor, timestep: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """The fused TALoRA weight of a layer: ``weights[table[timestep[0]]]``, the LoRA set the router picks for t."""
    return torch.stack(weights).index_select(0, chosen_set(table, timestep)).squeeze(0)


@select_weight.register_fake
def _(table: torch.Tensor, timestep: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(weights[0])


SELECT_WEIGHT = torch.ops.msfp.select_weight.default


class TimestepRouter(nn.Module):
    """Timestep embedding -> K logits; hard one-hot choice with a straight-through softmax gradient."""

    def __init__(self, num_loras: int, emb_dim: int = 64, hidden: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.emb_dim = emb_dim
        # The timestep domain 0..T-1 the router is trained on (the scheduler's count): the size of its table.
        self.num_train_timesteps = num_train_timesteps
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


def attach_talora(gm: fx.GraphModule, cfg: FinetuneConfig) -> list[str]:
    """Insert the router and a TALoRAWeight module on every weight quantizer, the 8-bit ones (--keep-8bit) too
    unless ``cfg.lora_8bit`` is False; returns the module names. A graph without such weights is a user error
    (nothing to fine-tune), raised before the graph is touched."""
    g = gm.graph
    targets: list[fx.Node] = []
    for q in [n for n in g.nodes if n.op == "call_function" and n.target == QUANTIZE]:
        rec = record_of(q.args[0])
        if rec is not None and rec.role == "weight" and (cfg.lora_8bit or rec.bits == 4):
            targets.append(q)
    if not targets:
        raise MsfpError("fine-tuning: the graph has no quantized weight to attach a LoRA to" if cfg.lora_8bit else
                        "fine-tuning: no 4-bit weight to attach a LoRA to (FinetuneConfig.lora_8bit excludes the "
                        "8-bit layers)")
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
    for q in targets:
        w = q.args[0]
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
    # The new modules live where the graph's weights live (the compile device).
    ref = next(iter(gm.parameters()), None)
    ref = ref if ref is not None else next(iter(gm.buffers()), None)
    if ref is not None:
        gm.to(ref.device)
    gm.graph.lint()
    gm.recompile()
    return names


def router_table(gm: fx.GraphModule, num_train_timesteps: int | None = None) -> torch.Tensor:
    """The trained router resolved to a table t -> LoRA index (int64 [T], on the router's device); T defaults to
    the count the router was trained on (the scheduler's num_train_timesteps)."""
    if not hasattr(gm, ROUTER_NAME):
        return torch.zeros(num_train_timesteps or 1000, dtype=torch.int64)
    router = gm.get_submodule(ROUTER_NAME)
    n = num_train_timesteps or router.num_train_timesteps
    return router.choose(torch.arange(n, device=next(router.parameters()).device))


def warm_start_router(router: TimestepRouter, k: int, T: int = 1000, steps: int = 300) -> None:
    """Fit the router to K equal contiguous timestep segments of 0..T-1 (T: the scheduler's training timesteps),
    so every LoRA starts with its own timesteps."""
    router.num_train_timesteps = T
    t = torch.arange(T, device=next(router.parameters()).device)
    target = (t * k // T).clamp_max(k - 1)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    emb = router.embed(t)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(router.mlp(emb), target)
        loss.backward()
        opt.step()
