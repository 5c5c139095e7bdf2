"""W8A8 MatMul for the TVM backend: Y[M, N] = dequant(quant(X[M, K])) @ dequant(Wq[K, N]), float32 in and out.

    x codes  q_x[m, k] = saturate_int8(round_half_even(X[m, k] / s_x[m]))      (ONNX QuantizeLinear, zp 0)
             s_x[m]    = max(absmax(X[m, :]) * float32(1/127), SCALE_EPS)       (DYNAMIC, per row)
             s_x[m]    = s                                                      (STATIC, one given scale)
    Y[m, n]  = float(sum_k q_x[m, k] * Wq[k, n]) * s_x[m] * s_w[n]              (int32 accumulation, exact)

This is what QuantizeActivationsPass's QDQ graph computes, with the products summed exactly in integers
instead of in float (the only difference: float rounding of the QDQ MatMul's sum).

Layout (what `pack` returns; KQ = ceil(K / 4) quads of rows, N padded to NT = ceil(N / TN) tiles of TN = 32
columns; the padding holds zero codes and zero scales, the kernel never writes Y beyond N):
    codes  [NT, KQ, TN, 4] int8: codes[t, q, j, i] = Wq[4q + i, t*TN + j]   (64 bytes = 16 columns x 4 rows)
    scale  [NT, TN] float32
Static mode takes its activation scale as one more argument, float32 [1].

The kernel, per call:
    1. quantize X row by row (rows in parallel) into a scratch of 32-bit words and the row scales;
    2. tiles of TN columns in parallel, a register-tiled integer GEMM over all rows (MR rows x 2 vectors
       of VL int32 lanes of accumulators): per word w and row r, one broadcast activation word against
       one vector of weight words per VL columns, through `isa`'s dot product:
           avx512_vnni  vpdpbusd zmm (u8 x s8, 4 products per int32 lane): activation words hold 4 codes
                        + 128 as u8, weight words are the packed quads as they are; the result is
                        corrected by 128 * sum_k Wq[k, n], summed per tile once per call
           avx512       vpmaddwd zmm + vpaddd (int16 pairs, 2 products per lane)
           avx2         vpmaddwd ymm + vpaddd
           generic      plain int32 multiply-adds of the unpacked int16 halves (any LLVM target)
       the int16-pair variants first sign-extend the tile's codes once into an int32 [KP, TN] panel
       (word (p, j) = Wq[2p, j] | Wq[2p + 1, j] << 16) and pack activations as pairs of int16.
       Pair sums are at most 2 * 128 * 128, u8 x s8 quad sums 4 * 255 * 128, and accumulators at most
       K * 255 * 128 < 2**31 for K <= 65536: nothing saturates, every variant gives the same integers,
       converted to float once.
`isa` follows the build target's features (`isa_for_target`); every choice is exact on its ISA.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from twophase.kernels.tir.script import fast_macros

TN = 32  # columns per N tile: the packed layout's tile and the unit of parallel work
SCALE_EPS = 1e-10  # smallest per-row scale (QuantizeActivationsPass.SCALE_EPS)
INV127 = np.float32(1.0 / 127.0)  # the QDQ graph's constant, rounded to float32 as there


class ActQuant(enum.Enum):
    DYNAMIC = "dynamic"  # per-row scales computed in the kernel
    STATIC = "static"  # one per-tensor scale given as an argument


class Isa(enum.Enum):
    """Which int16 pair dot product the micro-kernel uses (register tile: rows MR x vectors of VL lanes)."""

    AVX512_VNNI = "avx512_vnni"
    AVX512 = "avx512"
    AVX2 = "avx2"
    GENERIC = "generic"


# isa -> (VL int32 lanes per vector, NR columns per register tile, MR rows per register tile)
_TILES = {  # MR <= 8: gemm() has leftover-row variants for 1..7
    Isa.AVX512_VNNI: (16, 32, 8),  # 16 zmm accumulators
    Isa.AVX512: (16, 32, 8),
    Isa.AVX2: (8, 16, 6),  # 12 ymm accumulators, two register tiles per TN
    Isa.GENERIC: (8, 16, 6),
}


def isa_for_target(target) -> Isa:
    """The fastest exact ISA variant the LLVM target (a Target or its dict) has."""
    import tvm
    from tvm.target.codegen import target_has_features

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if str(t.kind.name) != "llvm" or "x86" not in str(t.attrs.get("mtriple", "x86_64")):
        return Isa.GENERIC
    if target_has_features(["avx512bw", "avx512vnni"], t):
        return Isa.AVX512_VNNI
    if target_has_features("avx512bw", t):
        return Isa.AVX512
    if target_has_features("avx2", t):
        return Isa.AVX2
    return Isa.GENERIC


@dataclasses.dataclass(frozen=True)
class QMatMulA8Spec:
    K: int
    N: int
    act: ActQuant = ActQuant.DYNAMIC

    def __post_init__(self) -> None:
        if self.K < 1 or self.N < 1:
            raise ValueError(f"QMatMulA8Spec needs K, N >= 1, got K={self.K} N={self.N}")
        if self.K > 1 << 16:
            raise ValueError(f"K={self.K}: int32 accumulators hold K <= 65536 products of int8 codes")
        if not isinstance(self.act, ActQuant):
            raise TypeError(f"act must be an ActQuant, got {self.act!r}")

    @property
    def KQ(self) -> int:
        return -(-self.K // 4)

    @property
    def NT(self) -> int:
        return -(-self.N // TN)


def param_specs(spec: QMatMulA8Spec) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each array `pack` returns, in prim_func's argument order after X."""
    return [((spec.NT, spec.KQ, TN, 4), "int8"), ((spec.NT, TN), "float32")]


