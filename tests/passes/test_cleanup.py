"""Graph-diff tests of CleanupPass: a hand-built graph with each kind of waste, and the tiny
canonical decoders (signature and numerics unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import ALL_TINY
from onnx import TensorProto, helper, numpy_helper

from passes.ort_helpers import checked_session
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.passes.cleanup import CleanupPass


def _wasteful_model(tmp_path: Path) -> Path:
    """y = MatMul(x * 1, Transpose(W_big)) reshaped by a folded shape, plus dead code:

    shape = Concat(Shape(x)[0:1], Add(c2, c2))      # Add over constants folds to [4]
    dead  = Relu(x);  U: an unused initializer;  W_big: 128x128 (over the fold limit), external.
    """
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, np.float32))),
        helper.make_node("Mul", ["x", "one"], ["x1"]),
        helper.make_node("Transpose", ["W_big"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x1", "Wt"], ["h"]),  # [N, 128]
        helper.make_node("Add", ["c2", "c2"], ["c4"]),  # [4]  (folds)
        helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
        helper.make_node("Concat", ["n", "c_neg1", "c4"], ["shape"], axis=0),  # [N, -1, 4]
        helper.make_node("Reshape", ["h", "shape"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes,
        "waste",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 4])],
        initializer=[
            numpy_helper.from_array(np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32), "W_big"),
            numpy_helper.from_array(np.array([2], np.int64), "c2"),
            numpy_helper.from_array(np.array([-1], np.int64), "c_neg1"),
            numpy_helper.from_array(np.zeros(10, np.float32), "U"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "waste.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="waste.onnx.data", size_threshold=1024)
    return path


def test_cleanup_folds_and_removes_dead_code_without_loading_large_weights(tmp_path: Path):
    path = _wasteful_model(tmp_path)
    before = ir.load(path)
    model = ir.load(path)
    result = CleanupPass()(model)
    assert result.modified and result.model is model

    d = diff_models(before, model)
    # Mul by 1, the dead Relu, the constant Add and the Constant node are gone, the Reshape target
    # became a constant [0, -1, 4] (so Shape and Concat went too); Transpose(W_big) is kept because
    # folding it would materialize a second in-memory copy of a large weight.
    assert d.op_delta == {"Add": -1, "Concat": -1, "Constant": -1, "Mul": -1, "Relu": -1, "Shape": -1}
    assert not d.signature_changed
    removed = {i.name for i in d.initializers_removed}
    assert {"U", "c2"} <= removed
    w = model.graph.initializers["W_big"].const_value
    assert isinstance(w, ir.ExternalTensor), type(w)
    assert model.graph.node(0).op_type != "Relu"
    assert all(n.op_type != "Relu" for n in model.graph)
    # Topologically sorted, shapes inferred.
    seen = set(model.graph.inputs) | set(model.graph.initializers.values())
    for node in model.graph:
        assert all(v is None or v in seen for v in node.inputs), node
        seen.update(node.outputs)
    assert all(o.shape is not None for n in model.graph for o in n.outputs)

    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    ref = checked_session(ir.load(path), tmp_path / "ref.onnx").run(None, {"x": x})[0]
    out = checked_session(model, tmp_path / "clean.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_cleanup_is_idempotent_and_honest(tmp_path: Path):
    model = ir.load(_wasteful_model(tmp_path))
    assert CleanupPass()(model).modified
    assert not CleanupPass()(model).modified


@pytest.mark.parametrize("name", ALL_TINY)
def test_cleanup_on_canonical_graph(canonical_onnx, tmp_path: Path, name: str):
    path = canonical_onnx(name)
    before = ir.load(path)
    model = ir.load(path)
    assert CleanupPass()(model).modified

    d = diff_models(before, model)
    assert not d.signature_changed
    # Every rotary layer recomputed Cos/Sin of the same positions; CSE keeps one of each.
    hist = op_histogram(before)
    assert d.op_delta == {"Cos": 1 - hist["Cos"], "Sin": 1 - hist["Sin"]}
    assert hist["Cos"] > 1
    assert not d.initializers_added and not d.initializers_changed

    feeds = _canonical_feeds(before, batch=2, seq=5, past=3)
    ref = checked_session(before, tmp_path / "ref.onnx").run(None, feeds)
    out = checked_session(model, tmp_path / "clean.onnx").run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def _canonical_feeds(model: ir.Model, batch: int, seq: int, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, past + seq), np.int64)
    mask[1, :2] = 0  # left padding in row 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
    feeds = {
        "input_ids": rng.integers(0, 97, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "position_ids": pos.astype(np.int64),
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            _, h, _, dim = v.shape
            feeds[v.name] = rng.standard_normal((batch, h, past, dim)).astype(np.float32)
    return feeds
