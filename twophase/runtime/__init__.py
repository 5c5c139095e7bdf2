"""Runtime: load an artifact and generate text. Imports neither torch nor transformers (nor onnx)."""
