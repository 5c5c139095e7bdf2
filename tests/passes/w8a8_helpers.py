"""Shared helpers of the W8A8 pass tests: ORT runs of ir models, feeds for canonical graphs, a
one-MatMul model with an outlier activation channel, and calibration statistics via ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from twophase.passes.quantize_activations import weight_of


def run_ort(model: ir.Model, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
            level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    proto = ir.serde.serialize_model(_in_memory(model))
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def _in_memory(model: ir.Model) -> ir.Model:
    """A copy with every external tensor loaded, so the proto can be used without files."""
    return ir.external_data.load_to_model(model.clone())


def check_full(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(_in_memory(model)), full_check=True)


def canonical_feeds(model: ir.Model, seq: int = 9, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random prompt feeds for a canonical graph with an empty past."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for v in model.graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(3, 90, size=(batch, seq)).astype(np.int64)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones((batch, seq), np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:  # past_key_values.*: [B, kv, 0, D]
            dims = [d if isinstance(d, int) else 0 for d in v.shape.dims]
            dims[0] = batch
            feeds[v.name] = np.zeros(dims, np.float32)
    return feeds


def single_matmul(x_shape: tuple, w: np.ndarray, opset: int = 21) -> ir.Model:
    """y = MatMul(x, W) with W an initializer."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return ir.serde.deserialize_model(m)


def outlier_activations(shape: tuple, channel: int = 3, factor: float = 60.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., channel] *= factor
    return x


def activation_absmax(model: ir.Model, feeds_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel absmax of every constant-weight MatMul's activation input, through ORT."""
    m = model.clone()
    names = sorted({n.inputs[0].name for n in m.graph if weight_of(n) is not None})
    values = {v.name: v for n in m.graph for v in n.inputs if v is not None and v.name in names}
    for name in names:
        m.graph.outputs.append(values[name])
    stats: dict[str, np.ndarray] = {}
    for feeds in feeds_list:
        for name, arr in zip(names, run_ort(m, feeds, names)):
            a = np.abs(arr.reshape(-1, arr.shape[-1])).max(axis=0)
            stats[name] = np.maximum(stats[name], a) if name in stats else a
    return stats
