"""Compile options as frozen dataclasses (plain data); the CLI only maps flags onto these.

Validation errors name the field (``QuantConfig.scheme``); the CLI rewrites field names into its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MsfpError
from .formats import parse_format

__all__ = ["SCHEMES", "SCHEME_NAMES", "FP32_SCHEME", "TRAJECTORIES", "QuantConfig", "CalibConfig", "FinetuneConfig",
           "CompileConfig", "parse_conv_weights"]

# scheme -> (activation candidates, weight candidates) at 4 bits
SCHEMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # MSFP: signed FP4 and unsigned FP4 with a zero point compete on every activation (mixup-sign).
    "msfp": (("e1m2", "e2m1", "e3m0", "ue2m2", "ue3m1", "ue4m0"), ("e1m2", "e2m1", "e3m0")),
    # Signed FP4 everywhere (the paper's "FP4 baseline").
    "fp4-signed": (("e1m2", "e2m1", "e3m0"), ("e1m2", "e2m1", "e3m0")),
    # Q-Diffusion-style INT4: asymmetric activations (zero point), symmetric per-channel weights.
    "int4": (("uint4",), ("int4",)),
}
# No quantization: the FP32 model lowered through the same path (inputs, outputs, external data), the baseline.
FP32_SCHEME = "fp32"
SCHEME_NAMES = (*SCHEMES, FP32_SCHEME)
HIGH_PRECISION = (("uint8",), ("int8",))
# FinetuneConfig.trajectories: whose sampler trajectories the distillation trains on
TRAJECTORIES = ("fp", "student", "mixed")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how the per-layer format search runs."""

    scheme: str = "msfp"
    act_formats: tuple[str, ...] | None = None  # overrides the scheme's activation candidates
    weight_formats: tuple[str, ...] | None = None  # overrides the scheme's weight candidates
    weight_granularity: str = "channel"  # "channel" (per output channel) or "tensor"
    sign_rule: str = "mse"  # "mse": both families everywhere; "stats": unsigned only for small bounded negatives
    unsigned_max_neg_ratio: float = 0.5  # "stats" rule: |min| <= ratio * max admits unsigned candidates
    # layers kept at 8 bits: "first" / "last" conv, "last_block" (the last up block), module paths, patterns
    keep_8bit: tuple[str, ...] = ("first", "last")
    clip_ratios: int = 40  # points of the clip-ratio grid, 0.3..1.0 of the range
    zero_points: int = 12  # points of the zero-point grid for unsigned formats, min..0
    sample_per_group: int = 2048  # activation values kept per tensor and timestep group for the search
    quantize_attention: bool = True  # quantize q, k, v operands of scaled_dot_product_attention
    # quantize each part of a channel concatenation feeding a conv (UNet skip connections) with its own format and
    # scale; False: one quantizer on the concatenated tensor
    split_concat: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_NAMES:
            raise MsfpError(f"QuantConfig.scheme: unknown scheme {self.scheme!r} (expected one of "
                            f"{', '.join(SCHEME_NAMES)})")
        for opt, fmts in (("QuantConfig.act_formats", self.act_formats), ("QuantConfig.weight_formats",
                                                                          self.weight_formats)):
            for f in fmts or ():
                try:
                    bits = parse_format(f).bits
                except MsfpError as e:
                    raise MsfpError(f"{opt}: {e}") from None
                # records, packing (two codes per byte) and the ONNX decode all assume 4-bit candidates
                if bits != 4:
                    raise MsfpError(f"{opt}: {f!r} is a {bits}-bit format; candidates must be 4-bit "
                                    "(keep whole layers at 8 bits with QuantConfig.keep_8bit)")
        for f in self.weight_formats or ():
            if f.startswith("u"):
                raise MsfpError(f"QuantConfig.weight_formats: {f!r} must be signed (weights are symmetric per channel)")
        if self.weight_granularity not in ("channel", "tensor"):
            raise MsfpError(f"QuantConfig.weight_granularity: unknown {self.weight_granularity!r} "
                            "(expected channel or tensor)")
        if self.sign_rule not in ("mse", "stats"):
            raise MsfpError(f"QuantConfig.sign_rule: unknown {self.sign_rule!r} (expected mse or stats)")

    @property
    def act_candidates(self) -> tuple[str, ...]:
        return self.act_formats or SCHEMES[self.scheme][0]

    @property
    def weight_candidates(self) -> tuple[str, ...]:
        return self.weight_formats or SCHEMES[self.scheme][1]


