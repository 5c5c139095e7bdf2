"""The TVM backend's quantized embedding lookup against its numpy reference (4-bit blocked with offsets,
odd D; 8-bit per row), and indices outside the table clamped instead of read out of bounds."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.kernels.tir.gather import gather_prim_func, pack_table, reference

tvm = pytest.importorskip("tvm")


def run(bits: int, ids: np.ndarray, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    V, D = codes.shape
    func = gather_prim_func(bits, V, D, scale.shape[1], offset is not None)
    lib = tvm.compile(func, target=tvm.target.Target({"kind": "llvm"}))
    args = [tvm.runtime.tensor(a) for a in pack_table(bits, codes, scale, offset)]
    out = tvm.runtime.tensor(np.zeros((ids.size, D), np.float32))
    args.insert(1, tvm.runtime.tensor(ids.astype(np.int64)))
    lib(*args, out)
    return out.numpy()


@pytest.mark.parametrize(("bits", "D", "G", "with_offset"), [(4, 37, 3, True), (4, 64, 2, False), (8, 48, 1, False)])
def test_matches_reference(bits: int, D: int, G: int, with_offset: bool):
    rng = np.random.default_rng(0)
    V = 23
    codes = rng.integers(0, 16, (V, D)).astype(np.uint8) if bits == 4 else rng.integers(-128, 128, (V, D)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (V, G)).astype(np.float32)
    offset = rng.standard_normal((V, G)).astype(np.float32) if with_offset else None
    ids = np.array([0, 5, 22, 5, 13])
    np.testing.assert_allclose(run(bits, ids, codes, scale, offset), reference(bits, ids, codes, scale, offset),
                               rtol=1e-6, atol=1e-6)


def test_out_of_range_ids_are_clamped():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (5, 16)).astype(np.uint8)
    scale = np.ones((5, 1), np.float32)
    out = run(4, np.array([-3, 99]), codes, scale, None)
    np.testing.assert_array_equal(out, codes[[0, 4]].astype(np.float32))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="0..15"):
        pack_table(4, np.full((2, 4), 16, np.uint8), np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match="bits"):
        pack_table(2, np.zeros((2, 4), np.uint8), np.ones((2, 1), np.float32))
