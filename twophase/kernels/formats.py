"""Quantized weight formats shared by the quantization passes, algorithms and fusions.

Dimension letters: K = MatMul reduction (input) axis, N = output channels, G = number of blocks
along K (ceil(K / block_size)). A MatMul weight is W[K, N] (ONNX MatMul's B input).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """W[K, N] ~= (codes - zero_point) * scale, with one (scale, zero_point) per block of K and column.

    codes       (K, N) unpacked integer codes: int8 for signed formats, uint8 for unsigned ones
                (int4 codes live in int8/uint8 containers here; packing is a lowering detail)
    scale       (G, N) float32
    zero_point  (G, N) or None (symmetric). Integer codes' dtype for ordinary zero points; float32
                for formats whose offset is not on the integer grid (GGUF Q4_1: W = d*q + m, so the
                zero point is -m/d), which a fused kernel can take as is.
    bits        4 or 8
    block_size  rows of K per block; block_size >= K means one block (per output channel)
    """

    codes_KN: np.ndarray
    scale_GN: np.ndarray
    zero_point_GN: np.ndarray | None
    bits: int
    block_size: int

    @property
    def signed(self) -> bool:
        return self.codes_KN.dtype == np.int8

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes_KN.shape

    def dequantize(self) -> np.ndarray:
        """The float32 (K, N) weight this encodes (the NumPy reference of every dequant kernel)."""
        K, N = self.codes_KN.shape
        rows = np.arange(K) // self.block_size  # block index of each row of K
        q = self.codes_KN.astype(np.float32)
        if self.zero_point_GN is not None:
            q = q - self.zero_point_GN.astype(np.float32)[rows]
        return (q * self.scale_GN[rows]).astype(np.float32)
