"""Hand-written TIR kernels for the TVM backend (attention, quantized matmul, gather)."""
