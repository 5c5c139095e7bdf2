"""Graph-to-graph rewrites on onnx_ir, one pass per file (see each file's docstring)."""
