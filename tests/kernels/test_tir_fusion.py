"""The fused prologues / epilogue of the TVM matmul kernels (kernels/tir/fusion.py) vs NumPy: RMS norm and SwiGLU
before, the residual add after, on the float-activation kernel (qmatmul) and the int8-activation decode GEMV
(qgemv_a8), for 2-D and 3-D activations, GEMV and GEMM row counts."""

from __future__ import annotations

import functools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from twophase.kernels.tir import qgemv_a8, qmatmul
from twophase.kernels.tir.fusion import Fusion, Prologue, reference_prologue
from twophase.kernels.tir.qmatmul import QMatMulSpec
from twophase.kernels.tir.qmatmul_int8 import Isa

TARGET = {"kind": "llvm", "mcpu": "znver3"}
SPEC = QMatMulSpec(4, 72, 40, 32, has_offset=True, zero=8)  # K % 16 = 8 (vector tails), N % 32 = 8
FUSIONS = [
    Fusion(Prologue.RMS_NORM, 1e-5),
    Fusion(Prologue.SWIGLU, residual=True),
    Fusion(Prologue.RMS_NORM, 1e-6, residual=True),
    Fusion(residual=True),
]


def _id(f: Fusion) -> str:
    return f.prologue.value + ("+res" if f.residual else "")


@functools.cache
def _kernel(kind: str, fusion: Fusion, rank: int):
    if kind == "a8":
        func = qgemv_a8.prim_func(qgemv_a8.QGemvA8Spec.of(SPEC), isa=Isa.AVX2, fusion=fusion, rank=rank)
    else:
        func = qmatmul.prim_func(SPEC, fusion=fusion, rank=rank)
    return tvm.compile(func, target=tvm.target.Target(TARGET)).mod[func.attrs["global_symbol"]]


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("kind", ["float", "a8"])
@pytest.mark.parametrize("fusion", FUSIONS, ids=_id)
def test_matches_reference(fusion: Fusion, kind: str, rank: int):
    rng = np.random.default_rng(7)
    K, N, G = SPEC.K, SPEC.N, SPEC.G
    codes = rng.integers(0, 16, (K, N)).astype(np.uint8)
    scale = (rng.random((G, N)) * 0.05 + 1e-3).astype(np.float32)
    offset = (rng.standard_normal((G, N)) * 0.05).astype(np.float32)
    gamma = (rng.random(K) + 0.5).astype(np.float32)
    packed = [tvm.runtime.tensor(a) for a in qmatmul.pack(SPEC, codes, scale, offset)]
    fn = _kernel(kind, fusion, rank)
    for M in (1, 3, 7):  # GEMV (float path: <= 2 rows; int8 path: <= 4), serial / row-parallel prologue
        X = (rng.standard_normal((M, fusion.x_width(K))) * 3).astype(np.float32)
        R = rng.standard_normal((M, N)).astype(np.float32)
        xe = reference_prologue(fusion, X, gamma)
        if kind == "a8" and M <= qgemv_a8.MAX_M:
            ref = qgemv_a8.reference(qgemv_a8.QGemvA8Spec.of(SPEC), xe, codes, scale, offset)
        else:
            ref = qmatmul.reference(SPEC, xe, codes, scale, offset)
        if fusion.residual:
            ref = ref + R
        shape = (lambda a: a.reshape(1, *a.shape)) if rank == 3 else (lambda a: a)
        args = [tvm.runtime.tensor(shape(X))]
        if fusion.prologue is Prologue.RMS_NORM:
            args.append(tvm.runtime.tensor(gamma))
        args += packed
        if fusion.residual:
            args.append(tvm.runtime.tensor(shape(R)))
        Y = tvm.runtime.tensor(shape(np.full((M, N), np.nan, np.float32)))
        fn(*args, Y)
        # the int8 GEMV rounds x_e to int8 codes: float differences in x_e may flip a code (one step of s_x)
        tol = 2e-3 if kind == "a8" and M <= qgemv_a8.MAX_M and fusion.prologue is not Prologue.NONE else 1e-4
        got = Y.numpy().reshape(M, N)
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()), err_msg=f"M={M}")


def test_signature_leaves_out_absent_arguments():
    plain = qmatmul.prim_func(QMatMulSpec(4, 64, 32, 32, zero=8))  # X, W, S, Y
    fused = qmatmul.prim_func(QMatMulSpec(4, 64, 32, 32, has_offset=True), fusion=Fusion(Prologue.RMS_NORM, residual=True))
    assert len(plain.params) == 4 and len(fused.params) == 7  # X, gamma, W, S, O, R, Y
    swiglu = qmatmul.prim_func(QMatMulSpec(32, 64, 32, None), fusion=Fusion(Prologue.SWIGLU), rank=3)
    header = swiglu.script().split("def ", 1)[1].split(":\n", 1)[0]
    assert len(swiglu.params) == 3 and "X3: T.Buffer((B, L, 128)" in header, header  # X [B, T, 2K], W, Y


def test_reference_prologues():
    X = np.array([[3.0, -4.0, 1.0, 2.0]], np.float32)
    norm = reference_prologue(Fusion(Prologue.RMS_NORM, 0.0 + 1e-12), X, np.array([1, 2, 1, 1], np.float32))
    np.testing.assert_allclose(norm, X / np.sqrt(7.5) * [1, 2, 1, 1], rtol=1e-6)
    sw = reference_prologue(Fusion(Prologue.SWIGLU), X)
    np.testing.assert_allclose(sw, [[3 / (1 + np.exp(-3)) * 1.0, -4 / (1 + np.exp(4)) * 2.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        Fusion(Prologue.RMS_NORM, 0.0)
