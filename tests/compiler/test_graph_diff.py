"""diff_models / op_histogram / initializer_bytes_by_dtype on small hand-built graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from twophase.compiler.graph_diff import (
    GraphDiff,
    diff_models,
    initializer_bytes_by_dtype,
    op_histogram,
)


def _model_a() -> onnx.ModelProto:
    """x[N,4] + W -> Relu -> If(cond){Identity} -> z;  y[N] unused;  E unused initializer."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])],
    )
    nodes = [
        helper.make_node("Add", ["x", "W"], ["a"], name="add0"),
        helper.make_node("Relu", ["a"], ["r"], name="relu0"),
        helper.make_node("If", ["cond"], ["z"], name="if0", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes,
        "a",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("y", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            numpy_helper.from_array(np.ones(4, np.float32), "W"),
            numpy_helper.from_array(np.arange(2, dtype=np.int64), "E"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _model_b() -> onnx.ModelProto:
    """x now [N,8]; y removed, m added; W now float16; E removed; Q (int4) added; extra output w;
    Relu replaced by a com.microsoft op; the If is gone."""
    nodes = [
        helper.make_node("Add", ["x", "W"], ["a"], name="add0"),
        helper.make_node("MatMulNBits", ["a", "Q"], ["z"], name="mmnb", domain="com.microsoft", K=8, N=8,
                         bits=4, block_size=16),
        helper.make_node("Cast", ["m"], ["w"], to=TensorProto.FLOAT),
    ]
    q = helper.make_tensor("Q", TensorProto.INT4, [5], [1, 2, 3, 4, 5])
    graph = helper.make_graph(
        nodes,
        "b",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("m", TensorProto.BOOL, ["N"]),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[numpy_helper.from_array(np.ones(4, np.float16), "W"), q],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def test_op_histogram_counts_subgraphs_and_qualifies_domains():
    assert op_histogram(_model_a()) == {"Add": 1, "Relu": 1, "If": 1, "Identity": 1, "Neg": 1}
    assert op_histogram(_model_b()) == {"Add": 1, "com.microsoft::MatMulNBits": 1, "Cast": 1}


def test_initializer_bytes_by_dtype_packs_int4():
    assert initializer_bytes_by_dtype(_model_a()) == {"float32": 16, "int64": 16}
    assert initializer_bytes_by_dtype(_model_b()) == {"float16": 8, "int4": 3}


def test_diff_fields():
    d = diff_models(_model_a(), _model_b())
    assert isinstance(d, GraphDiff)

    assert [(t.name, t.dtype, t.shape) for t in d.inputs_added] == [("m", "bool", ("N",))]
    assert {t.name for t in d.inputs_removed} == {"y", "cond"}
    assert len(d.inputs_changed) == 1
    ch = d.inputs_changed[0]
    assert (ch.name, ch.before.shape, ch.after.shape) == ("x", ("N", 4), ("N", 8))
    assert [t.name for t in d.outputs_added] == ["w"]
    assert d.outputs_removed == ()
    assert [(c.name, c.after.shape) for c in d.outputs_changed] == [("z", ("N", 8))]
    assert d.signature_changed

    assert d.op_delta == {
        "Cast": 1,
        "Identity": -1,
        "If": -1,
        "Neg": -1,
        "Relu": -1,
        "com.microsoft::MatMulNBits": 1,
    }
    assert d.ops_added() == {"Cast": 1, "com.microsoft::MatMulNBits": 1}
    assert d.ops_removed()["Relu"] == 1

    # Add -> a is in both graphs; everything else differs.
    assert (d.nodes_before, d.nodes_after) == (5, 3)
    assert d.nodes_added_count == 2 and d.nodes_removed_count == 4
    assert {(n.op, n.outputs) for n in d.nodes_added} == {
        ("com.microsoft::MatMulNBits", ("z",)),
        ("Cast", ("w",)),
    }
    assert ("Relu", ("r",)) in {(n.op, n.outputs) for n in d.nodes_removed}

    assert [(i.name, i.dtype, i.nbytes) for i in d.initializers_added] == [("Q", "int4", 3)]
    assert [(i.name, i.dtype, i.nbytes) for i in d.initializers_removed] == [("E", "int64", 16)]
    assert len(d.initializers_changed) == 1
    w = d.initializers_changed[0]
    assert (w.name, w.before.dtype, w.before.nbytes, w.after.dtype, w.after.nbytes) == (
        "W", "float32", 16, "float16", 8
    )
    assert d.initializer_bytes_before == {"float32": 16, "int64": 16}
    assert d.initializer_bytes_after == {"float16": 8, "int4": 3}
    assert not d.is_empty


def test_identical_models_give_an_empty_diff():
    d = diff_models(_model_a(), _model_a())
    assert d.is_empty
    assert d.op_delta == {} and not d.signature_changed
    assert "inputs: unchanged" in d.format()


def test_node_list_is_capped_but_counts_are_exact():
    d = diff_models(_model_a(), _model_b(), node_list_cap=1)
    assert d.nodes_removed_count == 4 and len(d.nodes_removed) == 1
    text = d.format(max_nodes=1)
    assert "... and 3 more" in text


def test_to_dict_is_json_and_format_mentions_each_change():
    d = diff_models(_model_a(), _model_b())
    data = json.loads(json.dumps(d.to_dict()))
    assert data["op_delta"]["com.microsoft::MatMulNBits"] == 1
    assert data["inputs"]["added"] == [{"name": "m", "dtype": "bool", "shape": ["N"]}]
    assert data["initializers"]["bytes_by_dtype_after"] == {"float16": 8, "int4": 3}
    assert data["nodes"]["added_count"] == 2
    text = d.format()
    for needle in ("+ m", "- y", "~ x", "float32[N, 4] -> float32[N, 8]", "com.microsoft::MatMulNBits",
                   "+1", "-1", "~ W", "int4", "total"):
        assert needle in text, needle


def test_accepts_ir_model_proto_and_path_without_reading_external_data(tmp_path: Path):
    big = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        initializer=[numpy_helper.from_array(np.ones((64, 32), np.float32), "B")],
    )
    proto = helper.make_model(big, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (tmp_path / "m.onnx.data").unlink()  # metadata only: the weights are never read

    from_path = diff_models(path, proto)
    assert from_path.is_empty
    assert initializer_bytes_by_dtype(str(path)) == {"float32": 64 * 32 * 4}
    assert op_histogram(ir.load(path)) == {"MatMul": 1}
    assert diff_models(ir.serde.deserialize_model(proto), path).is_empty
