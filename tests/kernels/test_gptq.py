"""GPTQ: the blocked implementation equals the unblocked reference (codes and scales), it beats
round-to-nearest (kernels/quant.py's quantize_rtn, same grid) on the output error ||X W - X W_q|| for
correlated inputs, reduces to that RTN bit for bit when the inputs are uncorrelated, and honours
QuantizedWeight's format; plus the quantizer hook."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.kernels.formats import QuantizedWeight
from twophase.kernels.gptq import block_params, gptq_quantize, gptq_quantizer, gptq_reference
from twophase.kernels.quant import quantize_rtn


def rtn_quantize(W: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = True) -> QuantizedWeight:
    return quantize_rtn(W, bits=bits, block_size=block_size, symmetric=symmetric)


def correlated_problem(K: int = 96, N: int = 40, T: int = 512, seed: int = 0):
    """Inputs with correlated channels of very different scales (as LLM activations have)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(K, K)) / np.sqrt(K) + np.eye(K)
    X = (rng.normal(size=(T, K)) @ mix) * rng.uniform(0.2, 3.0, size=K)
    W = rng.normal(size=(K, N)).astype(np.float32)
    return X, W, X.T @ X


def out_err(X: np.ndarray, W: np.ndarray, q: QuantizedWeight) -> float:
    return float(np.linalg.norm(X @ (W - q.dequantize())))


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    np.testing.assert_array_equal(a.codes_KN, b.codes_KN)
    np.testing.assert_allclose(a.scale_GN, b.scale_GN, rtol=1e-6)
    if b.zero_point_GN is None:
        assert a.zero_point_GN is None
    else:
        np.testing.assert_array_equal(a.zero_point_GN, b.zero_point_GN)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size, lazy_rows", [(16, 32), (32, 8), (32, 128), (128, 128), (256, 64)])
def test_blocked_equals_reference(symmetric, act_order, block_size, lazy_rows):
    _, W, H = correlated_problem(K=100)  # K not a multiple of the block size
    fast = gptq_quantize(W, H, block_size=block_size, symmetric=symmetric, act_order=act_order, lazy_rows=lazy_rows)
    ref = gptq_reference(W, H, block_size=block_size, symmetric=symmetric, act_order=act_order)
    assert_same(fast, ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [32, 128])
def test_beats_rtn_on_output_error(symmetric, act_order, block_size):
    X, W, H = correlated_problem()
    rtn = out_err(X, W, rtn_quantize(W, block_size=block_size, symmetric=symmetric))
    gptq = out_err(X, W, gptq_quantize(W, H, block_size=block_size, symmetric=symmetric, act_order=act_order))
    assert gptq < 0.85 * rtn


def test_generalizes_to_held_out_inputs():
    """Hessian from one sample of inputs, error measured on another sample of the same distribution."""
    X, W, H = correlated_problem(seed=0)
    rng = np.random.default_rng(7)
    Xt = X[rng.permutation(len(X))][:256] + 0.01 * rng.normal(size=(256, X.shape[1]))
    rtn = out_err(Xt, W, rtn_quantize(W))
    assert out_err(Xt, W, gptq_quantize(W, H, act_order=True)) < 0.85 * rtn


def test_uncorrelated_inputs_reduce_to_rtn():
    """With a diagonal Hessian no error is propagated: GPTQ (without act_order) is round-to-nearest."""
    _, W, _ = correlated_problem()
    H = np.diag(np.linspace(1.0, 5.0, W.shape[0]))
    assert_same(gptq_quantize(W, H), rtn_quantize(W))
    assert_same(gptq_quantize(W, H, symmetric=False, block_size=64), rtn_quantize(W, symmetric=False, block_size=64))


@pytest.mark.parametrize("symmetric", [True, False])
def test_format(symmetric):
    _, W, H = correlated_problem(K=70, N=9)
    q = gptq_quantize(W, H, block_size=32, symmetric=symmetric)
    assert q.shape == (70, 9) and q.bits == 4 and q.block_size == 32
    assert q.scale_GN.shape == (3, 9) and q.scale_GN.dtype == np.float32 and np.all(q.scale_GN != 0)
    if symmetric:
        assert q.codes_KN.dtype == np.int8 and q.zero_point_GN is None and q.signed
        assert q.codes_KN.min() >= -8 and q.codes_KN.max() <= 7 and q.codes_KN.min() == -8  # all 16 levels
    else:
        assert q.codes_KN.dtype == np.uint8 and q.zero_point_GN.dtype == np.uint8 and not q.signed
        assert q.codes_KN.max() <= 15 and q.zero_point_GN.max() <= 15
    assert q.dequantize().shape == W.shape and q.dequantize().dtype == np.float32


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_grid_is_quant_py_grid(bits, symmetric):
    """block_params reproduces quantize_rtn's scales and zero points (its grids: Q4_0-style int4 with
    s = w*/-8, int8 absmax/127, asymmetric uint with an integer zero point)."""
    rng = np.random.default_rng(5)
    W = (rng.normal(size=(64, 12)) * rng.uniform(0.1, 2, size=12)).astype(np.float32)
    W[:32, 3] = 0.0  # an all-zero block gets scale 1
    ref = rtn_quantize(W, bits=bits, block_size=32, symmetric=symmetric)
    for g in range(2):
        s, z = block_params(W[g * 32 : (g + 1) * 32].astype(np.float64), bits, symmetric)
        np.testing.assert_array_equal(s.astype(np.float32), ref.scale_GN[g])
        if symmetric:
            assert z is None
        else:
            np.testing.assert_array_equal(z.astype(np.uint8), ref.zero_point_GN[g])
    H = np.eye(64)
    assert_same(gptq_quantize(W, H, bits=bits, symmetric=symmetric), ref)
    assert_same(gptq_quantize(W, H, bits=bits, symmetric=symmetric, act_order=True), ref)


def test_dead_channels_and_rank_deficient_hessian():
    """Fewer tokens than channels (singular H) is handled by damping; an input channel that is always
    zero (H[k, k] == 0) carries no information and its weight row is quantized to 0."""
    rng = np.random.default_rng(3)
    K, N = 64, 8
    X = rng.normal(size=(20, K))
    X[:, 5] = 0.0
    W = rng.normal(size=(K, N)).astype(np.float32)
    q = gptq_quantize(W, X.T @ X, act_order=True)
    assert np.all(q.dequantize()[5] == 0) and np.all(np.isfinite(q.dequantize()))
    assert out_err(X, W, q) < out_err(X, W, rtn_quantize(W))


def test_quantizer_hook():
    _, W, H = correlated_problem(K=64, N=16)
    hook = gptq_quantizer({"w": H}, block_size=16)
    assert_same(hook("w", W), gptq_quantize(W, H, block_size=16, act_order=True))  # act_order on by default
    assert hook("embed", W) is None  # no Hessian: QuantizeWeightsPass rounds to nearest itself
    hook2 = gptq_quantizer({"w": H}, block_size=16, symmetric=False, act_order=False)
    assert_same(hook2("w", W), gptq_quantize(W, H, block_size=16, symmetric=False))


def test_bad_arguments():
    _, W, H = correlated_problem(K=32, N=4)
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(W, H[:16, :16])
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(W[0], H)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(W, H, bits=3)
