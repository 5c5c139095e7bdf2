"""FuseSkipNormPass on the tiny decode graphs: graph diff and numerics against the unfused graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from passes.ort_helpers import checked_session
from passes.test_quantize_weights import decode_feeds
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase
from twophase.passes.fuse_skip_norm import FuseSkipNormPass
from twophase.passes.split_phases import SplitPhasesPass

SKIP = "com.microsoft::SkipSimplifiedLayerNormalization"


@pytest.mark.parametrize("name", ["gqa", "odd"])
def test_graph_diff_and_numerics(canonical_onnx, tmp_path, name):
    before = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx(name))).model
    model = before.clone()
    layers = sum(1 for v in model.graph.inputs if v.name.endswith(".key"))
    norms = op_histogram(model)["RMSNormalization"]
    assert FuseSkipNormPass()(model).modified
    d = diff_models(before, model)
    # every norm but the first layer's input norm follows a residual Add: 2 per layer, the final norm included
    assert d.op_delta == {"RMSNormalization": -(norms - 1), "Add": -(norms - 1), SKIP: norms - 1}
    assert norms - 1 == 2 * layers
    assert not d.signature_changed and not d.initializers_added and not d.initializers_removed
    feeds = decode_feeds(before)
    want = checked_session(before, tmp_path / "a.onnx").run(None, feeds)
    got = checked_session(model, tmp_path / "b.onnx").run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_add_with_broadcast_is_left_alone():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("RMSNormalization", ["s", "g"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert not FuseSkipNormPass()(model).modified
