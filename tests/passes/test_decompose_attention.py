"""DecomposeAttentionPass on the tiny decoders: no opset-23 RotaryEmbedding / Attention left, the same
logits and present K/V as the original graph (prefill with a left-padded batch, decode), a causal
Attention, and the forms it leaves alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from passes.ort_helpers import checked_session
from passes.test_quantize_weights import decode_feeds
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase
from twophase.passes.decompose_attention import DecomposeAttentionPass
from twophase.passes.split_phases import SplitPhasesPass


def _prefill_feeds():
    ids = np.array([[5, 9, 17, 33, 2, 40], [7, 7, 11, 12, 13, 14]], dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded: its first 3 queries see no key at all
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)}


@pytest.mark.parametrize("name", ["gqa16", "odd"])
@pytest.mark.parametrize("phase", [Phase.PREFILL, Phase.DECODE])
def test_decomposed_graph_is_standard_and_equal(canonical_onnx, tmp_path, name, phase):
    before = SplitPhasesPass(phase)(ir.load(canonical_onnx(name))).model
    hist = op_histogram(before)
    layers = hist["Attention"]
    model = before.clone()
    p = DecomposeAttentionPass()
    assert p(model).modified and p.skipped == []
    d = diff_models(before, model)
    assert d.op_delta["Attention"] == -layers and d.op_delta["RotaryEmbedding"] == -2 * layers
    assert d.op_delta["Softmax"] == layers and d.op_delta["Where"] == layers  # the boolean padding mask
    assert not d.signature_changed
    feeds = _prefill_feeds() if phase is Phase.PREFILL else decode_feeds(before)
    want = checked_session(before, tmp_path / "a.onnx").run(None, feeds)
    got = checked_session(model, tmp_path / "b.onnx").run(None, feeds)
    real = feeds["attention_mask"].astype(bool)  # [B, T]: padding positions' K/V are never read
    for w, g in zip(want, got):
        assert np.isfinite(g).all()
        if g.ndim == 4 and g.shape[2] == real.shape[1]:  # present [B, H, T, D]: compare the real positions
            g, w = g.transpose(0, 2, 1, 3)[real], w.transpose(0, 2, 1, 3)[real]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _single(node_kwargs: dict, inputs: list, attrs: dict) -> ir.Model:
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 3, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 5, 8])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 5, 8])
    graph = helper.make_graph([helper.make_node("Attention", inputs, ["y"], **attrs, **node_kwargs)], "g",
                              [q, k, v], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 8])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_causal_attention_with_more_keys_than_queries(tmp_path):
    before = _single({}, ["q", "k", "v"], {"is_causal": 1, "scale": 0.3})
    model = before.clone()
    DecomposeAttentionPass()(model)
    assert op_histogram(model)["Attention"] == 0
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("q", (1, 2, 3, 8)), ("k", (1, 2, 5, 8)), ("v", (1, 2, 5, 8)))}
    want = checked_session(before, tmp_path / "a.onnx").run(None, feeds)[0]
    got = checked_session(model, tmp_path / "b.onnx").run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_forms_it_leaves_alone():
    model = _single({}, ["q", "k", "v"], {"softcap": 30.0})
    p = DecomposeAttentionPass()
    assert not p(model).modified and "softcap" in p.skipped[0]
