"""msfp-compiler: mixup-sign FP4 quantization of diffusion UNets, as torch.fx passes lowered to ONNX."""
