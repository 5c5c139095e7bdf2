"""Decode GEMV with int8 activations for the TVM backend (the counterpart of ORT MatMulNBits accuracy_level 4):
Y[M, N] = quant(X[M, K]) @ W[K, N] for a few rows, W in qmatmul.py's packed 4-bit / 8-bit layout.

    W[k, n]   = (codes[k, n] - zero) * s_w[k // bs, n] + o[k // bs, n]          (qmatmul.py's grid)
    x blocks  of XB rows of K: XB = bs for blocked weights with bs <= 256, else XB_CHANNEL (32), which nests
              in every weight block; the last block may be partial
    s_x[m, b] = absmax(X[m, block b]) / 127;  q_x[m, k] = round_half_even(X[m, k] * (1 / s_x[m, b]))   (0 if s_x = 0)
    Y[m, n]   = sum_b  s_x[m, b] * s_w[g, n] * (sum_{k in b} q_x[m, k] * codes[k, n] - zero * xs[m, b])
                     + s_x[m, b] * xs[m, b] * o[g, n],          xs[m, b] = sum_{k in b} q_x[m, k],  g = b XB // bs

so Y is exactly the product of the dequantized int8 activations with the dequantized weights; the offset
term uses the quantized block sum (as MLAS does with its zero points), not the float sum of x: with the float
sum, the error of the codes' part (|d * c|, large for GGUF Q4_1 whose minimum m nearly cancels it) is no longer
cancelled by the offset's (SmolLM2 decode, GGUF grid, level 4: +1.78% perplexity vs fp32 instead of +0.57%). The
integer dot products are exact on every ISA (int32, no saturation); only the per-block float scaling rounds.

Weights: the arrays of `qmatmul.pack` (one copy, shared with qmatmul's float GEMM, which this kernel runs for
M > MAX_M), whose quad-interleaved codes are "quad words" as they lie: per quad of 4 rows of K and tile of
TN = 32 columns the kernel loads 64 (4-bit) or 128 bytes (8-bit), each 4-byte lane one column's 4 codes (4-bit:
two columns', in the nibbles). Then, per row, through `isa`'s dot product:
    avx512_vnni  vpdpbusd zmm: 4-bit codes are u8 against s8 activations as they are; the low-nibble columns
                 take the whole bytes (code_lo + 16 code_hi, no mask) and lose 16 x the high-nibble columns'
                 sums at the end of each block: a quad costs one shift and one mask, then two vpdpbusd per row.
                 8-bit signed codes go against u8 activations q_x + 128, corrected by 128 * (column sums
                 of the block's codes), themselves one vpdpbusd of the quad words against a vector of ones
    avx512/avx2  vpmaddwd (zmm / ymm): each quad word split into two int16 pair words, activation pairs
    generic      int32 multiply-adds per byte (any LLVM target)
(The row-order layout before needed two byte permutes (vpermb) per 64 bytes: without them the SmolLM2 decode
GEMV sequence, paired on Zen 4, runs 1.21x / 1.18x at 1 / 2 threads where its weights sit in L3, and the same
within noise (1.02x / 1.00x) where they stream from DRAM, the decode case, at about the read bandwidth.)
Per call: activation rows are quantized once (serially, on the calling thread), then tiles in parallel keep
R x 32 int32 and float accumulators in registers, R <= ROW_GROUP (4): a tile runs M rows as groups of 4 and one
of the M % 4 left (static variants R = 1..4; M = 1, the batch-1 decode step, has its own loop), its weights
streamed from DRAM for the first group and read from L1 for the others. So a batched decode step of up to
`max_rows` <= MAX_M (16) rows streams the weights once, with int8 dot products, and each row's output is bit for
bit the one it gets alone (SmolLM2 w4a16 decode, 2 threads, tokens/s summed over the rows: batch 8 2.26x and
batch 16 1.87x the float GEMM that ran above 4 rows before; benchmarks/phases.py --batches). The
parallel loop's first item is LEAD_TILES + 1 tiles, the others one: the pool gives each thread a contiguous
range of items, so the calling thread, which starts while the pool's workers are still waking up, streams
LEAD_TILES more, whatever the pool's size. Each tile first requests the lines of the quantized activations
(written by the calling thread, so in another core's cache for the pool's workers). W and its scales stream
through software prefetches `prefetch_bytes` ahead where they pay (`probe_prefetch` measures it on the compiling
machine: PREFETCH_BYTES below), through the hardware prefetcher alone elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from twophase.kernels.tir import qmatmul
from twophase.kernels.tir.fusion import Fusion
from twophase.kernels.tir.fusion import entry as fusion_entry
from twophase.kernels.tir.qmatmul import TN, QMatMulSpec
from twophase.kernels.tir.qmatmul_int8 import Isa
from twophase.kernels.tir.script import fast_macros

MAX_M = 16  # rows up to which the int8 GEMV runs; above it qmatmul's float GEMM (dequantized panels)
ROW_GROUP = 4  # rows whose accumulators a tile keeps in registers at once (R x 32 int32 + R x 32 float)
XB_CHANNEL = 32  # activation block for per-channel weights (and weight blocks over 256)
# software prefetch distance in W (bytes ahead in each thread's stream of codes; the scales and offsets go the same
# number of K rows ahead) where `probe_prefetch` finds it pays on the compiling machine. It is machine-specific:
# SmolLM2 decode GEMVs from DRAM, 2 threads, paired (benchmarks/tir_gemv_stream.py): on an Intel Xeon VM (LLVM:
# rocketlake, AVX512-VNNI, 480 MiB host L3) 4096 B runs 1.40-1.45x as fast as none (2-16 KiB within noise of
# each other), ~35 GB/s against the ~28 GB/s numpy read; on AMD Zen 4 none ran 1.14x as fast as 512 B, and on an
# earlier Intel Xeon VM 1-4 KiB ran 0.92-0.95x (README)
PREFETCH_BYTES = 4096
PROBE_MIB = 64  # weights the probe streams per pass: beyond L2, like a decode step's
PROBE_ROUNDS = 15  # paired passes, in alternating order
PROBE_MIN_SPEEDUP = 1.05  # the median paired speedup from which the probe turns prefetching on
# extra tiles of the calling thread's range (module doc): the pool's workers start about 1 us after it (TVM's
# pool, 2 threads: 0.75-1.1 us), a tile's stream at decode shapes (576 x 32 int4: 11.5 KB). SmolLM2 decode
# GEMVs from DRAM, 2 threads, paired: 1 tile 1.08x over none, 2: 1.05x, 3: 1.06x
LEAD_TILES = 1
AL = 16  # lanes of the vectorized absmax

_VL = {Isa.AVX512_VNNI: 16, Isa.AVX512: 16, Isa.AVX2: 8, Isa.GENERIC: 8}  # int32 lanes per vector


@dataclasses.dataclass(frozen=True)
class PrefetchProbe:
    """What `probe_prefetch` measured: the distance it chose (0: none) and the median paired speedup of
    PREFETCH_BYTES over none (time without / time with)."""

    prefetch_bytes: int
    speedup: float
    rounds: int


def probe_prefetch(target: dict, isa: Isa) -> PrefetchProbe:
    """Whether software prefetches of W pay on this machine, measured: an int4 (block 32) 1024 x 1024 GEMV over
    PROBE_MIB MiB of weight copies, one row, built with and without them for `target` (this machine's: the
    probe runs here), PROBE_ROUNDS paired passes on TVM's thread pool as it is. PREFETCH_BYTES when the median
    speedup is at least PROBE_MIN_SPEEDUP, else 0. A few seconds (two small compiles)."""
    import statistics
    import time

    import tvm

    spec = QGemvA8Spec(4, 1024, 1024, 32, zero=8)
    rng = np.random.default_rng(0)
    arrays = pack(spec, rng.integers(0, 16, (spec.K, spec.N)).astype(np.uint8),
                  (rng.random((spec.weights.G, spec.N)) * 0.01 + 1e-3).astype(np.float32))
    copies = max(2, PROBE_MIB * (1 << 20) // sum(a.nbytes for a in arrays))
    weights = [[tvm.runtime.tensor(a) for a in arrays] for _ in range(copies)]
    x = tvm.runtime.tensor(rng.standard_normal((1, spec.K)).astype(np.float32))
    y = tvm.runtime.tensor(np.zeros((1, spec.N), np.float32))
    fns = {d: tvm.compile(prim_func(spec, name="probe", isa=isa, prefetch_bytes=d), target=tvm.target.Target(target))[
        "probe"] for d in (0, PREFETCH_BYTES)}

    def seconds(fn) -> float:
        t0 = time.perf_counter()
        for w in weights:
            fn(x, *w, y)
        return time.perf_counter() - t0

    for fn in fns.values():  # warm-up
        seconds(fn)
    ratios = []
    for r in range(PROBE_ROUNDS):
        order = (0, PREFETCH_BYTES) if r % 2 == 0 else (PREFETCH_BYTES, 0)
        t = {d: seconds(fns[d]) for d in order}
        ratios.append(t[0] / t[PREFETCH_BYTES])
    speedup = statistics.median(ratios)
    return PrefetchProbe(PREFETCH_BYTES if speedup >= PROBE_MIN_SPEEDUP else 0, round(speedup, 3), PROBE_ROUNDS)


@dataclasses.dataclass(frozen=True)
class QGemvA8Spec:
    bits: int  # 4 or 8
    K: int
    N: int
    block_size: int | None  # weight block along K; None: per output channel
    has_offset: bool = False
    zero: int = 0  # constant code subtracted before scaling (qmatmul.QMatMulSpec.zero)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QGemvA8Spec.bits must be 4 or 8, got {self.bits}")
        w = self.weights  # validates K, N, block_size
        if self.K > 1 << 16:
            raise ValueError(f"K={self.K}: int32 accumulators hold K <= 65536 products")
        if self.block_size is not None and w.bs > 256 and w.bs % XB_CHANNEL:
            raise ValueError(f"block_size {self.block_size} > 256 must be a multiple of {XB_CHANNEL}")
        if self.XB % 4 and self.XB < self.K:
            raise ValueError(f"block_size {self.block_size} must be a multiple of 4 (quads of K rows)")
        assert w.quads, "every block starts at a multiple of 4 rows, so the codes are quad-interleaved"

    @classmethod
    def of(cls, spec: QMatMulSpec) -> QGemvA8Spec:
        return cls(spec.bits, spec.K, spec.N, spec.block_size, spec.has_offset, spec.zero)

    @property
    def weights(self) -> QMatMulSpec:
        return QMatMulSpec(self.bits, self.K, self.N, self.block_size, self.has_offset, self.zero)

    @property
    def XB(self) -> int:
        """Activation block (rows of K per activation scale)."""
        bs = self.weights.bs
        return bs if self.block_size is not None and bs <= 256 else min(XB_CHANNEL, self.K)

    @property
    def NB(self) -> int:
        return -(-self.K // self.XB)


def param_specs(spec: QGemvA8Spec) -> list[tuple[tuple[int, ...], str]]:
    return qmatmul.param_specs(spec.weights)


def pack(spec: QGemvA8Spec, codes_KN: np.ndarray, scale_GN: np.ndarray, offset_GN: np.ndarray | None = None):
    """qmatmul.pack's arrays (the same bytes the float kernel reads)."""
    return qmatmul.pack(spec.weights, codes_KN, scale_GN, offset_GN)


