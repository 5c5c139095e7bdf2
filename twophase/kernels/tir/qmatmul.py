"""Quantized (and float) weight MatMul for the TVM backend: Y[M, N] = X[M, K] @ W[K, N], float32 in and out.

    W[k, n] = (codes[k, n] - zero) * scale[k // bs, n] + offset[k // bs, n]     (offset optional)

zero is one constant code for the whole weight (8 for symmetric int4 stored as unsigned codes q + 8), so
a symmetric grid needs no offset array: the kernel subtracts zero * sum(x) per block.

bits 4: unsigned codes 0..15; bits 8: signed codes -128..127; bits 32: W itself (no scale, no offset).
bs (block_size) runs along K; G = ceil(K / bs); the last block may be partial; bs = None is one block
spanning K (per output channel).

Layout (what `pack` returns; N is padded to NT = ceil(N / TN) tiles of TN = 32 columns, the padding has
zero codes and zero scales, and the kernel never writes Y beyond N):
    bits 4:   codes [NT, K, TN / 2] uint8, row k of tile t as 16 bytes: byte j holds column t*TN + j in its low
              nibble and column t*TN + j + TN/2 in its high nibble
    bits 8:   codes [NT, K, TN] int8, row k of tile t as 32 bytes: byte j holds column t*TN + j
    bits 32:  W     [NT, K, TN] float32
    scale, offset:  [NT, G, TN] float32
  Quads (bits 4 and 8 where every block starts at a multiple of 4 rows, `QMatMulSpec.quads`): the rows of each
  quad 4q .. 4q+3 (q < K // 4) are interleaved, so that the quad's 4 * WK bytes (WK = 16 or 32 bytes a row)
  hold byte c of row 4q + r at 4c + r: each 4-byte word is one column's 4 codes (two columns' for bits 4, in
  the two nibbles), as integer dot products (vpdpbusd, vpmaddwd) take them, with no byte shuffle in the
  decode GEMV (qgemv_a8.py). The K % 4 rows after the last quad stay in row order. Unlike the int8-activation
  GEMV, this kernel's float paths pay a little for it (Zen 4, 2 threads, against the row-order layout: the
  GEMV for 2 rows from cache 0.91-0.95x with 4-bit codes, 1.0x with 8-bit; the GEMM at 128 rows 0.99-1.0x).

One PrimFunc, two paths chosen at run time on M:
    M <= GEMV_MAX_M (decode): tiles of TN columns in parallel; per row, float accumulators collect
        sum_k x[k] * code[k, :] over a block, then acc += block_sum * scale (+ offset * sum x). A quad is
        multiplied as it lies: 4 * TN lanes (column c, row r) at 4c + r times x[k .. k+3] repeated (one
        broadcast of 4 floats), and a column's 4 lanes are summed once per block; rows after the last quad
        (and codes without quads) go row by row. W is prefetched PREFETCH_BYTES ahead. Per 8 codes: one
        int->float convert and one FMA, the ceiling of a float-activation kernel on AVX2.
    M > GEMV_MAX_M (prefill, batched decode): tiles of TN columns in parallel; each tile's K x TN panel
        is dequantized once into a float32 scratch (workspace, K * TN * 4 bytes per thread; a quad is put
        back in row order first, one constant shuffle, `unquad`), then a
        register-tiled GEMM (MR = 6 rows x NR = 16 columns of accumulators, 12 ymm) runs over all rows;
        the M % MR leftover rows take one register tile of that many rows.
Vector widths are those of AVX2 (8 float32 lanes); build for e.g. Target({"kind": "llvm", "mcpu": "znver3"}).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twophase.kernels.tir.fusion import Fusion
from twophase.kernels.tir.fusion import entry as fusion_entry
from twophase.kernels.tir.script import fast_macros

TN = 32  # columns per N tile: the packed layout's tile and the unit of parallel work
MR = 6  # GEMM register tile rows (the leftover-row variants in _build assume 6)
NR = 16  # GEMM register tile columns (2 ymm)
PREFETCH_BYTES = 512  # GEMV software prefetch distance in W (about 2x when W streams from L3 / DRAM)
GEMV_MAX_M = 2  # rows up to which the GEMV path runs (above it, dequantizing a panel once pays off)


@dataclasses.dataclass(frozen=True)
class QMatMulSpec:
    bits: int  # 4, 8 or 32
    K: int
    N: int
    block_size: int | None  # None: one block spanning K (per channel); ignored for bits=32
    has_offset: bool = False
    zero: int = 0  # constant code subtracted before scaling (bits 4: 0..15; 8: -128..127)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 32):
            raise ValueError(f"QMatMulSpec.bits must be 4, 8 or 32, got {self.bits}")
        if self.K < 1 or self.N < 1:
            raise ValueError(f"QMatMulSpec needs K, N >= 1, got K={self.K} N={self.N}")
        if self.bits == 32 and self.has_offset:
            raise ValueError("bits=32 takes no offset")
        if self.zero and self.bits == 32:
            raise ValueError("bits=32 takes no zero")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {self.block_size}")

    @property
    def bs(self) -> int:
        """Rows of K per block (K when per channel or float)."""
        if self.bits == 32 or self.block_size is None:
            return self.K
        return min(self.block_size, self.K)

    @property
    def G(self) -> int:
        return -(-self.K // self.bs)

    @property
    def NT(self) -> int:
        return -(-self.N // TN)

    @property
    def quads(self) -> bool:
        """Whether the codes are quad-interleaved (module doc): 4 or 8 bits, every block at a multiple of 4 rows."""
        return self.bits != 32 and (self.G == 1 or self.bs % 4 == 0)


def quad_order(spec: QMatMulSpec, codes: np.ndarray) -> np.ndarray:
    """codes [NT, K, WK] in row order -> the quad-interleaved layout (module doc), for specs with `quads`."""
    return _transpose_quads(spec, codes, inverse=False)


def row_order(spec: QMatMulSpec, codes: np.ndarray) -> np.ndarray:
    """The inverse of `quad_order`."""
    return _transpose_quads(spec, codes, inverse=True)


def _transpose_quads(spec: QMatMulSpec, codes: np.ndarray, inverse: bool) -> np.ndarray:
    """Each quad's 4 x WK bytes transposed (WK x 4 when `inverse`); the rows after the last quad as they are."""
    if not spec.quads:
        return codes
    NT, K, WK = codes.shape
    KQ = K // 4
    shape = (NT, KQ, WK, 4) if inverse else (NT, KQ, 4, WK)
    out = codes.copy()
    out[:, : 4 * KQ] = codes[:, : 4 * KQ].reshape(shape).transpose(0, 1, 3, 2).reshape(NT, 4 * KQ, WK)
    return out


