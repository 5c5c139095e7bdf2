"""OrtPhase: session creation, options, and the signature check against the manifest's PhaseEntry."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.compiler.errors import ArtifactError, TwophaseError
from twophase.compiler.manifest import PhaseEntry, TensorSpec
from twophase.runtime.backend_ort import GraphOptLevel, OrtPhase, providers_for, session_options


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """y = x + 1 over float [batch, 3]."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "g", [x], [y], [one])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path_factory.mktemp("g") / "g.onnx"
    onnx.save(model, str(path))
    return path


def entry(x_dtype="float32", x_shape=("batch", 3), out="y", backend="ort") -> PhaseEntry:
    return PhaseEntry(
        "g.onnx", backend, "fp32", (TensorSpec("x", x_dtype, x_shape),), (TensorSpec(out, "float32", ("batch", 3)),)
    )


def test_runs_and_counts(graph):
    p = OrtPhase(graph, entry(), name="prefill", threads=1, opt_level=GraphOptLevel.DISABLE_ALL)
    assert p.input_names == ["x"] and p.output_names == ["y"]
    out = p.run({"x": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(out["y"], np.ones((2, 3), np.float32))
    assert p.calls == 1
    assert p.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(x_dtype="int64"), "dtype"),
        (dict(x_shape=("batch", 3, 1)), "rank"),
        (dict(x_shape=("batch", 4)), "dim 1"),
        (dict(out="logits"), "logits"),
        (dict(backend="tvm"), "tvm"),
    ],
)
def test_signature_mismatch(graph, bad, match):
    with pytest.raises(ArtifactError, match=match):
        OrtPhase(graph, entry(**bad))


def test_unloadable_graph(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not a protobuf")
    with pytest.raises(ArtifactError, match="bad.onnx"):
        OrtPhase(p, entry())


def test_devices_and_threads():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(TwophaseError, match="unknown device"):
        providers_for("tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(TwophaseError, match="CUDAExecutionProvider"):
            providers_for("cuda")
    with pytest.raises(TwophaseError, match="threads"):
        session_options(threads=0)
    assert session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert session_options(prepack=False).get_session_config_entry("session.disable_prepacking") == "1"