def quantize_rows(spec: QGemvA8Spec, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of the activation step: (codes int32 [M, K], s_x float32 [M, NB], xs int64 [M, NB])."""
    X = np.asarray(X, np.float32)
    M, K, XB = X.shape[0], spec.K, spec.XB
    q = np.zeros((M, K), np.int32)
    sx = np.zeros((M, spec.NB), np.float32)
    for b in range(spec.NB):
        blk = X[:, b * XB : (b + 1) * XB]
        s = (np.abs(blk).max(axis=1) / np.float32(127)).astype(np.float32)
        inv = np.where(s > 0, np.float32(1) / np.where(s > 0, s, np.float32(1)), np.float32(0)).astype(np.float32)
        q[:, b * XB : (b + 1) * XB] = np.clip(np.rint(blk * inv[:, None]), -127, 127)
        sx[:, b] = s
    xs = np.stack([q[:, b * XB : (b + 1) * XB].sum(axis=1, dtype=np.int64) for b in range(spec.NB)], axis=1)
    return q, sx, xs


def reference(spec: QGemvA8Spec, X: np.ndarray, codes_KN: np.ndarray, scale_GN: np.ndarray,
              offset_GN: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference (module doc's formula): exact integer block dots, float64 scaling, float32 [M, N]."""
    q, sx, xs = quantize_rows(spec, X)
    bs, XB = spec.weights.bs, spec.XB
    codes = np.asarray(codes_KN, np.int64)
    Y = np.zeros((q.shape[0], spec.N), np.float64)
    for b in range(spec.NB):
        k0, k1, g = b * XB, min((b + 1) * XB, spec.K), b * XB // bs
        dot = q[:, k0:k1].astype(np.int64) @ codes[k0:k1] - spec.zero * xs[:, b : b + 1]
        s = sx[:, b : b + 1].astype(np.float64)
        Y += dot * s * np.asarray(scale_GN, np.float64)[g]
        if offset_GN is not None:
            Y += (s * xs[:, b : b + 1]) * np.asarray(offset_GN, np.float64)[g]
    return Y.astype(np.float32)


@fast_macros
def prim_func(spec: QGemvA8Spec, name: str | None = None, isa: Isa = Isa.GENERIC, fusion: Fusion = Fusion(),
              rank: int = 2, max_rows: int = MAX_M, prefetch_bytes: int = 0):
    """The kernel: args X [M, K], *pack(spec), Y [M, N] (M a symbolic int64, any M >= 1; M > max_rows runs
    qmatmul's float GEMM; 1 <= max_rows <= MAX_M). With a `fusion` (kernels/tir/fusion.py): its gamma before the
    arrays, its residual R [M, N] before Y.
    rank=3: X, R, Y are [B, T, .] instead (M = B * T).
    prefetch_bytes: software prefetch distance in W (0: none; `probe_prefetch` picks it for a machine)."""
    if not 1 <= max_rows <= MAX_M:
        raise ValueError(f"max_rows must be in 1..{MAX_M}, got {max_rows}")
    if prefetch_bytes < 0:
        raise ValueError(f"prefetch_bytes must be >= 0, got {prefetch_bytes}")
    func = _build(spec, isa, fusion=fusion, rank=rank, max_rows=max_rows, prefetch_bytes=prefetch_bytes)
    return func.with_attr("global_symbol", name or default_name(spec, isa, fusion))


def default_name(spec: QGemvA8Spec, isa: Isa, fusion: Fusion = Fusion()) -> str:
    q = f"b{spec.bits}_bs{spec.weights.bs if spec.block_size else 0}" + ("_off" if spec.has_offset else "")
    q += f"_z{spec.zero}".replace("-", "m") if spec.zero else ""
    return f"qgemv_a8_{q}_k{spec.K}_n{spec.N}{fusion.tag}_{isa.value}"


def _build(spec: QGemvA8Spec, isa: Isa, macro: str | None = None, fusion: Fusion = Fusion(),
           rank: int = 2, max_rows: int = MAX_M, prefetch_bytes: int = 0):
    """TVMScript of the kernel; Python-level `if`s are resolved at parse time (one variant per spec).
    `macro="body"`: the body macro `body(X, W, S, O, Y, M)` instead of the PrimFunc."""
    from tvm.script import tirx as T

    K, N, bits, zero, has_offset = spec.K, spec.N, spec.bits, spec.zero, spec.has_offset
    w = spec.weights
    NT, G, bs, XB, NB = w.NT, w.G, w.bs, spec.XB, spec.NB
    NBF, LT = K // XB, K % XB  # full activation blocks, rows of the partial last one
    KQ = K // 4  # full quads (blocks start at multiples of 4, so the K % 4 tail rows are the last block's)
    NTF, NTAIL = N // TN, N % TN
    VL = _VL[isa]
    NV = TN // VL  # accumulator vectors per row
    vnni = isa is Isa.AVX512_VNNI
    pairs = isa in (Isa.AVX512, Isa.AVX2)
    U8 = 128 if vnni and bits == 8 else 0  # activations as u8 (q + 128) against signed 8-bit codes
    shifted = U8 != 0
    full4 = vnni and bits == 4  # low-nibble quad words are the whole bytes (quad_words)
    wdtype = "uint8" if bits == 4 else "int8"
    WK = TN // 2 if bits == 4 else TN
    ROW_BYTES = WK
    PF = max(4, prefetch_bytes // ROW_BYTES)  # rows of W ahead
    PFG = max(1, PF // bs)  # weight blocks ahead (scales, offsets)
    LEAD = min(LEAD_TILES, NT - 1)  # the first parallel item's extra tiles
    i32v, b8v = f"int32x{VL}", f"int8x{4 * VL}"

    def quad_words(W, t, k, v):
        # the int8 x 4VL quad words of columns v*VL .. v*VL+VL-1, rows k .. k+3: in the quad-interleaved layout
        # (qmatmul.py) 4VL consecutive bytes of the quad, for 4-bit codes one nibble of them. With VNNI the
        # low-nibble words are the bytes as they are (code_lo + 16 code_hi), corrected per block (`block`)
        if bits == 4:
            half = NV // 2  # vectors per nibble
            chunk = W.vload([t, k + v % half * 4 * VL // WK, 0], f"uint8x{4 * VL}")
            if v >= half:
                return T.reinterpret(T.shift_right(chunk, T.broadcast(T.uint8(4), 4 * VL)), dtype=b8v)
            if vnni:
                return T.reinterpret(chunk, dtype=b8v)
            return T.reinterpret(T.bitwise_and(chunk, T.broadcast(T.uint8(15), 4 * VL)), dtype=b8v)
        return W.vload([t, k + v * 4 * VL // WK, 0], b8v)

    def dot(acc, wq, Xw, Xp, Xc, m, q):
        # acc + per-lane dot product of quad words wq (int8 x 4VL) with activation codes 4q .. 4q+3 of row m
        if vnni:
            xb = T.reinterpret(T.broadcast(Xw[m, q], VL), dtype=b8v)
            intrin = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")
            if bits == 4:  # u8 codes x s8 activations
                return T.call_llvm_pure_intrin(intrin, acc, wq, xb, dtype=i32v)
            return T.call_llvm_pure_intrin(intrin, acc, xb, wq, dtype=i32v)  # u8 activations x s8 codes
        wv = T.reinterpret(wq, dtype=i32v)
        if bits == 4:  # bytes 0..15: no sign
            b = [T.bitwise_and(T.shift_right(wv, 8 * i), 0xFF) for i in range(4)]
        else:
            b = [T.shift_right(T.shift_left(wv, 24 - 8 * i), 24) for i in range(4)]
        if pairs:
            i16v = f"int16x{2 * VL}"
            intrin = "llvm.x86.avx512.pmaddw.d.512" if VL == 16 else "llvm.x86.avx2.pmadd.wd"
            out = acc
            for h in range(2):
                pw = T.bitwise_or(T.bitwise_and(b[2 * h], 0xFFFF), T.shift_left(b[2 * h + 1], 16))
                xp = T.broadcast(Xp[m, 2 * q + h], VL)
                out = out + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(intrin), T.reinterpret(pw, dtype=i16v),
                                                    T.reinterpret(xp, dtype=i16v), dtype=i32v)
            return out
        out = acc
        for i in range(4):
            out = out + b[i] * T.broadcast(Xc[m, 4 * q + i], VL)
        return out

    @T.macro
    def prefetch(address):  # a hint only: an address past the end of a buffer is harmless
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 3, 1))

    @T.macro
    def load_quads(W, wq, t, k, v):
        wq[v, T.ramp(0, 1, 4 * VL)] = quad_words(W, t, k, v)

    @T.macro
    def quantize_block(X, Xc, SX, XS, m, b, k0, L):
        amx = T.alloc_buffer((AL,), "float32", scope="global")
        for j in T.vectorized(AL):
            amx[j] = T.float32(0)
        for i in range(L // AL):
            for j in T.vectorized(AL):
                amx[j] = T.max(amx[j], T.fabs(X[m, k0 + i * AL + j]))
        for i in range(L % AL):
            amx[0] = T.max(amx[0], T.fabs(X[m, k0 + L // AL * AL + i]))
        for j in range(AL - 1):
            amx[0] = T.max(amx[0], amx[j + 1])
        SX[m, b] = amx[0] / T.float32(127)
        amx[1] = T.if_then_else(amx[0] > T.float32(0), T.float32(1) / SX[m, b], T.float32(0))  # 1 / s_x
        for j in T.vectorized(L):
            Xc[m, k0 + j] = T.Cast("int32", T.nearbyint(T.max(T.min(X[m, k0 + j] * amx[1], T.float32(127)),
                                                              T.float32(-127))))
        XS[m, b] = 0
        for j in range(L):
            XS[m, b] = XS[m, b] + Xc[m, k0 + j]

    @T.macro
    def pack_quad(Xc, Xw, m, q):  # activation codes 4q .. 4q+3 as the bytes of one word (u8 with U8 = 128)
        Xw[m, q] = T.bitwise_or(
            T.bitwise_or(T.bitwise_and(Xc[m, 4 * q] + U8, 0xFF),
                         T.shift_left(T.bitwise_and(Xc[m, 4 * q + 1] + U8, 0xFF), 8)),
            T.bitwise_or(T.shift_left(T.bitwise_and(Xc[m, 4 * q + 2] + U8, 0xFF), 16),
                         T.shift_left(T.bitwise_and(Xc[m, 4 * q + 3] + U8, 0xFF), 24)))

    @T.macro
    def pack_pair(Xc, Xp, m, p):  # activation codes 2p, 2p+1 as the int16 halves of one word
        Xp[m, p] = T.bitwise_or(T.bitwise_and(Xc[m, 2 * p], 0xFFFF), T.shift_left(Xc[m, 2 * p + 1], 16))

    @T.macro
    def quantize_row(X, Xc, Xw, Xp, SX, XS, m):
        for b in range(NBF):
            quantize_block(X, Xc, SX, XS, m, b, b * XB, XB)
        if LT > 0:
            quantize_block(X, Xc, SX, XS, m, NBF, NBF * XB, LT)
        # the packed words in vectors of AL lanes (one vector the width of the whole row compiles for minutes:
        # LLVM legalizes an int32 x KQ vector op by op, 70 s for K = 1536)
        if vnni:
            for q0 in range(KQ // AL):
                for q in T.vectorized(AL):
                    pack_quad(Xc, Xw, m, q0 * AL + q)
            for q in range(KQ // AL * AL, KQ):
                pack_quad(Xc, Xw, m, q)
        if pairs:
            for p0 in range(2 * KQ // AL):
                for p in T.vectorized(AL):
                    pack_pair(Xc, Xp, m, p0 * AL + p)
            for p in range(2 * KQ // AL * AL, 2 * KQ):
                pack_pair(Xc, Xp, m, p)

    @T.macro
    def block(W, S, O, Xc, Xw, Xp, SX, XS, A, C, corr, wq, t, b, k0, L, R, m0):
        # A[r, :] += the block's term (module doc) for activation rows m0 .. m0+R-1, block b = K rows k0 .. k0+L-1
        for r in T.unroll(R):
            for j in T.vectorized(TN):
                C[r, j] = 0
        if shifted:
            for j in T.vectorized(TN):
                corr[j] = 0
        if prefetch_bytes > 0 and G > 1:  # a block's TN scales (offsets) are two lines, PFG blocks ahead
            prefetch(T.address_of(S[t, k0 // bs + PFG, 0]))
            prefetch(T.address_of(S[t, k0 // bs + PFG, TN // 2]))
            if has_offset:
                prefetch(T.address_of(O[t, k0 // bs + PFG, 0]))
                prefetch(T.address_of(O[t, k0 // bs + PFG, TN // 2]))
        for q in range(L // 4):
            if prefetch_bytes > 0:  # one line of codes per quad (4-bit; 8-bit: two)
                prefetch(T.address_of(W[t, k0 + 4 * q + PF, 0]))
                if bits == 8:
                    prefetch(T.address_of(W[t, k0 + 4 * q + 2 + PF, 0]))
            load_quads(W, wq, t, k0 + 4 * q, 0)  # shuffle indices are parse-time constants: one call per v
            load_quads(W, wq, t, k0 + 4 * q, 1)
            if NV == 4:
                load_quads(W, wq, t, k0 + 4 * q, 2)
                load_quads(W, wq, t, k0 + 4 * q, 3)
            for v in T.unroll(NV):
                if shifted:
                    corr[T.ramp(v * VL, 1, VL)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), corr[T.ramp(v * VL, 1, VL)],
                        T.reinterpret(T.broadcast(T.int32(0x01010101), VL), dtype=b8v), wq[v, T.ramp(0, 1, 4 * VL)],
                        dtype=i32v)
                for r in T.unroll(R):
                    C[r, T.ramp(v * VL, 1, VL)] = dot(C[r, T.ramp(v * VL, 1, VL)], wq[v, T.ramp(0, 1, 4 * VL)],
                                                      Xw, Xp, Xc, m0 + r, k0 // 4 + q)
        if full4:  # lanes 0..15 summed code_lo + 16 code_hi (quad_words): take out 16 x the high nibbles' sums
            for r in T.unroll(R):
                for j in T.vectorized(TN // 2):
                    C[r, j] = C[r, j] - C[r, j + TN // 2] * 16
        for i in range(L % 4):  # the K % 4 tail rows: columns in natural order, true (unshifted) activations
            for r in T.unroll(R):
                if bits == 4:
                    for j in T.vectorized(16):
                        C[r, j] = C[r, j] + T.bitwise_and(T.Cast("int32", W[t, k0 + L // 4 * 4 + i, j]), 15) * Xc[
                            m0 + r, k0 + L // 4 * 4 + i]
                    for j in T.vectorized(16):
                        C[r, j + 16] = C[r, j + 16] + T.shift_right(T.Cast("int32", W[t, k0 + L // 4 * 4 + i, j]),
                                                                    4) * Xc[m0 + r, k0 + L // 4 * 4 + i]
                else:
                    for j in T.vectorized(TN):
                        C[r, j] = C[r, j] + T.Cast("int32", W[t, k0 + L // 4 * 4 + i, j]) * Xc[
                            m0 + r, k0 + L // 4 * 4 + i]
        for r in T.unroll(R):
            for j in T.vectorized(TN):
                if has_offset:
                    A[r, j] = A[r, j] + T.Cast("float32", C[r, j] - corr[j] * U8 - XS[m0 + r, b] * zero) * (
                        SX[m0 + r, b] * S[t, k0 // bs, j]) + O[t, k0 // bs, j] * (
                        SX[m0 + r, b] * T.Cast("float32", XS[m0 + r, b]))
                else:
                    A[r, j] = A[r, j] + T.Cast("float32", C[r, j] - corr[j] * U8 - XS[m0 + r, b] * zero) * (
                        SX[m0 + r, b] * S[t, k0 // bs, j])

    @T.macro
    def fetch_activations(Xc, Xw, Xp, SX, XS, R, m0):
        # the quantized activations were just written by the thread that quantized them: request all their
        # lines at once, or the dot loop misses on them one line at a time (each a transfer from the other
        # core's cache, about 1.5 us per call for K = 576 on a worker thread); cache hits after a task's first tile
        for r in T.unroll(R):
            if vnni:
                for i in range(-(-KQ // 16)):
                    prefetch(T.address_of(Xw[m0 + r, i * 16]))
            elif pairs:
                for i in range(-(-2 * KQ // 16)):
                    prefetch(T.address_of(Xp[m0 + r, i * 16]))
            else:
                for i in range(-(-K // 16)):
                    prefetch(T.address_of(Xc[m0 + r, i * 16]))
            for i in range(-(-NB // 16)):
                prefetch(T.address_of(SX[m0 + r, i * 16]))
                prefetch(T.address_of(XS[m0 + r, i * 16]))

    @T.macro
    def tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, R, t, m0):
        # columns t * TN .. of Y for rows m0 .. m0+R-1
        fetch_activations(Xc, Xw, Xp, SX, XS, R, m0)
        A = T.alloc_buffer((R, TN), "float32", scope="global")
        C = T.alloc_buffer((R, TN), "int32", scope="global")
        corr = T.alloc_buffer((TN,), "int32", scope="global")
        wq = T.alloc_buffer((NV, 4 * VL), "int8", scope="global")
        for r in T.unroll(R):
            for j in T.vectorized(TN):
                A[r, j] = T.float32(0)
        if not shifted:
            for j in T.vectorized(TN):
                corr[j] = 0
        for b in range(NBF):
            block(W, S, O, Xc, Xw, Xp, SX, XS, A, C, corr, wq, t, b, b * XB, XB, R, m0)
        if LT > 0:
            block(W, S, O, Xc, Xw, Xp, SX, XS, A, C, corr, wq, t, NBF, NBF * XB, LT, R, m0)
        if NTAIL == 0 or t < NTF:
            for r in T.unroll(R):
                for j in T.vectorized(TN):
                    Y[m0 + r, t * TN + j] = A[r, j]
        else:
            for r in T.unroll(R):
                for j in range(NTAIL):
                    Y[m0 + r, t * TN + j] = A[r, j]

    @T.macro
    def tiles(W, S, O, Xc, Xw, Xp, SX, XS, Y, R):
        # one row group of R rows (the batch-1 decode step)
        for u in T.parallel(NT - LEAD):  # item 0: tiles 0 .. LEAD; item u > 0: tile u + LEAD
            if u == 0:
                for t in range(LEAD + 1):
                    tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, R, t, 0)
            else:
                tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, R, u + LEAD, 0)

    @T.macro
    def row_groups(W, S, O, Xc, Xw, Xp, SX, XS, Y, t, M):
        # tile t for all M rows, ROW_GROUP at a time, then the M % ROW_GROUP left: the tile's weights come
        # from DRAM for the first group and from L1 for the others
        for g in range(M // ROW_GROUP):
            tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, ROW_GROUP, t, g * ROW_GROUP)
        if M % ROW_GROUP == 1:
            tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, 1, t, M - 1)
        if M % ROW_GROUP == 2:
            tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, 2, t, M - 2)
        if M % ROW_GROUP == 3:
            tile(W, S, O, Xc, Xw, Xp, SX, XS, Y, 3, t, M - 3)

    @T.macro
    def grouped_tiles(W, S, O, Xc, Xw, Xp, SX, XS, Y, M):
        # the same items as `tiles`, with one copy of the (larger) row-group code: item u runs tiles t0 .. u + LEAD
        for u in T.parallel(NT - LEAD):
            for t in range(T.if_then_else(u == 0, T.int64(0), u + LEAD), u + LEAD + 1):
                row_groups(W, S, O, Xc, Xw, Xp, SX, XS, Y, t, M)

    @T.macro
    def gemv(X, W, S, O, Y, M):
        Xc = T.alloc_buffer((max_rows, K), "int32", scope="global")
        Xw = T.alloc_buffer((max_rows, max(KQ, 1)), "int32", scope="global")
        Xp = T.alloc_buffer((max_rows, max(2 * KQ, 1)), "int32", scope="global")
        SX = T.alloc_buffer((max_rows, NB), "float32", scope="global")
        XS = T.alloc_buffer((max_rows, NB), "int32", scope="global")
        for m in range(M):  # (a parallel loop here doubled the kernel's build time)
            quantize_row(X, Xc, Xw, Xp, SX, XS, m)
        if M == 1:
            tiles(W, S, O, Xc, Xw, Xp, SX, XS, Y, 1)
        else:
            grouped_tiles(W, S, O, Xc, Xw, Xp, SX, XS, Y, M)

    gemm = qmatmul.gemm_macro(w)

    @T.macro
    def body(X, W, S, O, Y, M):
        if M <= max_rows:
            gemv(X, W, S, O, Y, M)
        else:
            gemm(X, W, S, O, Y, M)

    if macro is not None:
        return body
    return fusion_entry(body, K=K, N=N, NT=NT, G=G, WK=WK, wdtype=wdtype, TN=TN, quant=True, has_offset=has_offset,
                        fusion=fusion, rank=rank)