def pack(spec: QMatMulA8Spec, codes_KN: np.ndarray, scale_N: np.ndarray) -> list[np.ndarray]:
    """The kernel's weight arrays (module doc for the layout): int8 codes [K, N], per-column scales [N]."""
    K, N, KQ, NT = spec.K, spec.N, spec.KQ, spec.NT
    codes_KN = np.asarray(codes_KN)
    if codes_KN.shape != (K, N) or codes_KN.dtype != np.int8:
        raise ValueError(f"codes must be int8 ({K}, {N}), got {codes_KN.dtype} {codes_KN.shape}")
    scale_N = np.asarray(scale_N, np.float32).reshape(-1)
    if scale_N.shape != (N,):
        raise ValueError(f"scale must have {N} entries, got {scale_N.shape}")
    padded = np.zeros((4 * KQ, NT * TN), np.int8)
    padded[:K, :N] = codes_KN
    codes = padded.reshape(KQ, 4, NT, TN).transpose(2, 0, 3, 1)  # [NT, KQ, TN, 4]
    scale = np.zeros(NT * TN, np.float32)
    scale[:N] = scale_N
    return [np.ascontiguousarray(codes), scale.reshape(NT, TN)]


def quantize_rows(spec: QMatMulA8Spec, X: np.ndarray, static_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of step 1: (codes int8 [M, K], scales float32 [M]), float32 math as the kernel and ORT."""
    X = np.asarray(X, np.float32)
    if spec.act is ActQuant.DYNAMIC:
        s = np.maximum(np.abs(X).max(axis=1) * INV127, np.float32(SCALE_EPS)).astype(np.float32)
    else:
        s = np.full(X.shape[0], np.float32(static_scale), np.float32)
    q = np.clip(np.rint(X / s[:, None]), -128, 127).astype(np.int8)
    return q, s


def reference(spec: QMatMulA8Spec, X: np.ndarray, codes_KN: np.ndarray, scale_N: np.ndarray,
              static_scale: float | None = None) -> np.ndarray:
    """NumPy reference: exact integer products, scaled in float64, returned as float32 [M, N]."""
    q, s = quantize_rows(spec, X, static_scale)
    acc = q.astype(np.int64) @ np.asarray(codes_KN, np.int64)
    return (acc * s[:, None].astype(np.float64) * np.asarray(scale_N, np.float64)[None, :]).astype(np.float32)


@fast_macros
def prim_func(spec: QMatMulA8Spec, name: str | None = None, isa: Isa = Isa.GENERIC):
    """The scheduled kernel: args X [M, K], *pack(spec), [static scale [1]], Y [M, N] (M a symbolic int64)."""
    name = name or default_name(spec, isa)
    func = _build(spec, isa)
    return func.with_attrs({"global_symbol": name, "tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})


def default_name(spec: QMatMulA8Spec, isa: Isa) -> str:
    return f"qmatmul_a8_{spec.act.value}_k{spec.K}_n{spec.N}_{isa.value}"


def _build(spec: QMatMulA8Spec, isa: Isa):
    """TVMScript of the kernel; Python-level `if`s below are resolved at parse time (one variant per spec)."""
    from tvm.script import tirx as T

    K, N, KQ, NT = spec.K, spec.N, spec.KQ, spec.NT
    dynamic = spec.act is ActQuant.DYNAMIC
    vnni = isa is Isa.AVX512_VNNI
    VL, NR, MR = _TILES[isa]
    assert NR == 2 * VL  # micro() holds two accumulator vectors per row
    NTF, NTAIL = N // TN, N % TN
    CW = 4 if vnni else 2  # codes per 32-bit word
    KW = -(-K // CW)  # words per row
    KWF = K // CW  # full words (a partial last word is zero-padded)
    U8 = 128 if vnni else 0  # activation code offset (u8 for vpdpbusd)
    MASK = 0xFF if vnni else 0xFFFF
    AL = 16  # lanes of the vectorized absmax
    i32v = f"int32x{VL}"

    def dot(acc, x_word, w_words):
        # acc + per-lane dot product of the words' int8 quads / int16 pairs (x_word broadcast to all lanes)
        xb = T.broadcast(x_word, VL)
        if vnni:
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                           acc, T.reinterpret(xb, dtype="int8x64"),
                                           T.reinterpret(w_words, dtype="int8x64"), dtype=i32v)
        i16v = f"int16x{2 * VL}"
        if isa is Isa.AVX512 or isa is Isa.AVX2:
            intrin = "llvm.x86.avx512.pmaddw.d.512" if isa is Isa.AVX512 else "llvm.x86.avx2.pmadd.wd"
            return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(intrin), T.reinterpret(xb, dtype=i16v),
                                                 T.reinterpret(w_words, dtype=i16v), dtype=i32v)
        lo = T.shift_right(T.shift_left(xb, 16), 16)
        hi = T.shift_right(xb, 16)
        return acc + lo * T.shift_right(T.shift_left(w_words, 16), 16) + hi * T.shift_right(w_words, 16)

    def code(v, s):  # ONNX QuantizeLinear to int8 (zero point 0) as int32, plus the u8 offset, masked to a field
        q = T.Cast("int32", T.nearbyint(T.max(T.min(v / s, T.float32(127)), T.float32(-128))))
        return T.bitwise_and(q + U8, MASK)

    def word(X, m, w, n, s):  # the first n codes of word w of row m, packed little-endian
        out = code(X[m, w * CW], s)
        for i in range(1, n):
            out = T.bitwise_or(out, T.shift_left(code(X[m, w * CW + i], s), 8 * (4 // CW) * i))
        return out

    def weights(W, P, t, p, col):  # VL weight words of columns col .. col+VL-1, word p
        if vnni:
            return T.reinterpret(W.vload([t, p, col, 0], "int8x64"), dtype=i32v)
        return P[p, T.ramp(col, 1, VL)]

    @T.macro
    def quantize(X, Sx_in, Xq, Sx, M):
        for m in T.parallel(M):
            if dynamic:
                amx = T.alloc_buffer((AL,), "float32", scope="global")
                for j in T.vectorized(AL):
                    amx[j] = T.float32(0)
                for kb in range(K // AL):
                    for j in T.vectorized(AL):
                        amx[j] = T.max(amx[j], T.fabs(X[m, kb * AL + j]))
                for j in range(K % AL):
                    amx[0] = T.max(amx[0], T.fabs(X[m, K // AL * AL + j]))
                for j in range(AL - 1):
                    amx[0] = T.max(amx[0], amx[j + 1])
                Sx[m] = T.max(amx[0] * T.float32(INV127), T.float32(SCALE_EPS))
            else:
                Sx[m] = Sx_in[0]
            if KWF > 0:
                for w in T.vectorized(KWF):
                    Xq[m, w] = word(X, m, w, CW, Sx[m])
            if KW > KWF:
                Xq[m, KWF] = word(X, m, KWF, K % CW, Sx[m])

    @T.macro
    def store(Y, c, corr, Sx, Sw, t, m0, s, v, R):
        # columns t*TN + s*NR + v*VL + [0, VL) of rows m0 .. m0+R-1 (N tail: only those below N)
        col = s * NR + v * VL
        if NTAIL == 0 or NTAIL - col >= VL or t < NTF:
            for r in T.unroll(R):
                for j in T.vectorized(VL):
                    Y[m0 + r, t * TN + col + j] = (T.Cast("float32", c[r, j] - corr[col + j])
                                                   * Sx[m0 + r] * Sw[t, col + j])
        elif NTAIL - col > 0:
            for r in T.unroll(R):
                for j in range(NTAIL - col):
                    Y[m0 + r, t * TN + col + j] = (T.Cast("float32", c[r, j] - corr[col + j])
                                                   * Sx[m0 + r] * Sw[t, col + j])

    @T.macro
    def micro(Xq, W, P, corr, Sx, Sw, Y, t, m0, s, R):
        # Y[m0:m0+R, t*TN + s*NR : +NR] from R x 2 accumulator vectors kept in registers. One buffer per
        # vector column: each stays under TVM's 1 KiB stack-allocation limit, so LLVM promotes it.
        c0 = T.alloc_buffer((R, VL), "int32", scope="global")
        c1 = T.alloc_buffer((R, VL), "int32", scope="global")
        for r in T.unroll(R):
            c0[r, T.ramp(0, 1, VL)] = T.broadcast(T.int32(0), VL)
            c1[r, T.ramp(0, 1, VL)] = T.broadcast(T.int32(0), VL)
        for p in range(KW):
            for r in T.unroll(R):
                c0[r, T.ramp(0, 1, VL)] = dot(c0[r, T.ramp(0, 1, VL)], Xq[m0 + r, p], weights(W, P, t, p, s * NR))
                c1[r, T.ramp(0, 1, VL)] = dot(c1[r, T.ramp(0, 1, VL)], Xq[m0 + r, p],
                                              weights(W, P, t, p, s * NR + VL))
        store(Y, c0, corr, Sx, Sw, t, m0, s, 0, R)
        store(Y, c1, corr, Sx, Sw, t, m0, s, 1, R)

    @T.macro
    def gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, r):
        if r < MR and M % MR == r:
            for s in T.unroll(TN // NR):
                micro(Xq, W, P, corr, Sx, Sw, Y, t, M // MR * MR, s, r)

    @T.macro
    def gemm(W, Sw, Xq, Sx, Y, M):
        for t in T.parallel(NT):
            corr = T.alloc_buffer((TN,), "int32", scope="global")
            for j in T.vectorized(TN):
                corr[j] = 0
            P = T.alloc_buffer((1 if vnni else KW, TN), "int32", scope="global")
            if vnni:  # u8 codes are q + 128: take 128 * sum_k Wq[k, j] back out
                for q in range(KQ):
                    for i in T.unroll(4):
                        for j in T.vectorized(TN):
                            corr[j] = corr[j] + T.Cast("int32", W[t, q, j, i]) * U8
            else:  # int16 pair words of the tile's codes
                for p in range(KW):
                    for j in T.vectorized(TN):
                        P[p, j] = T.bitwise_or(
                            T.bitwise_and(T.Cast("int32", W[t, p // 2, j, p % 2 * 2]), 0xFFFF),
                            T.shift_left(T.Cast("int32", W[t, p // 2, j, p % 2 * 2 + 1]), 16))
            for mb in range(M // MR):
                for s in T.unroll(TN // NR):
                    micro(Xq, W, P, corr, Sx, Sw, Y, t, mb * MR, s, MR)
            # leftover rows: one register tile of M % MR rows (one static variant per count)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 1)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 2)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 3)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 4)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 5)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 6)
            gemm_tail(Xq, W, P, corr, Sx, Sw, Y, t, M, 7)

    @T.macro
    def body(X, W, Sw, Sx_in, Y, M):
        Xq = T.alloc_buffer((M, KW), "int32", scope="global")
        Sx = T.alloc_buffer((M,), "float32", scope="global")
        quantize(X, Sx_in, Xq, Sx, M)
        gemm(W, Sw, Xq, Sx, Y, M)

    if dynamic:

        @T.prim_func
        def qmatmul_a8(
            x_handle: T.handle,
            W: T.Buffer((NT, KQ, TN, 4), "int8"),
            Sw: T.Buffer((NT, TN), "float32"),
            y_handle: T.handle,
        ):
            M = T.int64()
            X = T.match_buffer(x_handle, (M, K), "float32")
            Y = T.match_buffer(y_handle, (M, N), "float32")
            body(X, W, Sw, Sw, Y, M)

    else:

        @T.prim_func
        def qmatmul_a8(
            x_handle: T.handle,
            W: T.Buffer((NT, KQ, TN, 4), "int8"),
            Sw: T.Buffer((NT, TN), "float32"),
            Sx_in: T.Buffer((1,), "float32"),
            y_handle: T.handle,
        ):
            M = T.int64()
            X = T.match_buffer(x_handle, (M, K), "float32")
            Y = T.match_buffer(y_handle, (M, N), "float32")
            body(X, W, Sw, Sx_in, Y, M)

    return qmatmul_a8