def param_specs(spec: QMatMulSpec) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each array `pack` returns, in prim_func's argument order after X."""
    K, NT, G = spec.K, spec.NT, spec.G
    if spec.bits == 32:
        return [((NT, K, TN), "float32")]
    codes = ((NT, K, TN // 2), "uint8") if spec.bits == 4 else ((NT, K, TN), "int8")
    out = [codes, ((NT, G, TN), "float32")]
    if spec.has_offset:
        out.append(((NT, G, TN), "float32"))
    return out


def _tile(a_RN: np.ndarray, NT: int, dtype) -> np.ndarray:
    """[R, N] -> [NT, R, TN], N zero-padded to NT * TN."""
    R, N = a_RN.shape
    padded = np.zeros((R, NT * TN), dtype)
    padded[:, :N] = a_RN
    return np.ascontiguousarray(padded.reshape(R, NT, TN).transpose(1, 0, 2))


def pack(
    spec: QMatMulSpec,
    codes_KN: np.ndarray,
    scale_GN: np.ndarray | None = None,
    offset_GN: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The kernel's parameter arrays (module doc for the layout); any N and K are accepted."""
    K, N, G, NT = spec.K, spec.N, spec.G, spec.NT
    if codes_KN.shape != (K, N):
        raise ValueError(f"codes shape {codes_KN.shape}, spec says ({K}, {N})")
    if spec.bits == 32:
        return [_tile(np.asarray(codes_KN, np.float32), NT, np.float32)]
    if scale_GN is None or scale_GN.shape != (G, N):
        raise ValueError(f"scale must be ({G}, {N}) for K={K} block_size={spec.block_size}")
    if spec.has_offset != (offset_GN is not None):
        raise ValueError(
            f"spec.has_offset={spec.has_offset} but offset is {'missing' if offset_GN is None else 'given'}"
        )
    if spec.bits == 4:
        c = np.asarray(codes_KN)
        if c.min(initial=0) < 0 or c.max(initial=0) > 15:
            raise ValueError("4-bit codes must be in 0..15")
        t = _tile(c.astype(np.uint8), NT, np.uint8)  # [NT, K, TN]
        codes = quad_order(spec, np.ascontiguousarray(t[:, :, : TN // 2] | (t[:, :, TN // 2 :] << 4)))
    else:
        c = np.asarray(codes_KN)
        if c.min(initial=0) < -128 or c.max(initial=0) > 127:
            raise ValueError("8-bit codes must be in -128..127")
        codes = quad_order(spec, _tile(c.astype(np.int8), NT, np.int8))
    out = [codes, _tile(np.asarray(scale_GN, np.float32), NT, np.float32)]
    if offset_GN is not None:
        if offset_GN.shape != (G, N):
            raise ValueError(f"offset must be ({G}, {N})")
        out.append(_tile(np.asarray(offset_GN, np.float32), NT, np.float32))
    return out


def reference(
    spec: QMatMulSpec,
    X: np.ndarray,
    codes_KN: np.ndarray,
    scale_GN: np.ndarray | None = None,
    offset_GN: np.ndarray | None = None,
) -> np.ndarray:
    """NumPy reference: dequantize to float64, accumulate in float64, return float32 [M, N]."""
    W = np.asarray(codes_KN, np.float64) - spec.zero
    if spec.bits != 32:
        rows = np.arange(spec.K) // spec.bs
        W = W * np.asarray(scale_GN, np.float64)[rows]
        if offset_GN is not None:
            W = W + np.asarray(offset_GN, np.float64)[rows]
    return (np.asarray(X, np.float64) @ W).astype(np.float32)


@fast_macros
def prim_func(spec: QMatMulSpec, name: str | None = None, fusion: Fusion = Fusion(), rank: int = 2):
    """The scheduled kernel: args X [M, K], *pack(spec) arrays, Y [M, N] (M a symbolic int64, any M >= 1);
    with a `fusion` (kernels/tir/fusion.py), its gamma before the arrays and its residual R [M, N] before Y.
    rank=3: X, R, Y are [B, T, .] instead (M = B * T)."""
    return _build(spec, fusion=fusion, rank=rank).with_attr("global_symbol", name or default_name(spec, fusion))


def default_name(spec: QMatMulSpec, fusion: Fusion = Fusion()) -> str:
    q = f"b{spec.bits}" + ("" if spec.bits == 32 else f"_bs{spec.bs}") + ("_off" if spec.has_offset else "")
    q += f"_z{spec.zero}" if spec.zero else ""
    return f"qmatmul_{q}_k{spec.K}_n{spec.N}{fusion.tag}".replace("-", "m")


def gemm_macro(spec: QMatMulSpec):
    """The float GEMM path as a TVMScript macro `gemm(X, W, S, O, Y, M)` (O = S when there is no offset), for
    kernels that branch on M themselves and read this module's packed layout (qgemv_a8.py)."""
    return _build(spec, macro="gemm")


def _build(spec: QMatMulSpec, macro: str | None = None, fusion: Fusion = Fusion(), rank: int = 2):
    """TVMScript of the kernel; Python-level `if`s below are resolved at parse time (one variant per spec).
    `macro`: return that path's macro (gemv, gemm, or body = either by M) instead of the PrimFunc."""
    from tvm.script import tirx as T

    K, N, NT, G, bs, bits = spec.K, spec.N, spec.NT, spec.G, spec.bs, spec.bits
    quant, has_offset, zero = bits != 32, spec.has_offset, spec.zero
    sums = has_offset or zero != 0  # the block needs sum(x)
    H = TN // 2
    GF, KT = K // bs, K % bs  # full blocks, rows of the partial last block
    NTF, NTAIL = N // TN, N % TN  # full tiles, columns of the ragged last tile
    wdtype = {4: "uint8", 8: "int8", 32: "float32"}[bits]
    WK = TN // 2 if bits == 4 else TN
    PREFETCH = max(1, PREFETCH_BYTES // (WK * max(1, bits // 8)))  # rows of W the GEMV prefetches ahead

    def lo(v):  # 4-bit code in the low nibble (lanes 0..H-1) as float
        return T.Cast("float32", T.bitwise_and(T.Cast("int32", v), 15))

    def hi(v):  # 4-bit code in the high nibble (lanes H..TN-1) as float
        return T.Cast("float32", T.shift_right(T.Cast("int32", v), 4))

    def c8(v):
        return T.Cast("float32", T.Cast("int32", v))

    def lo_z(v):  # the panel's dequantized value: (code - zero)
        return T.Cast("float32", T.bitwise_and(T.Cast("int32", v), 15) - zero)

    def hi_z(v):
        return T.Cast("float32", T.shift_right(T.Cast("int32", v), 4) - zero)

    def c8_z(v):
        return T.Cast("float32", T.Cast("int32", v) - zero)

    QUADS = spec.quads
    QB = 4 * WK  # bytes of a quad
    QL = 2 * TN  # float GEMV lanes per half tile of a quad: 16 columns x 4 rows
    LANES = [[4 * c + r for c in range(QL // 4)] for r in range(4)]  # lanes of row r, by column
    UNQUAD = [4 * c + r for r in range(4) for c in range(WK)]  # row-order byte r * WK + c <- quad byte 4c + r

    def quad_byte(src, t, k, r, j):  # code byte j of row r of the quad `src` (unquadded)
        return src[r * WK + j]

    def w_byte(src, t, k, r, j):  # code byte j of row k + r of tile t, straight from W
        return src[t, k + r, j]

    def x_quad(X, m, k, lanes):  # x[k .. k+3] repeated over `lanes` lanes (a Shuffle of lanes / 4 copies)
        return T.Shuffle([X.vload([m, k], "float32x4")] * (lanes // 4), list(range(lanes)))

    def w_words(W, t, k):  # the 16 code bytes of row k of tile t, widened to int32
        return T.Cast("int32x16", W.vload([t, k, 0], "uint8x16"))

    def row_lanes(bq, h, r):  # the lanes 4c + r of half h of a quad's float GEMV accumulators: row r, by column
        return T.Shuffle([bq[T.ramp(h * QL, 1, QL)]], LANES[r])

    @T.macro
    def prefetch(W, t, k):  # a hint only: an address past the end of W is harmless
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(W[t, k, 0]), 0, 3, 1))

    @T.macro
    def unquad(W, nat, t, k):  # nat[r * WK + c] = byte c of row k + r: the quad at row k in row order
        nat[T.ramp(0, 1, QB)] = T.Shuffle([W.vload([t, k, 0], f"{wdtype}x{QB}")], UNQUAD)

    @T.macro
    def gemv_row(X, W, bacc, xs, m, t, k):
        # bacc[:] += x[k] * code[k, :] for a row of W in row order
        if bits == 4:
            for j in T.vectorized(H):
                bacc[j] = bacc[j] + X[m, k] * lo(W[t, k, j])
            for j in T.vectorized(H):
                bacc[j + H] = bacc[j + H] + X[m, k] * hi(W[t, k, j])
        else:
            for j in T.vectorized(TN):
                bacc[j] = bacc[j] + X[m, k] * c8(W[t, k, j])
        if sums:
            xs[0] = xs[0] + X[m, k]

    @T.macro
    def gemv_quad(X, W, bq, xs, m, t, k):
        # bq[h * QL + 4c + r] += x[k + r] * code[k + r, 16h + c]: the quad's codes as they lie, times x[k .. k+3]
        # repeated (one broadcast of 4 floats), so no shuffle per quad; `gemv_block` sums the 4 lanes of a column
        if bits == 4:  # 16 bytes (a row of W: 4 columns' quads) at a time, widened before the nibbles are cut
            for i in T.unroll(4):
                bq[T.ramp(16 * i, 1, 16)] = bq[T.ramp(16 * i, 1, 16)] + x_quad(X, m, k, 16) * T.Cast(
                    "float32x16", T.bitwise_and(w_words(W, t, k + i), T.broadcast(15, 16)))
                bq[T.ramp(QL + 16 * i, 1, 16)] = bq[T.ramp(QL + 16 * i, 1, 16)] + x_quad(X, m, k, 16) * T.Cast(
                    "float32x16", T.shift_right(w_words(W, t, k + i), T.broadcast(4, 16)))
        else:
            bq[T.ramp(0, 1, QL)] = bq[T.ramp(0, 1, QL)] + x_quad(X, m, k, QL) * T.Cast(
                f"float32x{QL}", W.vload([t, k, 0], f"int8x{QL}"))
            bq[T.ramp(QL, 1, QL)] = bq[T.ramp(QL, 1, QL)] + x_quad(X, m, k, QL) * T.Cast(
                f"float32x{QL}", W.vload([t, k + 2, 0], f"int8x{QL}"))
        if sums:
            xs[0] = xs[0] + (X[m, k] + X[m, k + 1]) + (X[m, k + 2] + X[m, k + 3])

    @T.macro
    def gemv_block(X, W, S, O, acc, bacc, bq, xs, m, t, g, k0, L):
        # acc[:] += scale[g] * sum_{k in block} x[k] * code[k, :]  (+ offset[g] * sum x)
        for j in T.vectorized(TN):
            bacc[j] = T.float32(0)
        if sums:
            xs[0] = T.float32(0)
        if QUADS:
            bq[T.ramp(0, 1, 2 * QL)] = T.broadcast(T.float32(0), 2 * QL)
            for q in range(L // 4):
                prefetch(W, t, k0 + 4 * q + PREFETCH)
                gemv_quad(X, W, bq, xs, m, t, k0 + 4 * q)
            for h in T.unroll(2):  # lane 4c + r of half h: column 16h + c, row r: sum over r
                bacc[T.ramp(h * QL // 4, 1, QL // 4)] = (row_lanes(bq, h, 0) + row_lanes(bq, h, 1)) + (
                    row_lanes(bq, h, 2) + row_lanes(bq, h, 3))
            for i in range(L % 4):  # rows after the last quad (module doc)
                gemv_row(X, W, bacc, xs, m, t, k0 + L // 4 * 4 + i)
        else:
            for kk in range(L):
                prefetch(W, t, k0 + kk + PREFETCH)
                gemv_row(X, W, bacc, xs, m, t, k0 + kk)
        for j in T.vectorized(TN):
            if has_offset and zero != 0:
                acc[j] = acc[j] + (bacc[j] - T.float32(zero) * xs[0]) * S[t, g, j] + xs[0] * O[t, g, j]
            elif has_offset:
                acc[j] = acc[j] + bacc[j] * S[t, g, j] + xs[0] * O[t, g, j]
            elif zero != 0:
                acc[j] = acc[j] + (bacc[j] - T.float32(zero) * xs[0]) * S[t, g, j]
            else:
                acc[j] = acc[j] + bacc[j] * S[t, g, j]

    @T.macro
    def store_row(Y, acc, m, t):
        if NTAIL == 0:
            for j in T.vectorized(TN):
                Y[m, t * TN + j] = acc[j]
        else:
            if t < NTF:
                for j in T.vectorized(TN):
                    Y[m, t * TN + j] = acc[j]
            else:
                for j in range(NTAIL):
                    Y[m, t * TN + j] = acc[j]

    @T.macro
    def gemv(X, W, S, O, Y, M):
        for t in T.parallel(NT):
            for m in range(M):
                acc = T.alloc_buffer((TN,), "float32", scope="global")
                bacc = T.alloc_buffer((TN,), "float32", scope="global")
                xs = T.alloc_buffer((1,), "float32", scope="global")
                bq = T.alloc_buffer((2 * QL,), "float32", scope="global")
                for j in T.vectorized(TN):
                    acc[j] = T.float32(0)
                if quant:
                    for g in range(GF):
                        gemv_block(X, W, S, O, acc, bacc, bq, xs, m, t, g, g * bs, bs)
                    if KT > 0:
                        gemv_block(X, W, S, O, acc, bacc, bq, xs, m, t, GF, GF * bs, KT)
                else:
                    for k in range(K):
                        for j in T.vectorized(TN):
                            acc[j] = acc[j] + X[m, k] * W[t, k, j]
                store_row(Y, acc, m, t)

    @T.macro
    def panel_rows(S, O, P, src, byte, t, g, k, n):
        # P[k + r, :] = dequantized code[k + r, :] for the n rows r of `src` (byte(src, t, k, r, j): their codes)
        for r in T.unroll(n):
            if bits == 4:
                for j in T.vectorized(H):
                    if has_offset:
                        P[k + r, j] = lo_z(byte(src, t, k, r, j)) * S[t, g, j] + O[t, g, j]
                    else:
                        P[k + r, j] = lo_z(byte(src, t, k, r, j)) * S[t, g, j]
                for j in T.vectorized(H):
                    if has_offset:
                        P[k + r, j + H] = hi_z(byte(src, t, k, r, j)) * S[t, g, j + H] + O[t, g, j + H]
                    else:
                        P[k + r, j + H] = hi_z(byte(src, t, k, r, j)) * S[t, g, j + H]
            else:
                for j in T.vectorized(TN):
                    if has_offset:
                        P[k + r, j] = c8_z(byte(src, t, k, r, j)) * S[t, g, j] + O[t, g, j]
                    else:
                        P[k + r, j] = c8_z(byte(src, t, k, r, j)) * S[t, g, j]

    @T.macro
    def dequant_rows(W, S, O, P, nat, t, g, k0, L):
        if QUADS:
            for q in range(L // 4):
                unquad(W, nat, t, k0 + 4 * q)
                panel_rows(S, O, P, nat, quad_byte, t, g, k0 + 4 * q, 4)
            for i in range(L % 4):
                panel_rows(S, O, P, W, w_byte, t, g, k0 + L // 4 * 4 + i, 1)
        else:
            for kk in range(L):
                panel_rows(S, O, P, W, w_byte, t, g, k0 + kk, 1)

    @T.macro
    def micro(X, W, P, Y, t, m0, s, R):
        # Y[m0:m0+R, t*TN + s*NR : +NR] = X[m0:m0+R, :] @ panel[:, s*NR : +NR], R x NR accumulators in registers
        c = T.alloc_buffer((R, NR), "float32", scope="global")
        for r in T.unroll(R):
            for j in T.vectorized(NR):
                c[r, j] = T.float32(0)
        for k in range(K):
            for r in T.unroll(R):
                for j in T.vectorized(NR):
                    if quant:
                        c[r, j] = c[r, j] + X[m0 + r, k] * P[k, s * NR + j]
                    else:
                        c[r, j] = c[r, j] + X[m0 + r, k] * W[t, k, s * NR + j]
        if NTAIL == 0:
            for r in T.unroll(R):
                for j in T.vectorized(NR):
                    Y[m0 + r, t * TN + s * NR + j] = c[r, j]
        else:
            if t < NTF:
                for r in T.unroll(R):
                    for j in T.vectorized(NR):
                        Y[m0 + r, t * TN + s * NR + j] = c[r, j]
            else:
                if NTAIL - s * NR >= NR:
                    for r in T.unroll(R):
                        for j in T.vectorized(NR):
                            Y[m0 + r, t * TN + s * NR + j] = c[r, j]
                elif NTAIL - s * NR > 0:
                    for r in T.unroll(R):
                        for j in range(NTAIL - s * NR):
                            Y[m0 + r, t * TN + s * NR + j] = c[r, j]

    @T.macro
    def gemm_tail(X, W, P, Y, t, M, r):
        if M % MR == r:
            for s in T.unroll(TN // NR):
                micro(X, W, P, Y, t, M // MR * MR, s, r)

    @T.macro
    def gemm_rows(X, W, P, Y, t, M):
        for mb in range(M // MR):
            for s in T.unroll(TN // NR):
                micro(X, W, P, Y, t, mb * MR, s, MR)
        # leftover rows: one register tile of M % MR rows (MR = 6: five static variants)
        gemm_tail(X, W, P, Y, t, M, 1)
        gemm_tail(X, W, P, Y, t, M, 2)
        gemm_tail(X, W, P, Y, t, M, 3)
        gemm_tail(X, W, P, Y, t, M, 4)
        gemm_tail(X, W, P, Y, t, M, 5)

    @T.macro
    def gemm(X, W, S, O, Y, M):
        for t in T.parallel(NT):
            if quant:
                P = T.alloc_buffer((K, TN), "float32", scope="global")
                nat = T.alloc_buffer((QB,), wdtype, scope="global")
                for g in range(GF):
                    dequant_rows(W, S, O, P, nat, t, g, g * bs, bs)
                if KT > 0:
                    dequant_rows(W, S, O, P, nat, t, GF, GF * bs, KT)
                gemm_rows(X, W, P, Y, t, M)
            else:
                gemm_rows(X, W, W, Y, t, M)

    @T.macro
    def body(X, W, S, O, Y, M):
        if M <= GEMV_MAX_M:
            gemv(X, W, S, O, Y, M)
        else:
            gemm(X, W, S, O, Y, M)

    if macro is not None:
        return {"gemv": gemv, "gemm": gemm, "body": body}[macro]
    return fusion_entry(body, K=K, N=N, NT=NT, G=G, WK=WK, wdtype=wdtype, TN=TN, quant=quant, has_offset=has_offset,
                        fusion=fusion, rank=rank)
