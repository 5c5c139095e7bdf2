"""Elementwise work fused into the weight-matmul kernels of the TVM backend (qmatmul.py, qgemv_a8.py).

A decode step of a small model is a chain of short kernels; each costs a VM call, a thread-pool round trip
and a pass over its operands, so the norms, the gated activation and the residual adds around the
projections run inside the matmul kernel instead (FuseTVMElementwisePass decides where):

    prologue RMS_NORM:  x_e[m, :] = X[m, :] * (1 / sqrt(mean(X[m, :]^2) + eps)) * gamma      X [M, K]
             SWIGLU:    x_e[m, :] = silu(X[m, :K]) * X[m, K:]                               X [M, 2K]
                        (the gate and up projections packed into one [M, 2K] output, gate first)
    residual:           Y = R + x_e @ W                                                     R [M, N]

`entry` wraps a matmul body macro `body(X, W, S, O, Y, M)` into the PrimFunc

    (X, [gamma [K]], W, [S], [O], [R], Y)        bracketed arguments present per spec / fusion

X, R and Y 2-D [M, .] or 3-D [B, T, .] (rank=3: the activations as the phase graph has them, M = B * T),
with the prologue written to a workspace x_e [M, K] first (serially for few rows, a decode step; row-parallel
for more), so the matmul paths themselves are unchanged. Numerics are those of the unfused ops in float32
(silu with a vectorized exp, about 1 ulp).
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum

import numpy as np

from twophase.kernels.tir.fast_math import silu

SERIAL_ROWS = 4  # up to this many rows the prologue / epilogue run on the calling thread
VL = 16  # float32 lanes of the prologue's vector loops


class Prologue(Enum):
    NONE = "none"
    RMS_NORM = "rms_norm"
    SWIGLU = "swiglu"


@dataclasses.dataclass(frozen=True)
class Fusion:
    prologue: Prologue = Prologue.NONE
    epsilon: float = 1e-5  # RMS_NORM's
    residual: bool = False

    def __post_init__(self) -> None:
        if self.prologue is Prologue.RMS_NORM and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"RMS_NORM needs a positive epsilon, got {self.epsilon}")

    def x_width(self, K: int) -> int:
        """Columns of the kernel's input X for a weight with K rows."""
        return 2 * K if self.prologue is Prologue.SWIGLU else K

    @property
    def tag(self) -> str:
        """Suffix of kernel names (distinct per fusion)."""
        out = {Prologue.NONE: "", Prologue.RMS_NORM: "_norm", Prologue.SWIGLU: "_swiglu"}[self.prologue]
        return out + ("_res" if self.residual else "")

    @classmethod
    def from_attrs(cls, attrs: dict) -> Fusion:
        """From a twophase.tvm.QMatMul node's attributes (FuseTVMElementwisePass's)."""
        pro = attrs.get("prologue", "none")
        pro = pro.decode() if isinstance(pro, bytes) else str(pro)
        return cls(Prologue(pro), float(attrs.get("epsilon", 1e-5)), bool(int(attrs.get("residual", 0))))


