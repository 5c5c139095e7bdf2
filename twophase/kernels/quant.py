"""Weight quantization math in pure NumPy: round-to-nearest grids, int4 packing, GGUF grid recovery.

Every function here is the NumPy reference of what a graph or a kernel does with the result; the
formulas are in each docstring. Dimension letters as in `formats.py`: W[K, N] is a MatMul weight
(K = reduction axis, N = output channels), blocks of `block_size` rows run along K, G = ceil(K / bs).

Grids (b = bits):

    symmetric, per output channel (b = 8):   s[n] = max_k |W[k,n]| / 127,   q = clip(rint(W / s), -127, 127)
        -127..127, not -128..127: the grid is symmetric about 0 so +-absmax are both exact, and
        |q| <= 127 keeps the codes safe for the int8 x int8 kernels of w8a8 (no -128 * -128).
    symmetric, blocked (b = 4, also 8):      s[g,n] = w* / -2^(b-1),  q = clip(rint(W / s), -2^(b-1), 2^(b-1)-1)
        w* is the signed value of largest magnitude in the block, so it lands exactly on code
        -2^(b-1) (-8 for int4) and all 16 levels are used; only values on the other side beyond 7.5
        steps clip to +7 (error <= one step there, half a step elsewhere). The scale is negative when
        w* > 0 (ONNX DequantizeLinear and MatMulNBits take any float scale). This is llama.cpp's Q4_0
        rule and ORT's MLAS symmetric quantizer; on Gaussian weights its RMS error is 12% below
        scale = absmax/7 (codes -7..7) and 8% below absmax/8 clipping at +7 on both sides.
        For b = 8 blocked, the per-channel rule above is used per block (-127..127).
    asymmetric (uint, b = 4 or 8):            lo = min(min W, 0), hi = max(max W, 0)
                                              s = (hi - lo) / (2^b - 1),  z = clip(rint(-lo / s), 0, 2^b - 1)
                                              q = clip(rint(W / s) + z, 0, 2^b - 1)
        0 is kept inside [lo, hi] so the integer zero point z is always in range.
    all:                                      W ~= (q - z) * s   (z = 0 when symmetric)
    A block (or channel) of zeros gets s = 1 and q = z (exact).

Packing of 4-bit codes, two per byte, low nibble first (element 2i -> bits 0..3, 2i+1 -> bits 4..7):
    ONNX INT4/UINT4 tensors pack the whole tensor flattened in C order (odd count: last high nibble 0);
    com.microsoft.MatMulNBits B is uint8 [N, G, bs * b / 8]: W transposed to [N, K], K padded to G*bs,
    and each block of K packed on its own; its packed zero points are uint8 [N, ceil(G * b / 8)], packed
    the same way along G. Its codes are unsigned: signed codes are stored as q + 2^(b-1), which is the
    op's default zero point when none is given.

GGUF grids (block 32 along K; d, m stored as fp16; what gguf-py's and transformers' loaders produce):
    Q4_0:  W = d * (q - 8),  q in 0..15     -> int4 codes q - 8 in -8..7, scale d (signed)
    Q4_1:  W = d * q + m,    q in 0..15     -> uint4 codes q, scale d, float zero point z = -m / d
    Q8_0:  W = d * q,        q in -128..127 -> int8 codes q, scale d
`recover_gguf_grid` finds (d, q[, m]) from the dequantized float32 weight alone and checks that the
format's formula rebuilds every element bit for bit. Q4_1's m is kept as is (GgufGrid.offset_GN) beside
the float zero point -m/d, because fl(-z * d) misses m by one ulp in ~10% of blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np

from twophase.kernels.formats import QuantizedWeight

log = logging.getLogger(__name__)

GGUF_BLOCK = 32

# Recovery searches the blocks its direct formulas miss only when they are at most this fraction
# of the weight's blocks; more misses mean the weight is not on that grid at all.
_GGUF_SEARCH_FRACTION = 0.01


class GgufKind(enum.Enum):
    """GGUF block formats whose grid `recover_gguf_grid` can recover."""

    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q8_0 = "q8_0"

    @property
    def bits(self) -> int:
        return 8 if self is GgufKind.Q8_0 else 4


# ---------------------------------------------------------------------------------------------
# Round to nearest


def _check_2d(W_KN: np.ndarray) -> np.ndarray:
    W = np.asarray(W_KN)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {W.shape}")
    if not np.issubdtype(W.dtype, np.floating):
        raise ValueError(f"expected a float weight, got {W.dtype}")
    return W.astype(np.float32, copy=False)


def _padded_blocks(W_KN: np.ndarray, block_size: int) -> np.ndarray:
    """(G, bs, N) view of W with K zero-padded to G * bs."""
    K, N = W_KN.shape
    G = -(-K // block_size)
    if G * block_size != K:
        W_KN = np.concatenate([W_KN, np.zeros((G * block_size - K, N), np.float32)], axis=0)
    return W_KN.reshape(G, block_size, N)


def quantize_int8_per_channel(W_KN: np.ndarray) -> QuantizedWeight:
    """Symmetric int8 per output channel: s[n] = absmax(W[:, n]) / 127, q = clip(rint(W / s), -127, 127).

    Returns codes int8 (K, N), scale (1, N), no zero point, block_size = K.
    """
    W = _check_2d(W_KN)
    K, _ = W.shape
    return quantize_rtn(W, bits=8, block_size=K, symmetric=True)


def quantize_rtn(W_KN: np.ndarray, bits: int, block_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest quantization of W[K, N] on the grids of the module docstring.

    bits: 4 or 8.  block_size: rows of K per block; None (or >= K) = one block per output channel.
    symmetric: signed codes (int8 container) without zero point; else unsigned codes (uint8
    container) with integer zero points of the same dtype.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    W = _check_2d(W_KN)
    K, N = W.shape
    bs = K if block_size is None or block_size >= K else int(block_size)
    if bs < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    blocks = _padded_blocks(W, bs)  # (G, bs, N)
    half = 1 << (bits - 1)
    if symmetric:
        if bits == 4:
            # signed value of largest magnitude -> code -8
            idx = np.abs(blocks).argmax(axis=1)[:, None, :]
            extreme = np.take_along_axis(blocks, idx, axis=1)[:, 0, :]  # (G, N)
            scale = extreme / np.float32(-half)
            qmin, qmax = -half, half - 1
        else:
            scale = np.abs(blocks).max(axis=1) / np.float32(half - 1)
            qmin, qmax = -(half - 1), half - 1
        scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None, :]), qmin, qmax)
        codes = q.reshape(-1, N)[:K].astype(np.int8)
        return QuantizedWeight(codes, scale, None, bits, bs)
    levels = (1 << bits) - 1
    lo = np.minimum(blocks.min(axis=1), 0)
    hi = np.maximum(blocks.max(axis=1), 0)
    scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, levels)
    q = np.clip(np.rint(blocks / scale[:, None, :]) + zp[:, None, :], 0, levels)
    codes = q.reshape(-1, N)[:K].astype(np.uint8)
    return QuantizedWeight(codes, scale, zp.astype(np.uint8), bits, bs)


def float_offset_GN(qw: QuantizedWeight) -> np.ndarray:
    """The additive offset m[g, n] = fl(-z * s) of a float-zero-point weight: W = q * s + m.

    This is how standard ONNX carries a zero point that is not an integer (GGUF Q4_1): DequantizeLinear
    of the codes without zero point, plus m expanded over each block. (A GgufGrid carries m exactly.)
    """
    if qw.zero_point_GN is None or not np.issubdtype(qw.zero_point_GN.dtype, np.floating):
        raise ValueError("float_offset_GN needs a float zero point")
    return (-qw.zero_point_GN.astype(np.float32) * qw.scale_GN).astype(np.float32)


def dequantize_offset_form(qw: QuantizedWeight, offset_GN: np.ndarray | None = None) -> np.ndarray:
    """W = fl(fl(q * s) + m), m = offset_GN or float_offset_GN(qw): the QDQ graph's float-zero-point form."""
    K, _ = qw.shape
    rows = np.arange(K) // qw.block_size
    m = float_offset_GN(qw) if offset_GN is None else np.asarray(offset_GN, np.float32)
    q_s = (qw.codes_KN.astype(np.float32) * qw.scale_GN[rows]).astype(np.float32)
    return (q_s + m[rows]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Packing


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """ONNX INT4/UINT4 storage: the tensor flattened in C order, two codes per byte, low nibble first.

    byte[i] = (c[2i] & 0xF) | (c[2i+1] & 0xF) << 4; an odd count leaves the last high nibble 0.
    Returns uint8 of length ceil(size / 2).
    """
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 15):
        raise ValueError("int4 codes must lie in -8..7 (signed) or 0..15 (unsigned)")
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """Inverse of `pack_int4`: int8 codes in -8..7 (signed) or uint8 in 0..15, of `shape`."""
    size = int(np.prod(shape))
    b = np.asarray(packed, np.uint8).reshape(-1)
    nib = np.empty(b.size * 2, np.uint8)
    nib[0::2] = b & 0xF
    nib[1::2] = b >> 4
    nib = nib[:size]
    if signed:
        return ((nib.astype(np.int8) ^ 8) - 8).reshape(shape)  # sign-extend bit 3
    return nib.reshape(shape)


