"""FuseInt8MatMulPass: graph diff (QDQ MatMuls -> MatMulIntegerToFloat), numerics against the QDQ
graph and the float graph in ORT, the AVX2 int16 saturation bound (NumPy emulation of the
u8 x s8 pair sum) and the refusal to fuse 8-bit weight codes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ALL_TINY

from passes.w8a8_helpers import (
    activation_absmax,
    canonical_feeds,
    check_full,
    outlier_activations,
    run_ort,
    single_matmul,
)
from twophase.compiler.graph_diff import diff_models
from twophase.compiler.options import ActivationMode
from twophase.passes.fuse_int8_matmul import AVX2_SAFE_WEIGHT_CODE, FuseInt8MatMulPass
from twophase.passes.quantize_activations import (
    QuantizeActivationsPass,
    input_wider_than,
    produces_graph_output,
    quantizable_matmuls,
)

RNG = np.random.default_rng(1)
MMITF = "com.microsoft::MatMulIntegerToFloat"


def avx2_u8s8_dot(a_u8: np.ndarray, b_s8: np.ndarray) -> np.ndarray:
    """What vpmaddubsw + vpmaddwd compute for a u8 row times s8 columns: adjacent pairs of products
    summed with int16 saturation, then summed in int32 (NumPy emulation of MLAS's AVX2 kernel)."""
    prod = a_u8.astype(np.int32)[:, None] * b_s8.astype(np.int32)  # (K, N)
    pairs = prod[0::2] + prod[1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=0)


@pytest.mark.parametrize("bits,saturates", [(7, False), (8, True)])
def test_avx2_pair_sums_fit_int16_only_with_7bit_weights(bits, saturates):
    qmax = 2 ** (bits - 1) - 1
    a = np.full(64, 255, np.uint8)  # worst case activation codes
    b = np.full((64, 3), qmax, np.int8)
    b[:, 1] = -qmax
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert (avx2_u8s8_dot(a, b) != exact).any() == saturates
    assert (qmax <= AVX2_SAFE_WEIGHT_CODE) != saturates


@pytest.mark.parametrize("mode", [ActivationMode.DYNAMIC, ActivationMode.STATIC])
def test_single_matmul_fused_matches_qdq(mode):
    w = RNG.standard_normal((64, 40)).astype(np.float32)
    x = outlier_activations((2, 7, 64))
    stats = {"x": np.abs(x).max((0, 1))}
    qdq = single_matmul(("B", "S", 64), w)
    QuantizeActivationsPass(mode, stats)(qdq)
    fused = qdq.clone()
    assert FuseInt8MatMulPass()(fused).modified
    check_full(fused)
    ops = [n.op_type for n in fused.graph]
    assert ops.count("MatMulIntegerToFloat") == 1 and "MatMul" not in ops and "DequantizeLinear" not in ops
    (y_qdq,) = run_ort(qdq, {"x": x})
    (y,) = run_ort(fused, {"x": x})
    # same integer codes, so only float summation order differs
    np.testing.assert_allclose(y, y_qdq, rtol=1e-4, atol=1e-5 * np.abs(y_qdq).max())


@pytest.mark.parametrize("name", ALL_TINY)
def test_graph_diff_and_numerics_on_tiny_decoders(canonical_onnx, name):
    base = ir.load(canonical_onnx(name))
    qdq = ir.load(canonical_onnx(name))
    n_mm = len(quantizable_matmuls(qdq.graph, produces_graph_output))
    n_act = len({id(n.inputs[0]) for n in quantizable_matmuls(qdq.graph, produces_graph_output)})
    QuantizeActivationsPass(skip=produces_graph_output)(qdq)
    fused = qdq.clone()
    FuseInt8MatMulPass()(fused)
    check_full(fused)
    d = diff_models(qdq, fused)
    assert d.op_delta[MMITF] == n_mm
    assert d.op_delta["MatMul"] == -n_mm
    assert d.op_delta["DequantizeLinear"] == -(n_mm + n_act)  # weight DQs and activation DQs gone
    assert d.op_delta.get("QuantizeLinear", 0) == 0  # int8 Q replaced by the u8 (zp 128) Q
    assert d.op_delta["Expand"] == n_act and d.op_delta["Unsqueeze"] == n_act
    assert d.op_delta["Mul"] == n_mm  # per-token scale on each output
    assert not d.initializers_removed or all(i.dtype != "int8" for i in d.initializers_removed)
    assert d.initializer_bytes_after["int8"] == d.initializer_bytes_before["int8"]  # codes reused as is

    feeds = canonical_feeds(base)
    (ref,) = run_ort(base, feeds, ["logits"])
    (y_qdq,) = run_ort(qdq, feeds, ["logits"])
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        (y,) = run_ort(fused, feeds, ["logits"], level=level)
        # identical integer codes: the fused graph tracks the QDQ graph to float rounding ...
        np.testing.assert_allclose(y, y_qdq, rtol=1e-3, atol=1e-4 * np.abs(y_qdq).max())
        # ... and the float graph within the quantization error
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05


def test_static_smoothquant_fused(canonical_onnx):
    base = ir.load(canonical_onnx("gqa"))
    stats = activation_absmax(base, [canonical_feeds(base, seed=s) for s in (1, 2)])
    model = ir.load(canonical_onnx("gqa"))
    QuantizeActivationsPass(ActivationMode.STATIC, stats, 0.5, skip=produces_graph_output)(model)
    FuseInt8MatMulPass()(model)
    check_full(model)
    ops = [n.op_type for n in model.graph]
    assert "ReduceMax" not in ops and ops.count("MatMulIntegerToFloat") == len(
        quantizable_matmuls(base.graph, produces_graph_output))
    feeds = canonical_feeds(base, seed=3)
    (ref,) = run_ort(base, feeds, ["logits"])
    (y,) = run_ort(model, feeds, ["logits"])
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.08


def test_static_with_per_token_outlier_matmuls_fused(canonical_onnx):
    """STATIC with `per_token`: the chosen MatMuls (here the MLP down projections) get per-token
    scales, the rest static ones; every MatMul still fuses into MatMulIntegerToFloat."""
    base = ir.load(canonical_onnx("gqa"))
    stats = activation_absmax(base, [canonical_feeds(base, seed=s) for s in (1, 2)])
    hidden = min(n.inputs[1].shape[0] for n in quantizable_matmuls(base.graph, None))
    down = input_wider_than(hidden)  # the MLP down projections
    n_down = sum(down(n) for n in quantizable_matmuls(base.graph, produces_graph_output))
    assert n_down > 0
    model = ir.load(canonical_onnx("gqa"))
    QuantizeActivationsPass(ActivationMode.STATIC, stats, 0.5, skip=produces_graph_output, per_token=down)(model)
    FuseInt8MatMulPass()(model)
    check_full(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("ReduceMax") == n_down  # one per-token scale per down projection input
    assert ops.count("MatMulIntegerToFloat") == len(quantizable_matmuls(base.graph, produces_graph_output))
    assert "DequantizeLinear" not in ops
    feeds = canonical_feeds(base, seed=3)
    (ref,) = run_ort(base, feeds, ["logits"])
    (y,) = run_ort(model, feeds, ["logits"])
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.08


def test_8bit_weight_codes_are_not_fused_unless_allowed():
    w = RNG.standard_normal((32, 16)).astype(np.float32)
    m = single_matmul(("M", 32), w)
    QuantizeActivationsPass(weight_bits=8)(m)
    assert not FuseInt8MatMulPass()(m.clone()).modified
    assert FuseInt8MatMulPass(allow_8bit_weights=True)(m).modified


def test_outlier_channel_no_saturation_blowup():
    """Activation outlier channel (80x): the fused int8 path stays within a few % of float."""
    w = (RNG.standard_normal((128, 96)) * 0.05).astype(np.float32)
    x = outlier_activations((1, 64, 128), factor=80.0)
    m = single_matmul(("B", "S", 128), w)
    QuantizeActivationsPass()(m)
    FuseInt8MatMulPass()(m)
    (y,) = run_ort(m, {"x": x}, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    ref = x @ w
    assert np.abs(y - ref).max() / np.abs(ref).max() < 0.05
