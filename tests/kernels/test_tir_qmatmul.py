"""TIR QMatMul kernels vs their NumPy reference: every spec kind, GEMV and GEMM paths, ragged N and K."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from twophase.kernels.tir.qmatmul import (
    GEMV_MAX_M,
    TN,
    QMatMulSpec,
    pack,
    param_specs,
    prim_func,
    quad_order,
    reference,
    row_order,
)

TARGET = {"kind": "llvm", "mcpu": "znver3"}
MS = (1, 3, 17, 64)  # GEMV (1), GEMM with leftover rows (3, 17), GEMM without (64 = 10 * 6 + 4: also leftover)

SPECS = [
    QMatMulSpec(4, 64, 48, 32),  # N not a multiple of TN
    QMatMulSpec(4, 128, 96, 32, has_offset=True),
    QMatMulSpec(4, 160, 200, 128, has_offset=True),  # partial last block (160 = 128 + 32), ragged N
    QMatMulSpec(4, 80, 50, 32),  # K not a multiple of bs
    QMatMulSpec(4, 96, 64, None),  # one block spanning K
    QMatMulSpec(8, 96, 70, None),  # per channel
    QMatMulSpec(8, 144, 64, 32, has_offset=True),  # blocked, partial last block
    QMatMulSpec(32, 64, 48, None),
    QMatMulSpec(32, 100, 130, None),
    QMatMulSpec(4, 80, 50, 32, zero=8),  # symmetric int4 as unsigned codes: no offset array
    QMatMulSpec(4, 96, 40, 32, has_offset=True, zero=8),  # GGUF Q4_1 form with a constant zero
    QMatMulSpec(8, 96, 70, None, zero=-128),  # uint8 codes shifted to int8
    QMatMulSpec(4, 74, 40, 8),  # quads, last block 2 rows: no quad, only the rows after the last quad
    QMatMulSpec(8, 66, 33, None, has_offset=True),  # quads, per channel, 2 rows after the last quad
    QMatMulSpec(4, 70, 40, 6),  # blocks at rows 6, 12, ...: not quad-interleaved (row order)
]


def _weights(spec: QMatMulSpec, rng: np.random.Generator):
    K, N, G = spec.K, spec.N, spec.G
    if spec.bits == 32:
        return rng.standard_normal((K, N)).astype(np.float32), None, None
    if spec.bits == 4:
        codes = rng.integers(0, 16, (K, N)).astype(np.uint8)
    else:
        codes = rng.integers(-128, 128, (K, N)).astype(np.int8)
    scale = (rng.standard_normal((G, N)) * 0.05).astype(np.float32)
    offset = (rng.standard_normal((G, N)) * 0.1).astype(np.float32) if spec.has_offset else None
    return codes, scale, offset


def _kernel(spec: QMatMulSpec):
    func = prim_func(spec)
    return tvm.compile(func, target=tvm.target.Target(TARGET)).mod[func.attrs["global_symbol"]]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"b{s.bits}_k{s.K}_n{s.N}_bs{s.block_size}_o{int(s.has_offset)}_z{s.zero}")
def test_matches_reference(spec: QMatMulSpec) -> None:
    rng = np.random.default_rng(spec.K * 1000 + spec.N)
    codes, scale, offset = _weights(spec, rng)
    params = pack(spec, codes, scale, offset)
    assert [(a.shape, str(a.dtype)) for a in params] == param_specs(spec)
    fn = _kernel(spec)
    args = [tvm.runtime.tensor(a) for a in params]
    for M in MS:
        X = rng.standard_normal((M, spec.K)).astype(np.float32)
        Y = tvm.runtime.tensor(np.full((M, spec.N), np.nan, np.float32))
        fn(tvm.runtime.tensor(X), *args, Y)
        ref = reference(spec, X, codes, scale, offset)
        np.testing.assert_allclose(Y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"M={M}")


def test_paths_and_attrs() -> None:
    spec = QMatMulSpec(4, 64, 40, 32)
    func = prim_func(spec, name="qmm")
    assert func.attrs["global_symbol"] == "qmm"
    assert bool(func.attrs["tir.is_scheduled"]) and bool(func.attrs["tir.noalias"])
    assert int(func.attrs["op_pattern"]) == 8
    assert GEMV_MAX_M < 3  # MS above exercise both paths
    assert len(func.params) == 4  # X, codes, scale, Y


def test_pack_layout_4bit() -> None:
    """Byte j of a tile row: column j in the low nibble, column j + TN/2 in the high one; N padded."""
    spec = QMatMulSpec(4, 2, TN + 3, None)
    codes = (np.arange(2 * spec.N).reshape(2, spec.N) % 16).astype(np.uint8)
    packed, scale = pack(spec, codes, np.ones((1, spec.N), np.float32))
    assert packed.shape == (2, 2, TN // 2) and scale.shape == (2, 1, TN)
    assert packed[0, 1, 3] == codes[1, 3] | (codes[1, 3 + TN // 2] << 4)
    assert packed[1, 0, 2] == codes[0, TN + 2]  # high nibble: padding column, code 0
    assert not scale[1, 0, 3:].any()


def test_pack_rejects_bad_input() -> None:
    spec = QMatMulSpec(4, 32, 8, 16)
    with pytest.raises(ValueError, match="0..15"):
        pack(spec, np.full((32, 8), 16, np.int32), np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="scale"):
        pack(spec, np.zeros((32, 8), np.uint8), np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="has_offset"):
        pack(spec, np.zeros((32, 8), np.uint8), np.ones((2, 8), np.float32), np.ones((2, 8), np.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_quad_interleaved_layout(bits: int) -> None:
    """In each quad of rows, byte 4c + r holds byte c of row 4q + r (4-bit: columns c and c + 16 in its nibbles);
    the rows after the last quad stay in row order; row_order undoes quad_order."""
    spec = QMatMulSpec(bits, 10, 40, None)
    assert spec.quads and not QMatMulSpec(bits, 10, 40, 6).quads and not QMatMulSpec(32, 8, 40, None).quads
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 16, (10, 40)) if bits == 4 else rng.integers(-128, 128, (10, 40))
    codes = codes.astype(np.uint8 if bits == 4 else np.int8)
    W = pack(spec, codes, np.ones((1, 40), np.float32))[0]
    t, q, r, c = 1, 1, 2, 3  # tile 1 = columns 32..63 (40.. are padding)
    quad = W[t, 4 * q : 4 * q + 4].reshape(-1)
    if bits == 4:
        assert quad[4 * c + r] == codes[4 * q + r, 32 + c]  # column 32 + c + 16 is padding: high nibble 0
        assert W[0, 4:8].reshape(-1)[4 * 5 + 1] == codes[5, 5] | codes[5, 21] << 4  # quad 1, row 1, byte 5
        assert W[0, 8, 5] == codes[8, 5] | codes[8, 21] << 4  # rows 8, 9: after the last quad
    else:
        assert quad[4 * c + r] == codes[4 * q + r, 32 + c]
        assert W[0, 9, 30] == codes[9, 30]
    np.testing.assert_array_equal(row_order(spec, quad_order(spec, W)), W)
