"""msfp-compiler: mixup-sign FP4 quantization of diffusion UNets, as torch.fx passes lowered to ONNX."""

from . import ops  # noqa: F401,E402  (registers torch.ops.msfp.* on import)
