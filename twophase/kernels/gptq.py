"""GPTQ: int4 / int8 blocked weight quantization with Hessian-based error compensation (pure NumPy).

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a MatMul y = x @ W with W[K, N] and calibration inputs X[T, K], GPTQ chooses
codes that keep ||X W - X W_q||_F small: it quantizes W one row of K (one input channel) at a time
and moves each row's rounding error onto the rows not yet quantized, weighted by the inverse
Hessian H = X^T X (here: `calibration.hessians`, the sum over calibration tokens).

    H += damp * mean(diag(H)) * I                      dead channels (H[k, k] == 0): H[k, k] = 1, W[k] = 0
    U = upper Cholesky factor of H^-1                  (H^-1 = U^T U)
    for k in order:                                    (order = argsort(-diag(H)) with act_order)
        q_k = quantize(W[k])                           on W[k]'s block grid
        e   = (W[k] - q_k) / U[k, k]
        W[j] -= U[k, j] * e      for every later j     (lazily, in blocks of rows: one GEMM per block)

Grid: exactly the round-to-nearest grids of kernels/quant.py (`quantize_rtn`), per block of
`block_size` rows of K and output column, so GPTQ and RTN differ only in the codes they pick:
  symmetric int4:  s = w* / -8 (w* the block's signed value of largest magnitude), codes -8..7;
  symmetric int8:  s = absmax / 127, codes -127..127;
  asymmetric uint: lo = min(W, 0), hi = max(W, 0), s = (hi - lo) / (2^b - 1), z = clip(rint(-lo / s)).
Scales are rounded to float32 before use, so the error GPTQ compensates is that of the stored weight.
A block's scale is computed from its rows as they are when GPTQ reaches the block's first row
(error compensation included); with act_order the rows are visited out of order, so blocks use
scales computed from the original weights up front ("static groups"): QuantizedWeight's blocks
are contiguous in K and cannot follow a permuted order.

`gptq_reference` is an unblocked, line-by-line transcription of the algorithm; tests check
`gptq_quantize` against it, and against `quantize_rtn` where GPTQ must reduce to RTN (diagonal H).
`gptq_quantizer(hessians, ...)` makes the `quantizer(weight_name, W_KN) -> QuantizedWeight` hook that
the weight-quantization pass takes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np

from twophase.kernels.formats import QuantizedWeight

log = logging.getLogger(__name__)

DEFAULT_DAMP = 0.01
LAZY_ROWS = 128  # rows of K updated together before the trailing GEMM (rounded up to whole blocks)

Quantizer = Callable[[str, np.ndarray], "QuantizedWeight | None"]  # QuantizeWeightsPass's hook


# ---------------------------------------------------------------------------------------------
# The grid


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if not symmetric:
        return 0, (1 << bits) - 1
    half = 1 << (bits - 1)
    return (-half, half - 1) if bits == 4 else (-(half - 1), half - 1)


def block_params(W_bN: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale [N], zero point [N] or None) of one block of rows W_bN [b, N], kernels/quant.py's grid.

    Returned as float64 arrays holding float32 values (the stored precision).
    """
    if symmetric:
        if bits == 4:
            idx = np.abs(W_bN).argmax(axis=0)
            scale = W_bN[idx, np.arange(W_bN.shape[1])].astype(np.float32) / np.float32(-8)
        else:
            scale = np.abs(W_bN).max(axis=0).astype(np.float32) / np.float32((1 << (bits - 1)) - 1)
        return np.where(scale == 0, np.float32(1), scale).astype(np.float64), None
    levels = (1 << bits) - 1
    lo = np.minimum(W_bN.min(axis=0), 0).astype(np.float32)
    hi = np.maximum(W_bN.max(axis=0), 0).astype(np.float32)
    scale = (hi - lo) / np.float32(levels)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    return scale.astype(np.float64), zero.astype(np.float64)


def quantize_rows(W_rN: np.ndarray, scale_N: np.ndarray, zero_N: np.ndarray | None, bits: int) -> np.ndarray:
    """Integer codes (as floats) of rows W_rN [..., N] on the grid (scale, zero)."""
    lo_code, hi_code = _code_range(bits, zero_N is None)
    q = np.rint(W_rN / scale_N)
    if zero_N is not None:
        q += zero_N
    return np.clip(q, lo_code, hi_code)


def dequantize_rows(q_rN: np.ndarray, scale_N: np.ndarray, zero_N: np.ndarray | None) -> np.ndarray:
    return (q_rN - zero_N) * scale_N if zero_N is not None else q_rN * scale_N


def _pack(
    codes_KN: np.ndarray, scale_GN: np.ndarray, zero_GN: np.ndarray | None, bits: int, block_size: int
) -> QuantizedWeight:
    signed = zero_GN is None
    return QuantizedWeight(
        codes_KN=codes_KN.astype(np.int8 if signed else np.uint8),
        scale_GN=scale_GN.astype(np.float32),
        zero_point_GN=None if signed else zero_GN.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )


