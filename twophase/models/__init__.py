"""Model sources -> canonical ONNX: the zoo, HF/GGUF loading, torch export, third-party ONNX import."""
