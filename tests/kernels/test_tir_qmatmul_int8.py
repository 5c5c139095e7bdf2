"""TIR W8A8 QMatMulA8 kernel vs its NumPy reference: dynamic and static activation scales, every ISA variant
this machine can run, ragged K (not a multiple of any word or vector width) and N (tails), leftover rows."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from twophase.kernels.tir.qmatmul_int8 import (
    TN,
    ActQuant,
    Isa,
    QMatMulA8Spec,
    isa_for_target,
    pack,
    param_specs,
    prim_func,
    quantize_rows,
    reference,
)
from twophase.passes.quantize_activations import per_token_scale, quantize_symmetric

AVX2 = {"kind": "llvm", "mcpu": "znver3"}  # the CI machines' ISA
MS = (1, 5, 64, 13)  # 64 = 8 * 8 (no leftover at MR = 8), 10 * 6 + 4; 13: leftover rows at both MRs
SPECS = [
    QMatMulA8Spec(77, 70),  # K % 4 = 1, N tail of 6 in the third tile
    QMatMulA8Spec(130, 45),  # K % 4 = 2, N tail > one vector
    QMatMulA8Spec(64, 32, ActQuant.STATIC),
    QMatMulA8Spec(99, 100, ActQuant.STATIC),  # K % 4 = 3
    QMatMulA8Spec(3, 5),  # shorter than one word per row pair
]
STATIC_SCALE = 0.02  # N(0, 1) activations: codes saturate at -128 / 127 beyond 2.5 sigma


def _host_isas() -> list[Isa]:
    """The variants this machine runs: everything up to its best (GENERIC always)."""
    from twophase.compiler.lower_tvm import host_target

    best = isa_for_target(host_target()["tvm_target"])
    order = [Isa.GENERIC, Isa.AVX2, Isa.AVX512, Isa.AVX512_VNNI]
    if best is Isa.GENERIC:
        return [Isa.GENERIC]
    return order[: order.index(best) + 1]


def _target(isa: Isa) -> dict:
    if isa in (Isa.GENERIC, Isa.AVX2):
        return AVX2
    from twophase.compiler.lower_tvm import host_target

    return host_target()["tvm_target"]


def _weights(spec: QMatMulA8Spec, rng: np.random.Generator):
    codes = rng.integers(-128, 128, (spec.K, spec.N)).astype(np.int8)  # full int8 range, -128 included
    scale = (rng.random(spec.N) * 0.02 + 1e-3).astype(np.float32)
    return codes, scale


@pytest.mark.parametrize("isa", _host_isas(), ids=lambda i: i.value)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.act.value}_k{s.K}_n{s.N}")
def test_matches_reference(spec: QMatMulA8Spec, isa: Isa) -> None:
    rng = np.random.default_rng(spec.K * 1000 + spec.N)
    codes, scale = _weights(spec, rng)
    params = pack(spec, codes, scale)
    assert [(a.shape, str(a.dtype)) for a in params] == param_specs(spec)
    func = prim_func(spec, isa=isa)
    fn = tvm.compile(func, target=tvm.target.Target(_target(isa))).mod[func.attrs["global_symbol"]]
    args = [tvm.runtime.tensor(a) for a in params]
    static = [tvm.runtime.tensor(np.array([STATIC_SCALE], np.float32))] if spec.act is ActQuant.STATIC else []
    for M in MS:
        X = rng.standard_normal((M, spec.K)).astype(np.float32)
        X[0, : min(3, spec.K)] *= 40  # one row with outliers (dynamic: a coarse grid for that row)
        if M > 2:
            X[2] = 0  # an all-zero row: scale eps, codes 0
        Y = tvm.runtime.tensor(np.full((M, spec.N), np.nan, np.float32))
        fn(tvm.runtime.tensor(X), *args, *static, Y)
        ref = reference(spec, X, codes, scale, STATIC_SCALE)
        np.testing.assert_allclose(Y.numpy(), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=f"M={M}")


def test_quantization_is_onnx_quantize_linear() -> None:
    """The reference's codes are QuantizeActivationsPass's (round half to even, saturate) and ORT's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 40)).astype(np.float32)
    X[1, :8] = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127, -127], np.float32) / 127 * 2.5  # ties
    X[1, 8] = 2.5
    q, s = quantize_rows(QMatMulA8Spec(40, 1), X)
    np.testing.assert_array_equal(s, per_token_scale(X))
    np.testing.assert_array_equal(q, quantize_symmetric(X, s[:, None]))
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=0, output_dtype=TensorProto.INT8)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 40]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [6])],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, [6, 40])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(q, sess.run(None, {"x": X, "s": s})[0])


def test_pack_layout_and_attrs() -> None:
    spec = QMatMulA8Spec(6, 40)
    codes = np.arange(240).reshape(6, 40).astype(np.int8)
    P, S = pack(spec, codes, np.arange(40, dtype=np.float32))
    assert P.shape == (2, 2, TN, 4) and S.shape == (2, TN)
    assert P[1, 1, 3, 1] == codes[4 + 1, TN + 3] and P[1, 1, 3, 2] == 0  # K padded with zero codes
    assert not P[1, :, 8:].any() and not S[1, 8:].any()  # N padded with zero codes and scales
    func = prim_func(spec, name="qa8")
    assert func.attrs["global_symbol"] == "qa8" and int(func.attrs["op_pattern"]) == 8
    assert bool(func.attrs["tir.is_scheduled"]) and bool(func.attrs["tir.noalias"])
    assert len(func.params) == 4 and len(prim_func(QMatMulA8Spec(6, 40, ActQuant.STATIC)).params) == 5


@pytest.mark.parametrize(("mcpu", "isa", "instr"), [("znver3", Isa.AVX2, "vpmaddwd"),
                                                     ("icelake-server", Isa.AVX512_VNNI, "vpdpbusd")])
def test_isa_choice_and_asm(mcpu: str, isa: Isa, instr: str) -> None:
    """The target's features pick the variant, and its integer dot product is in the machine code."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    assert isa_for_target(target) is isa
    func = prim_func(QMatMulA8Spec(64, 64), isa=isa)
    asm = tvm.compile(func, target=target).mod.inspect_source("asm")
    assert instr in asm and "vpmulld" not in asm
