"""Hand-written kernels the backends lack, and quantization math (pack/unpack int4, scales).

Each kernel comes with a NumPy reference it is tested against.
"""
