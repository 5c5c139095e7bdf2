"""Benchmark support: measurements of the machine (memory bandwidth, GEMM peak) and the roofline model
that turns them into the tokens per second a phase could reach. Runtime layer: numpy and onnxruntime
only (onnx is imported lazily where a graph has to be built)."""
