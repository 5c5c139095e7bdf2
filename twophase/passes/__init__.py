"""Graph-to-graph rewrites on onnx_ir, one pass per file (see each file's docstring).

    CleanupPass              cleanup.py               fold constants, drop dead code, infer shapes, sort
    SplitPhasesPass          split_phases.py          canonical graph -> prefill graph | decode graph
    QuantizeWeightsPass      quantize_weights.py      DequantizeLinear on MatMul weights and the embedding
    SmoothQuantPass          smooth_quant.py          move activation outliers into the weights (w8a8)
    QuantizeActivationsPass  quantize_activations.py  w8a8 QDQ: int8 weights, per-token / static activations
    FuseDequantMatMulPass    fuse_dequant_matmul.py   ORT: DQ+MatMul -> MatMulNBits, DQ+Gather -> GatherBlockQuantized
    FuseInt8MatMulPass       fuse_int8_matmul.py      ORT: w8a8 QDQ -> MatMulIntegerToFloat
    BindKVCachePass          bind_kv_cache.py         ORT: attention -> GroupQueryAttention over in-place KV buffers
    FuseSkipNormPass         fuse_skip_norm.py        ORT: residual Add + RMSNorm -> SkipSimplifiedLayerNormalization
    PackProjectionsPass      pack_projections.py      ORT: q/k/v and gate/up packed into one MatMul each
    FuseTVMKernelsPass       fuse_tvm_kernels.py      TVM: weight MatMuls / quantized Gather -> twophase's kernels
    DecomposeAttentionPass   decompose_attention.py   opset-23 RotaryEmbedding / Attention -> standard ops

Names are imported lazily so that importing one pass does not import every other.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CleanupPass": "twophase.passes.cleanup",
    "SplitPhasesPass": "twophase.passes.split_phases",
    "QuantizeWeightsPass": "twophase.passes.quantize_weights",
    "SmoothQuantPass": "twophase.passes.smooth_quant",
    "QuantizeActivationsPass": "twophase.passes.quantize_activations",
    "FuseDequantMatMulPass": "twophase.passes.fuse_dequant_matmul",
    "FuseInt8MatMulPass": "twophase.passes.fuse_int8_matmul",
    "BindKVCachePass": "twophase.passes.bind_kv_cache",
    "FuseSkipNormPass": "twophase.passes.fuse_skip_norm",
    "PackProjectionsPass": "twophase.passes.pack_projections",
    "FuseTVMKernelsPass": "twophase.passes.fuse_tvm_kernels",
    "DecomposeAttentionPass": "twophase.passes.decompose_attention",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