def reference_prologue(fusion: Fusion, X: np.ndarray, gamma: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference of x_e (float32, ops in the order of ONNX RMSNormalization / Sigmoid-Mul-Mul)."""
    X = np.asarray(X, np.float32)
    if fusion.prologue is Prologue.RMS_NORM:
        ms = np.mean(np.square(X.astype(np.float64)), axis=-1, keepdims=True)
        inv = (1.0 / np.sqrt(ms + fusion.epsilon)).astype(np.float32)
        return (X * inv * np.asarray(gamma, np.float32)).astype(np.float32)
    if fusion.prologue is Prologue.SWIGLU:
        K = X.shape[-1] // 2
        g, u = X[..., :K], X[..., K:]
        return (g / (np.float32(1) + np.exp(-g.astype(np.float64))).astype(np.float32) * u).astype(np.float32)
    return X


def entry(body, *, K: int, N: int, NT: int, G: int, WK: int, wdtype: str, TN: int, quant: bool,
          has_offset: bool, fusion: Fusion, rank: int = 2):
    """The PrimFunc (module doc) around `body`; arguments absent for this spec / fusion are left out.
    `rank` 3: X, R and Y are [B, T, .] (a phase graph's activations, so its VM needs no reshapes around the
    call); 2: [M, .]."""
    if rank not in (2, 3):
        raise ValueError(f"rank must be 2 or 3, got {rank}")
    from tvm.script import tirx as T

    KX = fusion.x_width(K)
    norm, swiglu, residual = fusion.prologue is Prologue.RMS_NORM, fusion.prologue is Prologue.SWIGLU, fusion.residual
    eps = float(fusion.epsilon)
    KV, KT = K // VL, K % VL

    @T.macro
    def norm_row(X, GM, Xe, m):
        ss = T.alloc_buffer((VL,), "float32", scope="global")
        inv = T.alloc_buffer((1,), "float32", scope="global")
        for j in T.vectorized(VL):
            ss[j] = T.float32(0)
        for i in range(KV):
            for j in T.vectorized(VL):
                ss[j] = ss[j] + X[m, i * VL + j] * X[m, i * VL + j]
        for i in range(KT):
            ss[0] = ss[0] + X[m, KV * VL + i] * X[m, KV * VL + i]
        for j in range(VL - 1):
            ss[0] = ss[0] + ss[j + 1]
        inv[0] = T.float32(1) / T.sqrt(ss[0] / T.float32(K) + T.float32(eps))
        for i in range(KV):
            for j in T.vectorized(VL):
                Xe[m, i * VL + j] = X[m, i * VL + j] * inv[0] * GM[i * VL + j]
        for i in range(KT):
            Xe[m, KV * VL + i] = X[m, KV * VL + i] * inv[0] * GM[KV * VL + i]

    @T.macro
    def swiglu_row(X, Xe, m):
        for i in range(KV):
            for j in T.vectorized(VL):
                Xe[m, i * VL + j] = silu(X[m, i * VL + j]) * X[m, K + i * VL + j]
        for i in range(KT):
            Xe[m, KV * VL + i] = silu(X[m, KV * VL + i]) * X[m, K + KV * VL + i]

    @T.macro
    def prologue_row(X, GM, Xe, m):
        if norm:
            norm_row(X, GM, Xe, m)
        else:
            swiglu_row(X, Xe, m)

    @T.macro
    def add_row(Y, R, m):
        for i in range(N // VL):
            for j in T.vectorized(VL):
                Y[m, i * VL + j] = Y[m, i * VL + j] + R[m, i * VL + j]
        for i in range(N % VL):
            Y[m, N // VL * VL + i] = Y[m, N // VL * VL + i] + R[m, N // VL * VL + i]

    @T.macro
    def run(X, GM, W, S, O, R, Y, M):
        if norm or swiglu:
            Xe = T.alloc_buffer((M, K), "float32", scope="global")
            if M <= SERIAL_ROWS:
                for m in range(M):
                    prologue_row(X, GM, Xe, m)
            else:
                for m in T.parallel(M):
                    prologue_row(X, GM, Xe, m)
            body(Xe, W, S, O, Y, M)
        else:
            body(X, W, S, O, Y, M)
        if residual:
            if M <= SERIAL_ROWS:
                for m in range(M):
                    add_row(Y, R, m)
            else:
                for m in T.parallel(M):
                    add_row(Y, R, m)

    @T.macro
    def weights(X, GM, W, S, O, R, Y, M):
        # the bodies read S / O only where the spec has them: stand-ins keep their argument lists fixed
        if not quant:
            run(X, GM, W, W, W, R, Y, M)
        elif not has_offset:
            run(X, GM, W, S, S, R, Y, M)
        else:
            run(X, GM, W, S, O, R, Y, M)

    @T.jit
    def fused(
        x_handle: T.handle,
        GM: T.Optional(T.Buffer((K,), "float32")),
        W: T.Buffer((NT, K, WK), wdtype),
        S: T.Optional(T.Buffer((NT, G, TN), "float32")),
        O: T.Optional(T.Buffer((NT, G, TN), "float32")),
        r_handle: T.Optional(T.handle),
        y_handle: T.handle,
    ):
        # (the names the annotations use must appear in the body: T.jit captures a closure from it)
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8,
                     "twophase.weight_layout": [NT, K, WK, G, TN], "twophase.weight_dtype": wdtype})
        if rank == 2:
            M = T.int64()
            X = T.match_buffer(x_handle, (M, KX), "float32")
            Y = T.match_buffer(y_handle, (M, N), "float32")
            if r_handle is not None:
                R = T.match_buffer(r_handle, (M, N), "float32")
                weights(X, GM, W, S, O, R, Y, M)
            else:
                weights(X, GM, W, S, O, None, Y, M)
        else:  # [B, T, .] tensors, viewed as [B * T, .] rows
            B = T.int64()
            L = T.int64()
            X3 = T.match_buffer(x_handle, (B, L, KX), "float32")
            Y3 = T.match_buffer(y_handle, (B, L, N), "float32")
            if r_handle is not None:  # (every match_buffer before the first decl_buffer)
                R3 = T.match_buffer(r_handle, (B, L, N), "float32")
                X = T.decl_buffer((B * L, KX), "float32", data=X3.data)
                Y = T.decl_buffer((B * L, N), "float32", data=Y3.data)
                R = T.decl_buffer((B * L, N), "float32", data=R3.data)
                weights(X, GM, W, S, O, R, Y, B * L)
            else:
                X = T.decl_buffer((B * L, KX), "float32", data=X3.data)
                Y = T.decl_buffer((B * L, N), "float32", data=Y3.data)
                weights(X, GM, W, S, O, None, Y, B * L)

    absent = {}
    if not norm:
        absent["GM"] = None
    if not quant:
        absent["S"] = None
    if not has_offset:
        absent["O"] = None
    if not residual:
        absent["r_handle"] = None
    return fused.specialize(**absent)
