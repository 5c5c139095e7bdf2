"""Quantization math (twophase/kernels/quant.py) against independent NumPy references: round-to-nearest
grids, int4 packing for ONNX and MatMulNBits, and exact GGUF grid recovery on real-format blocks."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from twophase.kernels.formats import QuantizedWeight
from twophase.kernels.quant import (
    GGUF_BLOCK,
    GgufKind,
    dequantize_offset_form,
    detect_gguf_grid,
    float_offset_GN,
    pack_int4,
    pack_matmulnbits,
    pack_matmulnbits_zero_points,
    quantize_int8_per_channel,
    quantize_rtn,
    recover_gguf_grid,
    to_unsigned,
    unpack_int4,
    unpack_matmulnbits,
)

gguf = pytest.importorskip("gguf")

SMOLLM2_GGUF = Path.home() / ".cache/twophase/zoo/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def _weight(K: int, N: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, N)) * 0.05).astype(np.float32)


# -- round to nearest: element-by-element references -----------------------------------------


def _ref_blocks(K: int, bs: int):
    for g, start in enumerate(range(0, K, bs)):
        yield g, slice(start, min(start + bs, K))


def _ref_symmetric(W: np.ndarray, bits: int, bs: int):
    """Reference: per block and column, the grid of the module docstring, one column at a time."""
    K, N = W.shape
    G = -(-K // bs)
    codes = np.zeros((K, N), np.int64)
    scale = np.zeros((G, N), np.float32)
    for n in range(N):
        for g, rows in _ref_blocks(K, bs):
            col = W[rows, n]
            if bits == 4:
                extreme = col[np.argmax(np.abs(col))]
                s = np.float32(extreme / np.float32(-8))
                lo, hi = -8, 7
            else:
                s = np.float32(np.abs(col).max() / np.float32(127))
                lo, hi = -127, 127
            s = np.float32(1) if s == 0 else s
            scale[g, n] = s
            codes[rows, n] = [min(max(int(np.rint(v / s)), lo), hi) for v in col]
    return codes, scale


def _ref_asymmetric(W: np.ndarray, bits: int, bs: int):
    K, N = W.shape
    G = -(-K // bs)
    top = 2**bits - 1
    codes = np.zeros((K, N), np.int64)
    scale = np.zeros((G, N), np.float32)
    zp = np.zeros((G, N), np.int64)
    for n in range(N):
        for g, rows in _ref_blocks(K, bs):
            col = W[rows, n]
            lo, hi = min(col.min(), 0), max(col.max(), 0)
            s = np.float32((hi - lo) / np.float32(top))
            s = np.float32(1) if s == 0 else s
            z = min(max(int(np.rint(-lo / s)), 0), top)
            scale[g, n], zp[g, n] = s, z
            codes[rows, n] = [min(max(int(np.rint(v / s)) + z, 0), top) for v in col]
    return codes, scale, zp


@pytest.mark.parametrize("K,N", [(64, 5), (40, 3)])
def test_int8_per_channel_matches_reference(K: int, N: int):
    W = _weight(K, N)
    W[:, 1] = 0.0  # an all-zero channel: scale 1, codes 0
    qw = quantize_int8_per_channel(W)
    codes, scale = _ref_symmetric(W, 8, K)
    assert qw.codes_KN.dtype == np.int8 and qw.bits == 8 and qw.block_size == K and qw.zero_point_GN is None
    np.testing.assert_array_equal(qw.codes_KN, codes)
    np.testing.assert_array_equal(qw.scale_GN, scale)
    assert qw.codes_KN.min() >= -127  # -128 never used
    assert np.abs(qw.codes_KN).max(axis=0)[0] == 127  # absmax lands on +-127
    err = np.abs(qw.dequantize() - W)
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    assert (qw.dequantize()[:, 1] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,bs", [(64, 32), (48, 32), (40, 16), (96, 128)])
def test_symmetric_blocked_matches_reference(bits: int, K: int, bs: int):
    W = _weight(K, 7, seed=bits)
    qw = quantize_rtn(W, bits, bs, symmetric=True)
    codes, scale = _ref_symmetric(W, bits, min(bs, K))
    np.testing.assert_array_equal(qw.codes_KN, codes)
    np.testing.assert_array_equal(qw.scale_GN, scale)
    assert qw.scale_GN.shape == (-(-K // min(bs, K)), 7)
    # The extreme value is exact; error is at most half a step except where the side opposite the
    # extreme reaches past +7.5 steps (int4) and clips to +7: at most one step there.
    rows = np.arange(K) // qw.block_size
    err, step = np.abs(qw.dequantize() - W), np.abs(qw.scale_GN[rows])
    clipped = qw.codes_KN == (7 if bits == 4 else 127)
    assert (err[~clipped] <= step[~clipped] / 2 * (1 + 1e-6)).all()
    assert (err <= step * (1 + 1e-6)).all()
    if bits == 4:
        assert qw.codes_KN.min() == -8 and qw.codes_KN.max() <= 7


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,bs", [(64, 32), (40, 16)])
def test_asymmetric_matches_reference(bits: int, K: int, bs: int):
    W = _weight(K, 6, seed=3)
    W[:, 2] += 0.2  # an all-positive column: 0 is still inside [lo, hi]
    qw = quantize_rtn(W, bits, bs, symmetric=False)
    codes, scale, zp = _ref_asymmetric(W, bits, bs)
    assert qw.codes_KN.dtype == np.uint8 and qw.zero_point_GN.dtype == np.uint8
    np.testing.assert_array_equal(qw.codes_KN, codes)
    np.testing.assert_array_equal(qw.scale_GN, scale)
    np.testing.assert_array_equal(qw.zero_point_GN, zp)
    rows = np.arange(K) // bs
    deq = (codes - zp[rows]) * scale[rows]
    np.testing.assert_allclose(qw.dequantize(), deq, rtol=0, atol=1e-7)
    assert (np.abs(qw.dequantize() - W) <= scale[rows] * (1 + 1e-6)).all()  # half a step + zero-point rounding


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(_weight(8, 2), 3, 8, True)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.zeros(8, np.float32), 4, 8, True)


def test_float_offset_form():
    qw = QuantizedWeight(
        np.array([[0, 15], [3, 7]], np.uint8),
        np.array([[0.5, 0.25]], np.float32),
        np.array([[2.5, -1.0]], np.float32),
        4,
        2,
    )
    m = float_offset_GN(qw)
    np.testing.assert_array_equal(m, [[-1.25, 0.25]])
    np.testing.assert_array_equal(
        dequantize_offset_form(qw),
        np.array([[0 * 0.5 - 1.25, 15 * 0.25 + 0.25], [3 * 0.5 - 1.25, 7 * 0.25 + 0.25]], np.float32),
    )
    np.testing.assert_allclose(dequantize_offset_form(qw), qw.dequantize(), atol=1e-7)


# -- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 6), (3, 5), (1,), (7, 3, 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int4_is_onnx_int4_layout(shape, signed: bool):
    rng = np.random.default_rng(1)
    codes = rng.integers(-8, 8, shape) if signed else rng.integers(0, 16, shape)
    packed = pack_int4(codes)
    np_type = ml_dtypes.int4 if signed else ml_dtypes.uint4
    onnx_raw = onnx.numpy_helper.from_array(codes.astype(np_type)).raw_data  # ONNX's own packing
    assert packed.tobytes() == onnx_raw
    flat = codes.reshape(-1)
    # Independent spelling of "low nibble first": byte i = c[2i] + 16 * c[2i+1] (mod 16 each)
    ref = [
        (int(flat[i]) & 15) | ((int(flat[i + 1]) & 15) << 4) if i + 1 < flat.size else int(flat[i]) & 15
        for i in range(0, flat.size, 2)
    ]
    assert packed.tolist() == ref
    out = unpack_int4(packed, shape, signed)
    assert out.dtype == (np.int8 if signed else np.uint8)
    np.testing.assert_array_equal(out, codes)


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([16]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K,bs", [(64, 32), (40, 16), (96, 64)])
def test_pack_matmulnbits_layout(bits: int, K: int, bs: int):
    N = 5
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2**bits, (K, N)).astype(np.uint8)
    pad = 2 ** (bits - 1)
    B = pack_matmulnbits(codes, bits, bs, pad_code=pad)
    G = -(-K // bs)
    assert B.shape == (N, G, bs * bits // 8) and B.dtype == np.uint8
    for n in range(N):
        for g in range(G):
            col = [int(codes[g * bs + i, n]) if g * bs + i < K else pad for i in range(bs)]
            if bits == 8:
                expect = col
            else:
                expect = [col[2 * j] | (col[2 * j + 1] << 4) for j in range(bs // 2)]
            assert B[n, g].tolist() == expect
    np.testing.assert_array_equal(unpack_matmulnbits(B, K, bits), codes)


@pytest.mark.parametrize("bits,G", [(4, 3), (4, 4), (8, 3)])
def test_pack_matmulnbits_zero_points_layout(bits: int, G: int):
    N = 4
    zp = np.random.default_rng(3).integers(0, 2**bits, (G, N)).astype(np.uint8)
    packed = pack_matmulnbits_zero_points(zp, bits)
    assert packed.shape == (N, -(-G * bits // 8))
    for n in range(N):
        z = zp[:, n].tolist() + ([0] if bits == 4 and G % 2 else [])
        expect = z if bits == 8 else [z[2 * j] | (z[2 * j + 1] << 4) for j in range(len(z) // 2)]
        assert packed[n].tolist() == expect


def test_to_unsigned_offset_binary():
    sym = quantize_rtn(_weight(32, 3), 4, 32, True)
    u, zp = to_unsigned(sym)
    assert zp is None and u.dtype == np.uint8
    np.testing.assert_array_equal(u.astype(np.int16) - 8, sym.codes_KN)
    asym = quantize_rtn(_weight(32, 3), 4, 16, False)
    u, zp = to_unsigned(asym)
    np.testing.assert_array_equal(u, asym.codes_KN)
    assert zp is asym.zero_point_GN
    s8 = quantize_int8_per_channel(_weight(32, 3))
    np.testing.assert_array_equal(to_unsigned(s8)[0].astype(np.int16) - 128, s8.codes_KN)


# -- GGUF grids -------------------------------------------------------------------------------

_QTYPE = {
    GgufKind.Q4_0: "Q4_0",
    GgufKind.Q4_1: "Q4_1",
    GgufKind.Q8_0: "Q8_0",
}


def _gguf_roundtrip(W_KN: np.ndarray, kind: GgufKind) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF blocks [N, G, bytes], the float32 W[K, N] gguf-py dequantizes them to), like a GGUF file."""
    qtype = getattr(gguf.GGMLQuantizationType, _QTYPE[kind])
    rows = np.ascontiguousarray(W_KN.T)  # GGUF rows are output channels, K contiguous
    raw = gguf.quants.quantize(rows, qtype)
    deq = gguf.quants.dequantize(raw, qtype)
    N, K = rows.shape
    return raw.reshape(N, K // GGUF_BLOCK, -1), np.ascontiguousarray(deq.T.astype(np.float32))


def _file_fields(raw_NG: np.ndarray, kind: GgufKind):
    """d, m, q from the raw blocks: q unpacked as the GGUF spec lays it out (low nibbles = first 16)."""
    d = raw_NG[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, G)
    if kind is GgufKind.Q8_0:
        return d, None, raw_NG[..., 2:].copy().view(np.int8).astype(np.int64)
    off = 4 if kind is GgufKind.Q4_1 else 2
    m = raw_NG[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind is GgufKind.Q4_1 else None
    qs = raw_NG[..., off:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
    return d, m, q


@pytest.mark.parametrize("kind", list(GgufKind))
@pytest.mark.parametrize("K,N", [(64, 48), (96, 130)])
def test_recover_gguf_grid_exact(kind: GgufKind, K: int, N: int):
    W = _weight(K, N, seed=7)
    W[:32, 3] = 0.0  # an all-zero block
    raw, Wg = _gguf_roundtrip(W, kind)
    grid = recover_gguf_grid(Wg, kind)
    assert grid is not None and grid.kind is kind
    np.testing.assert_array_equal(grid.dequantize(), Wg)  # bit for bit
    qw = grid.weight
    assert qw.block_size == GGUF_BLOCK and qw.bits == kind.bits and qw.scale_GN.shape == (K // 32, N)

    d, m, q = _file_fields(raw, kind)
    codes_NGB = qw.codes_KN.T.reshape(N, K // 32, 32).astype(np.int64)
    nonzero = d != 0
    # On these blocks the recovered (d, q[, m]) are the file's own.
    np.testing.assert_array_equal(qw.scale_GN.T[nonzero], d[nonzero])
    if kind is GgufKind.Q4_0:
        assert qw.codes_KN.dtype == np.int8 and qw.zero_point_GN is None
        np.testing.assert_array_equal(codes_NGB[nonzero], q[nonzero] - 8)
    elif kind is GgufKind.Q8_0:
        assert qw.codes_KN.dtype == np.int8 and qw.zero_point_GN is None
        np.testing.assert_array_equal(codes_NGB[nonzero], q[nonzero])
    else:
        assert qw.codes_KN.dtype == np.uint8 and qw.zero_point_GN.dtype == np.float32
        np.testing.assert_array_equal(codes_NGB[nonzero], q[nonzero])
        np.testing.assert_array_equal(grid.offset_GN.T[nonzero], m[nonzero])
        np.testing.assert_allclose(qw.zero_point_GN, -grid.offset_GN / qw.scale_GN, rtol=1e-6)
        # The float zero point alone rebuilds W to within an ulp or so of m: why the offset is kept.
        np.testing.assert_allclose(qw.dequantize(), Wg, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(GgufKind))
def test_recover_gguf_grid_rejects_off_grid(kind: GgufKind):
    W = _weight(64, 40, seed=8)
    assert recover_gguf_grid(W, kind) is None  # plain float weights
    assert recover_gguf_grid(_weight(48, 8), kind) is None  # K not a multiple of 32
    _, Wg = _gguf_roundtrip(W, kind)
    nudged = Wg.copy()
    nudged[40, 33] = np.nextafter(nudged[40, 33], np.float32(1))  # one element one ulp off
    assert recover_gguf_grid(nudged, kind) is None
    assert recover_gguf_grid(Wg, kind) is not None


def test_detect_gguf_grid_picks_the_source_format():
    W = _weight(64, 40, seed=9)
    for kind in GgufKind:
        _, Wg = _gguf_roundtrip(W, kind)
        assert detect_gguf_grid(Wg).kind is kind
    assert detect_gguf_grid(W) is None


def test_recover_searches_blocks_other_quantizers_write():
    """Blocks whose extreme is not on the extreme code (not what gguf-py writes) are found by the search."""
    rng = np.random.default_rng(10)
    W = _weight(64, 128, seed=11)
    # Q8_0 block with codes in -50..50 and a fp16 scale: d != absmax / 127.
    _, W8 = _gguf_roundtrip(W, GgufKind.Q8_0)
    d = np.float32(np.float16(0.0021))
    W8[32:64, 100] = d * rng.integers(-50, 51, 32).astype(np.float32)
    grid = recover_gguf_grid(W8, GgufKind.Q8_0)
    assert grid is not None
    np.testing.assert_array_equal(grid.dequantize(), W8)
    # Q4_1 block whose codes span 2..13: its minimum is not m, its range not 15 d.
    _, W41 = _gguf_roundtrip(W, GgufKind.Q4_1)
    d, m = np.float32(np.float16(0.0123)), np.float32(np.float16(-0.101))
    q = rng.integers(2, 14, 32).astype(np.float32)
    q[:2] = [2, 13]
    W41[32:64, 90] = (d * q) + m
    grid = recover_gguf_grid(W41, GgufKind.Q4_1)
    assert grid is not None
    np.testing.assert_array_equal(grid.dequantize(), W41)
    # A constant block (Q4_1: d = 0 in the file) is exact too.
    W41[0:32, 70] = np.float32(np.float16(0.03))
    grid = recover_gguf_grid(W41, GgufKind.Q4_1)
    assert grid is not None
    np.testing.assert_array_equal(grid.dequantize(), W41)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_GGUF.exists(), reason="SmolLM2 GGUF not in the zoo cache")
def test_recover_smollm2_gguf_tensors():
    """Layer 0 and the embedding of the real file (Q4_1 linears, Q8_0 token_embd) come back exactly."""
    reader = gguf.GGUFReader(SMOLLM2_GGUF)
    kinds = {"Q4_1": GgufKind.Q4_1, "Q8_0": GgufKind.Q8_0}
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name not in kinds or not (t.name.startswith("blk.0.") or t.name.startswith("token_embd")):
            continue
        W = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).T)  # [K, N] as in the export
        grid = detect_gguf_grid(W)
        assert grid is not None and grid.kind is kinds[t.tensor_type.name], t.name
        np.testing.assert_array_equal(grid.dequantize(), W)
        seen.add(t.tensor_type.name)
    assert seen == {"Q4_1", "Q8_0"}