def to_unsigned(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """Offset-binary codes (uint8, 0..2^b-1) and zero point of `qw` for kernels that take unsigned codes.

    Signed codes q become q + 2^(b-1) with zero point 2^(b-1): returned as None, since that is the
    default zero point of MatMulNBits and GatherBlockQuantized (uint8 data). Unsigned codes come back as
    they are, with their integer or float zero point.
    """
    if qw.signed:
        if qw.zero_point_GN is not None:
            raise ValueError("signed codes with a zero point are not a format twophase produces")
        return (qw.codes_KN.astype(np.int16) + (1 << (qw.bits - 1))).astype(np.uint8), None
    return qw.codes_KN.astype(np.uint8), qw.zero_point_GN


def pack_matmulnbits(codes_KN: np.ndarray, bits: int, block_size: int, pad_code: int = 0) -> np.ndarray:
    """MatMulNBits input B: uint8 [N, G, block_size * bits / 8] from unsigned codes (K, N).

    B[n, g] packs codes[g*bs : (g+1)*bs, n] (K padded to G*bs with `pad_code`), 8 // bits codes per byte,
    lowest bits first: for 4 bits, byte j of a block = c[2j] | c[2j+1] << 4.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    codes = np.asarray(codes_KN)
    K, N = codes.shape
    G = -(-K // block_size)
    full = np.full((G * block_size, N), pad_code, np.uint8)
    full[:K] = codes
    blocks = np.ascontiguousarray(full.T).reshape(N, G, block_size)
    if bits == 8:
        return blocks
    return (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)


def unpack_matmulnbits(B: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Inverse of `pack_matmulnbits`: unsigned codes (K, N) from B [N, G, blob]."""
    B = np.asarray(B, np.uint8)
    N, G, blob = B.shape
    if bits == 8:
        flat = B.reshape(N, G * blob)
    else:
        nib = np.empty((N, G, blob * 2), np.uint8)
        nib[..., 0::2] = B & 0xF
        nib[..., 1::2] = B >> 4
        flat = nib.reshape(N, -1)
    return np.ascontiguousarray(flat[:, :K].T)


def pack_matmulnbits_zero_points(zp_GN: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits packed zero points: uint8 [N, ceil(G * bits / 8)] from unsigned zero points (G, N).

    Packed along G like B along K (4 bits: z[2j] | z[2j+1] << 4, odd G padded with 0).
    """
    z = np.ascontiguousarray(np.asarray(zp_GN, np.uint8).T)  # (N, G)
    if bits == 8:
        return z
    N, G = z.shape
    if G % 2:
        z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# GGUF grid recovery


def _gguf_blocks(W_KN: np.ndarray) -> np.ndarray:
    """(G*N, 32) blocks, block g of column n at row g*N + n."""
    K, N = W_KN.shape
    return np.ascontiguousarray(W_KN.reshape(K // GGUF_BLOCK, GGUF_BLOCK, N).transpose(0, 2, 1)).reshape(-1, GGUF_BLOCK)


def _fp16_neighbors(x: np.ndarray, steps: int) -> list[np.ndarray]:
    """x rounded to fp16 and its `steps` fp16 neighbors on each side, as float32 arrays."""
    h = x.astype(np.float16)
    out = [h]
    up = down = h
    for _ in range(steps):
        up = np.nextafter(up, np.float16(np.inf))
        down = np.nextafter(down, np.float16(-np.inf))
        out += [up, down]
    return [c.astype(np.float32) for c in out]


class _Solver:
    """Per-block (scale, codes[, offset]) candidates for one GGUF kind, tested for bit-exactness."""

    def __init__(self, kind: GgufKind, blocks: np.ndarray) -> None:
        self.kind = kind
        self.blocks = blocks
        n = blocks.shape[0]
        self.ok = np.zeros(n, bool)
        self.scale = np.ones(n, np.float32)
        self.offset = np.zeros(n, np.float32)  # Q4_1's m
        self.codes = np.zeros(blocks.shape, np.int16)
        if kind is GgufKind.Q4_1:
            self.qmin, self.qmax = 0, 15
        elif kind is GgufKind.Q4_0:
            self.qmin, self.qmax = -8, 7
        else:
            self.qmin, self.qmax = -128, 127

    def attempt(self, idx: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> None:
        """Try scale d (and offset m, Q4_1) on blocks `idx` not yet solved; keep those rebuilt exactly."""
        d = np.asarray(d, np.float32)
        keep = ~self.ok[idx] & np.isfinite(d) & (d != 0)
        idx, d = idx[keep], d[keep]
        if idx.size == 0:
            return
        B = self.blocks[idx]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if m is None:
                m = np.zeros_like(d)
                q = np.rint(B / d[:, None])
            else:
                m = np.asarray(m, np.float32)[keep]
                q = np.rint((B - m[:, None]) / d[:, None])
            rebuilt = (q * d[:, None]).astype(np.float32) + m[:, None]  # gguf-py's (d * q) + m
        exact = (q >= self.qmin).all(1) & (q <= self.qmax).all(1) & (rebuilt == B).all(1)
        hit = idx[exact]
        self.ok[hit] = True
        self.scale[hit] = d[exact]
        self.offset[hit] = m[exact]
        self.codes[hit] = q[exact].astype(np.int16)

    def constant_blocks(self) -> None:
        """Blocks whose 32 values are equal: zeros get (s=1, q=0); Q4_1 constants c get (s=|c|, q=0, m=c)."""
        B = self.blocks
        const = (B == B[:, :1]).all(1) & ~self.ok
        c = B[const, 0]
        if self.kind is GgufKind.Q4_1:
            d = np.where(c == 0, np.float32(1), np.abs(c)).astype(np.float32)
            idx = np.flatnonzero(const)
            self.ok[idx] = True
            self.scale[idx] = d
            self.offset[idx] = c
            self.codes[idx] = 0
        else:
            idx = np.flatnonzero(const & (B[:, 0] == 0))
            self.ok[idx] = True
            self.scale[idx] = 1.0
            self.codes[idx] = 0

    def direct(self) -> None:
        """The formula GGUF quantizers use, read backwards (solves every block gguf-py writes)."""
        B = self.blocks
        all_idx = np.arange(B.shape[0])
        if self.kind is GgufKind.Q8_0:
            self.attempt(all_idx, np.abs(B).max(1) / np.float32(127))
        elif self.kind is GgufKind.Q4_0:
            extreme = np.take_along_axis(B, np.abs(B).argmax(1)[:, None], 1)[:, 0]
            self.attempt(all_idx, extreme / np.float32(-8))
        else:
            lo, hi = B.min(1), B.max(1)
            for d in _fp16_neighbors((hi - lo) / np.float32(15), steps=1) + [(hi - lo) / np.float32(15)]:
                self.attempt(all_idx, d, lo)

    def search(self) -> None:
        """Wider candidates for the few blocks `direct` misses (other quantizers' choices of d, m)."""
        idx = np.flatnonzero(~self.ok)
        B = self.blocks[idx]
        amax = np.abs(B).max(1)
        if self.kind is GgufKind.Q8_0:
            for k in range(128, 0, -1):
                self.attempt(idx, amax / np.float32(k))
        elif self.kind is GgufKind.Q4_0:
            for k in range(8, 0, -1):
                for sign in (1, -1):
                    self.attempt(idx, sign * amax / np.float32(k))
        else:
            lo, hi = B.min(1), B.max(1)
            for span in range(15, 0, -1):  # q_max - q_min
                for d in _fp16_neighbors((hi - lo) / np.float32(span), steps=2):
                    for qlo in range(16 - span):  # code of the block minimum
                        for m in _fp16_neighbors(lo - d * np.float32(qlo), steps=1):
                            self.attempt(idx, d, m)


@dataclasses.dataclass(frozen=True)
class GgufGrid:
    """A weight's exact GGUF grid: W = q * s (+ m for Q4_1), bit for bit in float32.

    weight      codes and scales; Q4_0 / Q8_0: int8 codes, no zero point; Q4_1: uint8 codes 0..15 and
                the float32 zero point -m/s (what fused kernels such as MatMulNBits take)
    offset_GN   Q4_1 only: m itself (G, N) float32. fl(-z * s) can miss m by an ulp, so graphs that
                must rebuild W exactly add m rather than recomputing it from the zero point.
    """

    kind: GgufKind
    weight: QuantizedWeight
    offset_GN: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """W = fl(fl(q * s) + m): the GGUF loader's own formula (m = 0 without offset)."""
        qw = self.weight
        if self.offset_GN is None:
            return qw.dequantize()
        return dequantize_offset_form(qw, self.offset_GN)


def recover_gguf_grid(W_KN: np.ndarray, kind: GgufKind | str) -> GgufGrid | None:
    """The exact GGUF `kind` grid (block 32 along K) of a weight dequantized from GGUF, or None.

    Searches each block's (d, q[, m]) from the float32 values alone and keeps it only if the GGUF
    formula rebuilds all 32 values bit for bit; returns None when K is not a multiple of 32 or any
    block is off the grid (re-rounding such a weight is the caller's choice). The scale need not equal
    the file's d where another (d, q) rebuilds the same values (a block whose codes share a factor);
    the rebuilt weight is what is guaranteed, and checked once more on the whole tensor.
    """
    kind = GgufKind(kind)
    W = _check_2d(W_KN)
    K, N = W.shape
    if K % GGUF_BLOCK or K == 0 or not np.isfinite(W).all():
        return None
    G = K // GGUF_BLOCK
    # Cheap rejection first: off-grid weights fail on their first blocks.
    probe = _Solver(kind, _gguf_blocks(W[:GGUF_BLOCK, : min(N, 64)]))
    probe.constant_blocks()
    probe.direct()
    if (~probe.ok).mean() > 0.5:
        return None
    solver = _Solver(kind, _gguf_blocks(W))
    solver.constant_blocks()
    solver.direct()
    missed = int((~solver.ok).sum())
    if missed:
        if missed > _GGUF_SEARCH_FRACTION * solver.ok.size:
            log.debug("%s: %d of %d blocks off the grid", kind.value, missed, solver.ok.size)
            return None
        solver.search()
        if not solver.ok.all():
            log.debug("%s: %d blocks off the grid after search", kind.value, int((~solver.ok).sum()))
            return None
    codes = solver.codes.reshape(G, N, GGUF_BLOCK).transpose(0, 2, 1).reshape(K, N)
    scale = solver.scale.reshape(G, N)
    if kind is GgufKind.Q4_1:
        m = solver.offset.reshape(G, N)
        zp = (-m / scale).astype(np.float32)
        grid = GgufGrid(kind, QuantizedWeight(codes.astype(np.uint8), scale, zp, 4, GGUF_BLOCK), m)
    else:
        grid = GgufGrid(kind, QuantizedWeight(codes.astype(np.int8), scale, None, kind.bits, GGUF_BLOCK))
    if not np.array_equal(grid.dequantize(), W):  # implied by the per-block checks; keep the promise explicit
        return None
    return grid


def detect_gguf_grid(
    W_KN: np.ndarray, kinds: tuple[GgufKind, ...] = (GgufKind.Q4_0, GgufKind.Q4_1, GgufKind.Q8_0)
) -> GgufGrid | None:
    """The grid of the first of `kinds` that `recover_gguf_grid` recovers exactly, or None.

    Order matters only for weights on several grids at once (Q4_0 data is also Q4_1 and Q8_0 data):
    the default tries the smallest, symmetric format first.
    """
    for kind in kinds:
        grid = recover_gguf_grid(W_KN, kind)
        if grid is not None:
            return grid
    return None


__all__ = [
    "GGUF_BLOCK",
    "GgufGrid",
    "GgufKind",
    "dequantize_offset_form",
    "detect_gguf_grid",
    "float_offset_GN",
    "pack_int4",
    "pack_matmulnbits",
    "pack_matmulnbits_zero_points",
    "quantize_int8_per_channel",
    "quantize_rtn",
    "recover_gguf_grid",
    "to_unsigned",
    "unpack_int4",
    "unpack_matmulnbits",
]
