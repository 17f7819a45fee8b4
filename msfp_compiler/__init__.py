"""msfp-compiler: mixup-sign FP4 quantization of diffusion UNets, as torch.fx passes lowered to ONNX.

Importing the package imports nothing heavy (``msfp-compile --help`` stays fast); the modules that use
``torch.ops.msfp.*`` import ``msfp_compiler.ops``, which registers them.
"""
