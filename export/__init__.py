"""Back ends: ONNX lowering, onnxruntime helpers, Triton runtime."""
