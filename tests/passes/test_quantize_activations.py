"""QuantizeActivationsPass and SmoothQuantPass: NumPy references of the quantize/dequantize formulas,
graph-diff tests on the tiny canonical decoders (ops, initializer dtypes and bytes, full check) and
numerics against the unrewritten graph in ORT (ORT_ENABLE_BASIC)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
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
from twophase.passes.quantize_activations import (
    QuantizeActivationsPass,
    input_wider_than,
    per_token_scale,
    produces_graph_output,
    quantizable_matmuls,
    quantize_symmetric,
    quantize_weight_per_channel,
    reference_w8a8_matmul,
)
from twophase.passes.smooth_quant import SmoothQuantPass, smoothing_factors

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ NumPy references


@pytest.mark.parametrize("bits", [7, 8])
def test_weight_per_channel_codes_and_error(bits):
    w = RNG.standard_normal((40, 24)).astype(np.float32)
    w[:, 5] = 0.0  # an all-zero channel keeps a finite scale and zero codes
    q = quantize_weight_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.codes_KN.dtype == np.int8 and q.scale_N.dtype == np.float32
    assert np.abs(q.codes_KN).max() == qmax  # the largest |w| of each nonzero channel maps to qmax
    assert np.all(q.codes_KN[:, 5] == 0) and np.isfinite(q.scale_N).all()
    # round to nearest: error at most half a step per channel
    assert np.all(np.abs(q.dequantize() - w) <= q.scale_N[None, :] / 2 + 1e-7)


def test_per_token_scale_and_symmetric_quantization():
    x = RNG.standard_normal((6, 16)).astype(np.float32)
    x[2] = 0.0
    s = per_token_scale(x)
    np.testing.assert_allclose(s[[0, 1, 3]], np.abs(x[[0, 1, 3]]).max(1) / 127, rtol=1e-6)
    assert s[2] > 0
    q = quantize_symmetric(x, s[:, None])
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and np.all(q[2] == 0)
    np.testing.assert_array_equal(quantize_symmetric(np.array([0.5, 1.5, 2.5, -0.5], np.float32), 1.0), [0, 2, 2, 0])


def test_qdq_graph_matches_numpy_reference_exactly():
    """The dynamic and static QDQ graphs compute what reference_w8a8_matmul says (float32 rounding)."""
    w = RNG.standard_normal((32, 20)).astype(np.float32)
    x = outlier_activations((2, 5, 32))
    qw = quantize_weight_per_channel(w, 7)
    for mode, stats in ((ActivationMode.DYNAMIC, None), (ActivationMode.STATIC, {"x": np.abs(x).max((0, 1))})):
        m = single_matmul(("B", "S", 32), w)
        QuantizeActivationsPass(mode, calibration=stats)(m)
        (y,) = run_ort(m, {"x": x})
        static = None if stats is None else float(stats["x"].max()) / 127
        ref = reference_w8a8_matmul(x, qw, mode, static)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_per_token_matmuls_with_their_own_smoothquant_alpha(canonical_onnx):
    """STATIC with `per_token` down projections: per-token QDQ exactly there; a second alpha for
    them changes only them (equal alphas give the single-alpha graph's outputs)."""
    before = ir.load(canonical_onnx("gqa"))
    calib = [canonical_feeds(before, seed=s) for s in (1, 2)]
    stats = activation_absmax(before, calib)
    feeds = canonical_feeds(before, seed=3)
    (ref,) = run_ort(before, feeds, ["logits"])
    hidden = min(n.inputs[1].shape[0] for n in quantizable_matmuls(before.graph, None))
    down = input_wider_than(hidden)  # the MLP down projections
    n_down = sum(down(n) for n in quantizable_matmuls(before.graph, produces_graph_output))
    outs = {}
    for second in (None, 0.8, 0.3):
        model = ir.load(canonical_onnx("gqa"))
        QuantizeActivationsPass(ActivationMode.STATIC, stats, 0.8, skip=produces_graph_output, per_token=down,
                                per_token_smoothquant_alpha=second)(model)
        check_full(model)
        assert sum(n.op_type == "ReduceMax" for n in model.graph) == n_down
        (outs[second],) = run_ort(model, feeds, ["logits"])
        assert np.linalg.norm(outs[second] - ref) / np.linalg.norm(ref) < 0.08
    np.testing.assert_array_equal(outs[None], outs[0.8])
    assert not np.array_equal(outs[None], outs[0.3])
    with pytest.raises(ValueError, match="per_token_smoothquant_alpha"):
        QuantizeActivationsPass(ActivationMode.STATIC, stats, 0.8, per_token_smoothquant_alpha=0.4)


# ------------------------------------------------------------------ graph diff on tiny decoders


@pytest.mark.parametrize("name", ALL_TINY)
def test_dynamic_graph_diff_and_numerics(canonical_onnx, name):
    before = ir.load(canonical_onnx(name))
    model = ir.load(canonical_onnx(name))
    matmuls = quantizable_matmuls(model.graph, produces_graph_output)
    acts = {id(n.inputs[0]) for n in matmuls}
    K_N = [tuple(n.inputs[1].shape.dims) for n in matmuls]
    result = QuantizeActivationsPass(skip=produces_graph_output)(model)
    assert result.modified
    check_full(model)

    d = diff_models(before, model)
    assert d.op_delta.get("MatMul", 0) == 0  # each MatMul replaced by one on dequantized operands
    assert d.op_delta["QuantizeLinear"] == len(acts)
    assert d.op_delta["DequantizeLinear"] == len(acts) + len(matmuls)
    assert d.op_delta["ReduceMax"] == len(acts) and d.op_delta["Abs"] == len(acts)
    assert not d.inputs_changed and not d.outputs_changed and not d.inputs_added and not d.outputs_added
    removed = {i.name: i for i in d.initializers_removed}
    assert len([i for i in removed.values() if i.dtype == "float32"]) == len(matmuls)
    int8 = [i for i in d.initializers_added if i.dtype == "int8"]
    assert sorted(i.nbytes for i in int8) == sorted(k * n for k, n in K_N)  # 1 byte per weight
    assert d.initializer_bytes_after.get("int8", 0) - d.initializer_bytes_before.get("int8", 0) == sum(k * n for k, n in K_N)
    # the lm_head (a graph output MatMul) stays float
    assert any(n.op_type == "MatMul" and produces_graph_output(n) and n.inputs[1].dtype == ir.DataType.FLOAT
               for n in model.graph)

    feeds = canonical_feeds(before)
    ref = run_ort(before, feeds, ["logits"])[0]
    got = run_ort(model, feeds, ["logits"])[0]
    # 7-bit weights (step |w|max/63) and 8-bit per-token activations: a few percent relative error
    # on random tiny weights, far below the spread of the logits (the lm_head scales them by 8).
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 0.05, err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_quantize_all_including_lm_head(canonical_onnx):
    model = ir.load(canonical_onnx("gqa"))
    n = len(quantizable_matmuls(model.graph, None))
    QuantizeActivationsPass()(model)
    check_full(model)
    assert not [m for m in model.graph if m.op_type == "MatMul" and m.inputs[1].producer() is None]
    assert len([m for m in model.graph if m.op_type == "MatMul"]) == n


def test_static_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        QuantizeActivationsPass(ActivationMode.STATIC)
    with pytest.raises(ValueError, match="calibration"):
        QuantizeActivationsPass(smoothquant_alpha=0.5)


def test_static_and_smoothquant_numerics(canonical_onnx):
    before = ir.load(canonical_onnx("gqa"))
    calib = [canonical_feeds(before, seed=s) for s in (1, 2)]
    stats = activation_absmax(before, calib)
    feeds = canonical_feeds(before, seed=3)
    ref = run_ort(before, feeds, ["logits"])[0]
    for mode in (ActivationMode.STATIC, ActivationMode.DYNAMIC):
        model = ir.load(canonical_onnx("gqa"))
        QuantizeActivationsPass(mode, stats, smoothquant_alpha=0.5, skip=produces_graph_output)(model)
        check_full(model)
        got = run_ort(model, feeds, ["logits"])[0]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.08, mode


# ------------------------------------------------------------------ SmoothQuant


def test_smoothing_factors_reference():
    a = np.array([1.0, 16.0, 0.0, 4.0], np.float32)
    w = np.array([1.0, 1.0, 2.0, 0.0], np.float32)
    np.testing.assert_allclose(smoothing_factors(a, w, 0.5), [1.0, 4.0, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_factors(a, np.array([4.0, 4.0, 1, 1], np.float32), 1.0), [1.0, 16.0, 1.0, 4.0])


@pytest.mark.parametrize("name", ALL_TINY)
def test_smoothquant_preserves_function(canonical_onnx, name):
    """Smoothing alone is an exact reparametrization: logits unchanged up to float rounding."""
    before = ir.load(canonical_onnx(name))
    model = ir.load(canonical_onnx(name))
    stats = activation_absmax(before, [canonical_feeds(before, seed=1)])
    # exaggerate one channel so the factors are far from 1
    stats = {k: v * np.where(np.arange(v.size) == 1, 50.0, 1.0).astype(np.float32) for k, v in stats.items()}
    sq = SmoothQuantPass(stats, 0.5, skip=produces_graph_output)
    assert sq(model).modified
    check_full(model)
    d = diff_models(before, model)
    # folded into norms and up_proj; only the attention output (o_proj input) needs an explicit Mul
    n_layers = len([n for n in before.graph if n.op_type == "Attention"]) or d.op_delta.get("Mul", 0)
    assert d.op_delta.get("Mul", 0) == n_layers
    assert not d.initializers_changed  # values rescaled in place: same names, dtypes and shapes
    feeds = canonical_feeds(before, seed=4)
    ref = run_ort(before, feeds, ["logits"])[0]
    got = run_ort(model, feeds, ["logits"])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert set(sq.smoothed_stats) >= {n.inputs[0].name for n in quantizable_matmuls(model.graph, produces_graph_output)}


def test_outlier_channel_per_token_error_is_small():
    """An activation channel 60x the others: per-token int8 + 7-bit weights stays within a few %."""
    w = (RNG.standard_normal((64, 48)) * 0.05).astype(np.float32)
    x = outlier_activations((1, 33, 64), factor=60.0)
    m = single_matmul(("B", "S", 64), w)
    QuantizeActivationsPass()(m)
    (y,) = run_ort(m, {"x": x})
    ref = x @ w
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.05