def _check(W_KN: np.ndarray, bits: int, block_size: int) -> None:
    if W_KN.ndim != 2:
        raise ValueError(f"expected a 2-D weight W[K, N], got shape {W_KN.shape}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


# ---------------------------------------------------------------------------------------------
# GPTQ


def _prepare(
    W_KN: np.ndarray, H_KK: np.ndarray, damp: float, act_order: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W float64 with dead rows zeroed, permutation [K], U = upper Cholesky of the damped H^-1, permuted)."""
    W = np.array(W_KN, dtype=np.float64)
    H = np.array(H_KK, dtype=np.float64)
    K = W.shape[0]
    if H.shape != (K, K):
        raise ValueError(f"Hessian has shape {H.shape}, expected {(K, K)} for a weight of shape {W.shape}")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    H = H[np.ix_(perm, perm)]
    mean_diag = float(np.mean(np.diag(H)))
    for attempt in range(6):
        Hd = H + (damp * 10**attempt) * mean_diag * np.eye(K)
        try:
            # With J the row reversal, J Hd J = M M^T (M lower) gives Hd^-1 = U^T U for the upper
            # U = J M^-1 J: one Cholesky and one inverse instead of GPTQ's usual three factorizations.
            M = np.linalg.cholesky(Hd[::-1, ::-1])
            U = np.ascontiguousarray(np.linalg.inv(M)[::-1, ::-1])
        except np.linalg.LinAlgError:
            log.warning("GPTQ: Hessian not positive definite at damp %.3g; retrying with more damping",
                        damp * 10**attempt)
            continue
        return W, perm, U
    raise np.linalg.LinAlgError("GPTQ: the Hessian stays singular even with heavy damping")


def _static_params(W: np.ndarray, bits: int, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    K, N = W.shape
    G = math.ceil(K / block_size)
    scale = np.empty((G, N))
    zero = None if symmetric else np.empty((G, N))
    for g in range(G):
        s, z = block_params(W[g * block_size : (g + 1) * block_size], bits, symmetric)
        scale[g] = s
        if zero is not None:
            zero[g] = z
    return scale, zero


def gptq_quantize(
    W_KN: np.ndarray,
    H_KK: np.ndarray,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    lazy_rows: int = LAZY_ROWS,
) -> QuantizedWeight:
    """GPTQ-quantize W[K, N] given H = X^T X [K, K] of its inputs; blocks of `block_size` rows of K.

    Rows are processed in lazy batches of `lazy_rows` (rounded up to a multiple of block_size, so a
    block never straddles two batches and its scale sees fully compensated rows): within a batch the
    error updates touch only the batch, and the rest of W gets one GEMM per batch.
    """
    _check(W_KN, bits, block_size)
    W, perm, U = _prepare(W_KN, H_KK, damp, act_order)
    K, N = W.shape
    G = math.ceil(K / block_size)
    if act_order:
        scale, zero = _static_params(W, bits, block_size, symmetric)  # original row order
        W = W[perm]
    else:
        scale = np.empty((G, N))
        zero = None if symmetric else np.empty((G, N))
    lazy = max(block_size, -(-lazy_rows // block_size) * block_size)
    codes = np.empty((K, N))  # in processing order
    for i1 in range(0, K, lazy):
        i2 = min(i1 + lazy, K)
        W1 = W[i1:i2]  # a view: updated in place
        E1 = np.empty((i2 - i1, N))  # scaled errors of the batch's rows
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = int(perm[i1 + i])
            g = row // block_size
            if not act_order and row % block_size == 0:
                s, z = block_params(W1[i : i + block_size], bits, symmetric)  # the whole block is in W1
                scale[g] = s
                if zero is not None:
                    zero[g] = z
            s, z = scale[g], (zero[g] if zero is not None else None)
            q = quantize_rows(W1[i], s, z, bits)
            codes[i1 + i] = q
            err = (W1[i] - dequantize_rows(q, s, z)) / U1[i, i]  # (N,)
            W1[i + 1 :] -= np.outer(U1[i, i + 1 :], err)
            E1[i] = err
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].T @ E1  # (K - i2, N)
    out = np.empty_like(codes)
    out[perm] = codes  # back to the original row order
    return _pack(out, scale, zero, bits, block_size)


def gptq_reference(
    W_KN: np.ndarray,
    H_KK: np.ndarray,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
) -> QuantizedWeight:
    """Unblocked GPTQ, one row at a time with immediate full updates (the test reference)."""
    _check(W_KN, bits, block_size)
    W, perm, U = _prepare(W_KN, H_KK, damp, act_order)
    K, N = W.shape
    if act_order:
        scale, zero = _static_params(W, bits, block_size, symmetric)
    else:
        G = math.ceil(K / block_size)
        scale, zero = np.empty((G, N)), (None if symmetric else np.empty((G, N)))
    Wp = W[perm]  # row i of Wp is row perm[i] of W
    pos = np.empty(K, dtype=int)
    pos[perm] = np.arange(K)  # processing position of each original row
    codes = np.empty((K, N))
    for i in range(K):
        row = int(perm[i])
        g = row // block_size
        if not act_order and row % block_size == 0:
            block_rows = [pos[r] for r in range(row, min(row + block_size, K))]
            scale[g], z = block_params(Wp[block_rows], bits, symmetric)
            if zero is not None:
                zero[g] = z
        z = zero[g] if zero is not None else None
        q = quantize_rows(Wp[i], scale[g], z, bits)
        codes[row] = q
        err = (Wp[i] - dequantize_rows(q, scale[g], z)) / U[i, i]
        for j in range(i + 1, K):
            Wp[j] -= U[i, j] * err
    return _pack(codes, scale, zero, bits, block_size)


def gptq_quantizer(
    hessians: Mapping[str, np.ndarray],
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
) -> Quantizer:
    """QuantizeWeightsPass's `quantizer` hook: GPTQ for each weight with a Hessian; None (the pass
    then rounds to nearest on the same grid) for the others, e.g. an embedding table no MatMul reads.

    act_order defaults to on here: on SmolLM2 int4 it is what makes GPTQ pay (see README).
    """

    def quantize(name: str, W_KN: np.ndarray) -> QuantizedWeight | None:
        H = hessians.get(name)
        if H is None:
            log.info("GPTQ: no Hessian for %s; round to nearest", name)
            return None
        return gptq_quantize(
            W_KN, H, bits=bits, block_size=block_size, symmetric=symmetric, damp=damp, act_order=act_order
        )

    return quantize