@dataclass(frozen=True)
class CalibConfig:
    num_samples: int = 8
    num_steps: int = 10
    num_groups: int = 4
    holdout_samples: int = 2
    scheduler: str = "ddim"
    seed: int = 0
    # Tokens in the random text states that calibrate a cross-attention model without a class-embedding table
    # (the exported graph takes any length): Stable Diffusion pipelines always pass 77.
    text_len: int = 1
    note: str = ""  # why this size (calibration.default_calibration's rule), written to passes.log

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_steps", "num_groups", "text_len"):
            if getattr(self, name) < 1:
                raise MsfpError(f"CalibConfig.{name} must be >= 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class FinetuneConfig:
    """TALoRA/LoRA + DFA distillation after insert_qdq (msfp_compiler/distillation.py)."""

    steps: int = 300
    num_loras: int = 2  # K; 1 = plain LoRA (EfficientDM)
    # 32 (EfficientDM's): at a fixed ~900-1500 steps, 3 paired seeds each, rank 32 beat rank 4 on both MNIST models
    # with disjoint seed ranges (uncond 346 vs 419 FID, cond 557 vs 645; results/quality_mnist.md, call 10); the
    # LoRAs fuse into the weights, so inference costs nothing extra. (At ~245 steps on cond it was a tie.)
    rank: int = 32
    lr: float = 1e-3
    router_lr: float = 1e-2
    batch_size: int = 16
    dfa: bool = True
    learn_act_scales: bool = False  # LSQ-style learnable activation scales
    # LoRAs also on the 8-bit weights (QuantConfig.keep_8bit); False: 4-bit weights only, the 8-bit layers frozen,
    # as every fine-tuned MNIST row before session 22 (call 20) ran
    lora_8bit: bool = True
    act_scale_lr_factor: float = 0.1  # their learning rate: lr times this
    cuda_graph: bool = True  # on CUDA, capture the training step once and replay it (distillation.py)
    # seconds: fit the cosine schedule's length (at most ``steps``) to this budget at the measured step rate
    time_budget_s: float | None = None
    samples: int = 32  # FP trajectories used as distillation data (msfp-compile scales it to the model)
    # FP trajectories never trained on: their DFA-weighted loss before / after fine-tuning (overfitting shows as a
    # held-out loss that stops falling while the training probe's still does); 0 = none
    holdout_samples: int = 0
    sampler_steps: int = 50  # DDIM steps of those trajectories (and of gamma_t)
    sampler: str = "ddim"
    # whose sampler trajectories are the training inputs: "fp" (the FP model's, as EfficientDM), "student" (the
    # quantized graph's own, before fine-tuning, labelled by the FP model) or "mixed" (both)
    trajectories: str = "fp"
    seed: int = 0
    checkpoint: str | None = None  # write LoRA/router state here (safetensors) at the end
    checkpoint_every: int = 0  # also every N steps when > 0
    log_every: int = 50  # a progress line (step, loss, steps/s) and a loss-curve point every N steps; 0 = none
    note: str = ""  # why this many trajectories (distillation.default_finetune_samples' rule), written to passes.log

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_loras < 1 or self.rank < 1:
            raise MsfpError("FinetuneConfig.steps, FinetuneConfig.num_loras and FinetuneConfig.rank must be >= 1")
        if self.trajectories not in TRAJECTORIES:
            raise MsfpError(f"FinetuneConfig.trajectories: unknown {self.trajectories!r} (expected "
                            f"{', '.join(TRAJECTORIES)})")
        if self.samples < 1:
            raise MsfpError(f"FinetuneConfig.samples must be >= 1 (got {self.samples})")
        if self.holdout_samples < 0:
            raise MsfpError(f"FinetuneConfig.holdout_samples must be >= 0 (got {self.holdout_samples})")



def parse_conv_weights(value: str) -> float:
    """``CompileConfig.conv_weights`` (``--conv-weights``) -> the share of conv weight elements stored as FP32:
    "int8" -> 0 (1 byte a weight, dequantized at run time), "float32" -> 1 (prepacked by onnxruntime, 4 bytes a
    weight), "float32:F" -> F with 0 < F <= 1 (the convs with the most output positions first). Anything else is a
    one-line MsfpError naming the field."""
    if value in ("int8", "float32"):
        return float(value == "float32")
    head, _, share = value.partition(":")
    try:
        f = float(share) if head == "float32" else -1.0
    except ValueError:
        f = -1.0
    if not 0.0 < f <= 1.0:  # also NaN
        raise MsfpError(f"CompileConfig.conv_weights: unknown {value!r} (expected int8, float32 or float32:F with "
                        "a share 0 < F <= 1 of the conv weights, e.g. float32:0.1)")
    return f


@dataclass(frozen=True)
class CompileConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    pack_weights: bool = True
    # ONNX weights as int8 + DequantizeLinear and linears as MatMulInteger (1 byte a weight in a plain ORT session);
    # False keeps the 4-bit packed weights in the file (half its size), which a plain session expands to FP32
    integer_kernels: bool = True
    # with integer_kernels, for the convs that do not run as integer GEMMs (strided, 8-bit, input not one
    # quantizer's output): "int8" conv weights (1 byte a weight, dequantized each run), "float32" (decoded at
    # lowering: ORT prepacks them, faster convs, 4 bytes a weight) or "float32:F" (that share F of the conv weight
    # elements, the convs with the most output positions first); export/integer_kernels.py has the numbers
    conv_weights: str = "int8"
    fold_zero_point: bool = True
    finetune: FinetuneConfig | None = None  # TALoRA/LoRA + DFA distillation after insert_qdq
    # Where calibration, statistics, the format search and fine-tuning run ("cpu", "cuda", "cuda:N"); capture and
    # ONNX lowering always run on the CPU.
    device: str = "cpu"

    def __post_init__(self) -> None:
        parse_conv_weights(self.conv_weights)
