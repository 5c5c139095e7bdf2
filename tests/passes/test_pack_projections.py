"""PackProjectionsPass on the tiny decode graphs: float MatMul, MatMulNBits, the float-offset (GGUF Q4_1)
correction form, and packed QKV into GroupQueryAttention; graph diff and numerics against the unpacked graph."""

from __future__ import annotations

import gguf
import numpy as np
import onnx_ir as ir
import pytest

from passes.ort_helpers import checked_session
from passes.test_quantize_weights import EMBED, decode_feeds, substituted, weights
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase, WeightAlgorithm
from twophase.passes.bind_kv_cache import BindKVCachePass
from twophase.passes.fuse_dequant_matmul import FuseDequantMatMulPass
from twophase.passes.pack_projections import PackProjectionsPass
from twophase.passes.quantize_weights import QuantizeWeightsPass
from twophase.passes.split_phases import SplitPhasesPass, find_lm_head

NBITS = "com.microsoft::MatMulNBits"


def _decode(canonical_onnx, name: str) -> ir.Model:
    return SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx(name))).model


def _q4_1(model: ir.Model) -> ir.Model:
    """Every MatMul weight on a GGUF Q4_1 grid (float offsets), embedding and lm_head Q8_0."""
    lm_head = find_lm_head(model.graph).inputs[1].name
    new = {}
    for name, W in weights(model).items():
        qtype = gguf.GGMLQuantizationType.Q8_0 if name in (EMBED, lm_head) else gguf.GGMLQuantizationType.Q4_1
        rows = np.ascontiguousarray(W if name == EMBED else W.T)
        deq = gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype).astype(np.float32)
        new[name] = deq if name == EMBED else np.ascontiguousarray(deq.T)
    return substituted(model, new)


def _check(before: ir.Model, after: ir.Model, tmp_path, feeds=None, atol=1e-5):
    feeds = feeds or decode_feeds(before)
    want = checked_session(before, tmp_path / "a.onnx").run(None, feeds)
    got = checked_session(after, tmp_path / "b.onnx").run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", ["gqa", "odd"])
def test_float_matmuls(canonical_onnx, tmp_path, name):
    before = _decode(canonical_onnx, name)
    layers = sum(1 for v in before.graph.inputs if v.name.endswith(".key"))
    model = before.clone()
    assert PackProjectionsPass()(model).modified
    d = diff_models(before, model)
    # per layer: q/k/v -> 1 MatMul + Split, gate/up -> 1 MatMul + Split
    assert d.op_delta == {"MatMul": -3 * layers, "Split": 2 * layers}
    widths = sorted(i.shape[-1] for i in d.initializers_added if len(i.shape) == 2)
    assert len(widths) == 2 * layers
    _check(before, model, tmp_path)


def test_matmulnbits_and_q4_1_correction(canonical_onnx, tmp_path):
    before = _q4_1(_decode(canonical_onnx, "gqa16"))
    QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GGUF)(before)
    FuseDequantMatMulPass(accuracy_level=1)(before)
    layers = sum(1 for v in before.graph.inputs if v.name.endswith(".key"))
    n_corr = op_histogram(before)["ReduceSum"]
    assert n_corr > 0
    model = before.clone()
    assert PackProjectionsPass()(model).modified
    d = diff_models(before, model)
    # the correction MatMuls and their Adds are packed with their MatMulNBits
    assert d.op_delta[NBITS] == -3 * layers
    assert d.op_delta["MatMul"] == -3 * layers and d.op_delta["Add"] == -3 * layers
    assert d.op_delta["Split"] == 2 * layers
    _check(before, model, tmp_path, atol=1e-4)


def test_packed_qkv_feeds_group_query_attention(canonical_onnx, tmp_path):
    before = _decode(canonical_onnx, "gqa16")
    BindKVCachePass(32)(before)
    layers = op_histogram(before)["com.microsoft::GroupQueryAttention"]
    model = before.clone()
    PackProjectionsPass()(model)
    d = diff_models(before, model)
    assert d.op_delta == {"MatMul": -3 * layers, "Split": layers}  # q/k/v go in packed: no Split
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.inputs[1] is None and gqa.inputs[2] is None
    heads, kv = (gqa.attributes[k].as_int() for k in ("num_heads", "kv_num_heads"))
    assert gqa.inputs[0].shape[-1] == (heads + 2 * kv) * 16  # head_dim 16
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, 97, (2, 1)), "seqlens_k": np.array([4, 2], np.int32),
             "total_sequence_length": np.array(5, np.int32), "query_seqlens": np.array([1, 1], np.int32)}
    for v in before.graph.inputs:
        if v.name.startswith("past_key_values."):
            feeds[v.name] = rng.standard_normal((2, v.shape[1], 8, v.shape[3])).astype(np.float32)
    _check(before, model, tmp_path, feeds)
