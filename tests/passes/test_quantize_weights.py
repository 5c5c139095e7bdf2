"""Graph-diff tests of QuantizeWeightsPass on the tiny canonical / decode graphs: DequantizeLinear
added per weight, float32 bytes traded for int8 / int4 ones, ONNX checker, and numerics vs the
unrewritten graph (ORT_ENABLE_BASIC, QDQ kept) — exact against the same graph holding the NumPy
dequantized weights, bit for bit when the weights sit on a GGUF grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from twophase.compiler.errors import PassError
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase, PhaseOptions, QuantScheme, WeightAlgorithm
from twophase.kernels.formats import QuantizedWeight
from twophase.kernels.quant import quantize_rtn
from twophase.passes.quantize_weights import QuantizeWeightsPass
from twophase.passes.split_phases import SplitPhasesPass, find_lm_head

gguf = pytest.importorskip("gguf")

EMBED = "model.model.embed_tokens.weight"
SCHEMES = {
    "int8-per-channel": {"bits": 8, "block_size": None},
    "int4-b32": {"bits": 4, "block_size": 32},
    "uint4-b16-asym": {"bits": 4, "block_size": 16, "symmetric": False},
    "int8-b16": {"bits": 8, "block_size": 16},
}


# -- helpers ----------------------------------------------------------------------------------


def session(model: ir.Model, path: Path) -> ort.InferenceSession:
    """Save, full-check and open with QDQ kept as is (the numerical reference of a QDQ graph)."""
    ir.save(model, path, external_data=path.name + ".data")
    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decode_feeds(model: ir.Model, past: int = 4, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(3, 97, (batch, 1)).astype(np.int64),
        "attention_mask": np.ones((batch, past + 1), np.int64),
        "position_ids": np.full((batch, 1), past, np.int64),
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            heads, dim = v.shape[1], v.shape[3]
            feeds[v.name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feeds


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    """MatMul weights and the embedding table: name -> float32 array."""
    out = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gather"):
            v = node.inputs[1 if node.op_type == "MatMul" else 0]
            if v.const_value is not None and v.is_initializer():
                out[v.name] = v.const_value.numpy()
    return out


def substituted(model: ir.Model, new: dict[str, np.ndarray]) -> ir.Model:
    """A copy of `model` whose named initializers hold other float32 values."""
    clone = model.clone()
    for name, array in new.items():
        clone.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32), name=name)
    return clone


@pytest.fixture(scope="module")
def decode_graph(canonical_onnx):
    cache: dict[str, ir.Model] = {}

    def make(name: str) -> ir.Model:
        if name not in cache:
            cache[name] = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx(name))).model
        return cache[name].clone()

    return make


def gguf_gridded(model: ir.Model) -> tuple[ir.Model, dict[str, str]]:
    """`model` with every weight replaced by its GGUF round trip: attention Q4_0, MLP / others Q4_1,
    embedding and lm_head Q8_0 (needs K % 32 == 0). Returns the model and name -> kind."""
    lm_head = find_lm_head(model.graph).inputs[1].name
    new, kinds = {}, {}
    for i, (name, W) in enumerate(weights(model).items()):
        kind = "Q8_0" if name in (EMBED, lm_head) else ("Q4_0" if i % 3 == 1 else "Q4_1")
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        rows = np.ascontiguousarray(W if name == EMBED else W.T)  # GGUF rows: output channels, K contiguous
        deq = gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype).astype(np.float32)
        new[name] = deq if name == EMBED else np.ascontiguousarray(deq.T)
        kinds[name] = kind.lower()
    return substituted(model, new), kinds


# -- graph diff -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_graph_diff(decode_graph, scheme: str):
    model = decode_graph("gqa")
    before = model.clone()
    W = weights(model)
    n_matmul = op_histogram(model)["MatMul"]
    matmul_weights = [n.inputs[1].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()]
    p = QuantizeWeightsPass(**SCHEMES[scheme])
    result = p(model)
    assert result.modified and result.model is model
    d = diff_models(before, model)

    # One DequantizeLinear per quantized consumer (all MatMul weights incl. the lm_head, and the Gather);
    # nothing else changes, the signature least of all.
    assert d.op_delta == {"DequantizeLinear": len(matmul_weights) + 1}
    assert op_histogram(model)["MatMul"] == n_matmul
    assert not d.signature_changed
    assert set(p.encoded) == set(W) and all(e.source == "rtn" for e in p.encoded.values())

    # The float weights are gone; codes, scales (and zero points) came in their place.
    assert {i.name for i in d.initializers_removed} == set(W)
    removed_f32 = sum(a.nbytes for a in W.values())
    assert d.initializer_bytes_before["float32"] - d.initializer_bytes_after.get("float32", 0) < removed_f32
    bits, sym = SCHEMES[scheme]["bits"], SCHEMES[scheme].get("symmetric", True)
    code_type = {(8, True): "int8", (4, True): "int4", (4, False): "uint4"}[(bits, sym)]
    n_codes = sum(a.size for a in W.values())
    added = {i.name: i for i in d.initializers_added}
    code_bytes = sum(i.nbytes for n, i in added.items() if n.endswith(".qcodes"))
    assert code_bytes == sum(int(np.ceil(a.size * bits / 8)) for a in W.values())
    assert d.initializer_bytes_after[code_type] >= n_codes * bits // 8
    for name, a in W.items():
        codes = added[f"{name}.qcodes"]
        assert codes.dtype == code_type and codes.shape == a.shape
        assert added[f"{name}.qscale"].dtype == "float32"
        assert (f"{name}.qzero" in added) == (not sym)
    total_before = sum(d.initializer_bytes_before.values())
    total_after = sum(d.initializer_bytes_after.values())
    assert total_after < total_before * (0.4 if bits == 8 else 0.3)


def test_dequantize_attributes(decode_graph):
    model = decode_graph("gqa")
    QuantizeWeightsPass(bits=4, block_size=32)(model)
    dqs = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    lin = dqs["val_83.qcodes"]  # a [48, 48] MatMul weight: blocks of 32 along K (axis 0)
    assert lin.attributes.get_int("axis") == 0 and lin.attributes.get_int("block_size") == 32
    assert lin.inputs[1].const_value.shape == (2, 48)  # ceil(48 / 32) blocks
    emb = dqs[f"{EMBED}.qcodes"]  # the table [V, D]: blocks along D (axis 1)
    assert emb.attributes.get_int("axis") == 1 and emb.attributes.get_int("block_size") == 32
    assert emb.inputs[1].const_value.shape == (97, 2)
    assert emb.outputs[0].uses()[0].node.op_type == "Gather"

    model = decode_graph("gqa")
    QuantizeWeightsPass(bits=8, block_size=None)(model)
    dqs = {n.inputs[0].name: n for n in model.graph if n.op_type == "DequantizeLinear"}
    assert dqs["val_83.qcodes"].attributes.get_int("axis") == 1  # per output channel of [K, N]
    assert dqs["val_83.qcodes"].inputs[1].const_value.shape == (48,)
    assert dqs[f"{EMBED}.qcodes"].attributes.get_int("axis") == 0  # per row of the table
    assert "block_size" not in dqs["val_83.qcodes"].attributes


@pytest.mark.parametrize("lm_head,embedding", [(False, True), (True, False), (False, False)])
def test_lm_head_and_embedding_can_stay_float(decode_graph, lm_head: bool, embedding: bool):
    model = decode_graph("gqa")
    head = find_lm_head(model.graph).inputs[1].name
    n_weights = len(weights(model))
    p = QuantizeWeightsPass(bits=4, block_size=32, include_lm_head=lm_head, include_embedding=embedding)
    p(model)
    assert op_histogram(model)["DequantizeLinear"] == n_weights - (not lm_head) - (not embedding)
    assert (head in model.graph.initializers) == (not lm_head)
    assert (EMBED in model.graph.initializers) == (not embedding)
    assert find_lm_head(model.graph) is not None  # still found through the DequantizeLinear


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("name", ["gqa", "odd"])
def test_numerics_match_dequantized_weights(decode_graph, tmp_path: Path, scheme: str, name: str):
    """The QDQ graph computes the model with W replaced by dequantize(codes): same logits to float rounding.
    Against the float model, the error is that of the weights: bounded below by the step sizes."""
    model = decode_graph(name)
    feeds = decode_feeds(model)
    ref = session(model, tmp_path / "float.onnx").run(None, feeds)
    p = QuantizeWeightsPass(**SCHEMES[scheme])
    W = weights(model)
    quantized = p(model.clone()).model
    out = session(quantized, tmp_path / "q.onnx").run(None, feeds)

    deq = {n: (e.weight.dequantize().T if n == EMBED else e.weight.dequantize()) for n, e in p.encoded.items()}
    exact = session(substituted(model, deq), tmp_path / "deq.onnx").run(None, feeds)
    for a, b in zip(out, exact):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)

    # Relative weight error: int8 per channel <= 1/254 of a channel's absmax per element, int4 blocks
    # <= 1/8 (one step of absmax/8, clipped side); logits move by the same order.
    rel_w = max(np.abs(deq[n] - W[n]).max() / np.abs(W[n]).max() for n in W)
    rel_logits = np.abs(out[0] - ref[0]).max() / np.abs(ref[0]).max()
    bits = SCHEMES[scheme]["bits"]
    assert rel_w <= (1 / 254 if bits == 8 else 1 / 8) * 1.001 or SCHEMES[scheme].get("block_size")
    assert rel_logits < (0.03 if bits == 8 else 0.25)
    if bits == 8:
        assert (out[0].argmax(-1) == ref[0].argmax(-1)).all()


def test_gguf_grid_is_bit_exact(decode_graph, tmp_path: Path):
    """Weights on Q4_0 / Q4_1 / Q8_0 grids keep them: the QDQ graph rebuilds W bit for bit (Q4_1 with its
    offset added by Expand + Reshape + Add), so the logits equal the float graph's exactly."""
    model, kinds = gguf_gridded(decode_graph("mha"))  # K in {32, 64}: whole GGUF blocks
    feeds = decode_feeds(model)
    ref = session(model, tmp_path / "float.onnx").run(None, feeds)
    before = model.clone()
    p = QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GGUF)
    p(model)
    assert {n: e.source for n, e in p.encoded.items()} == {n: f"gguf:{k}" for n, k in kinds.items()}
    n_q41 = sum(k == "q4_1" for k in kinds.values())
    d = diff_models(before, model)
    assert d.op_delta == {"DequantizeLinear": len(kinds), "Expand": n_q41, "Reshape": n_q41, "Add": n_q41}
    dtypes = {i.name: i.dtype for i in d.initializers_added}
    for name, kind in kinds.items():
        assert dtypes[f"{name}.qcodes"] == {"q4_0": "int4", "q4_1": "uint4", "q8_0": "int8"}[kind]
        assert (f"{name}.qoffset" in dtypes) == (kind == "q4_1")
    out = session(model, tmp_path / "gguf.onnx").run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


def test_gguf_algorithm_falls_back_to_rtn(decode_graph):
    model = decode_graph("gqa")  # K = 48 / 80: no whole GGUF blocks, plain float weights
    p = QuantizeWeightsPass(bits=4, block_size=16, algorithm=WeightAlgorithm.GGUF)
    p(model)
    assert {e.source for e in p.encoded.values()} == {"rtn"}
    assert all(e.weight.block_size == 16 for e in p.encoded.values())


def test_quantizer_hook(decode_graph, tmp_path: Path):
    """A calibration-based algorithm supplies codes per MatMul weight (None: round to nearest)."""
    model = decode_graph("gqa")
    calls: list[str] = []

    def hook(name: str, W_KN: np.ndarray) -> QuantizedWeight | None:
        calls.append(name)
        return quantize_rtn(W_KN * 1.0, 4, 16, True) if name == "val_83" else None

    p = QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GPTQ, quantizer=hook)
    p(model)
    assert EMBED not in calls and len(calls) == len(p.encoded) - 1  # every MatMul weight, not the table
    assert p.encoded["val_83"].source == "quantizer" and p.encoded["val_83"].weight.block_size == 16
    assert p.encoded["val_90"].source == "rtn"
    with pytest.raises(ValueError, match="quantizer"):
        QuantizeWeightsPass(bits=4, algorithm=WeightAlgorithm.GPTQ)

    def bad_hook(name: str, W_KN: np.ndarray) -> QuantizedWeight:
        return quantize_rtn(W_KN[:16], 4, 16, True)

    with pytest.raises(PassError, match="shape"):
        QuantizeWeightsPass(bits=4, quantizer=bad_hook)(decode_graph("gqa"))


def _shared_weight_model(opset: int = 21) -> ir.Model:
    """y = MatMul(x, W) + MatMul(x2, W): one initializer read by two MatMuls."""
    W = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
            helper.make_node("MatMul", ["x2", "W"], ["b"], name="mm_b"),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "shared",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 32]) for n in ("x", "x2")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=[W],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_shared_weight_gets_one_dequantize_per_consumer(tmp_path: Path):
    model = _shared_weight_model()
    x = {"x": np.ones((2, 32), np.float32), "x2": np.full((2, 32), 0.5, np.float32)}
    ref = session(model, tmp_path / "f.onnx").run(None, x)[0]
    p = QuantizeWeightsPass(bits=8, block_size=None)
    p(model)
    assert op_histogram(model)["DequantizeLinear"] == 2
    assert sorted(model.graph.initializers) == ["W.qcodes", "W.qscale"]
    out = session(model, tmp_path / "q.onnx").run(None, x)[0]
    deq = p.encoded["W"].weight.dequantize()
    np.testing.assert_allclose(out, x["x"] @ deq + x["x2"] @ deq, rtol=1e-5, atol=1e-5)
    assert np.abs(out - ref).max() < 0.01 * np.abs(ref).max()


def test_requires_opset_21():
    with pytest.raises(PassError, match="opset >= 21"):
        QuantizeWeightsPass(bits=8, block_size=None)(_shared_weight_model(opset=18))


def test_from_options():
    p = QuantizeWeightsPass.from_options(PhaseOptions(QuantScheme.W4A16, block_size=64, symmetric=False))
    assert (p.bits, p.block_size, p.symmetric) == (4, 64, False)
    p = QuantizeWeightsPass.from_options(PhaseOptions(QuantScheme.W8A16, algorithm=WeightAlgorithm.GGUF))
    assert (p.bits, p.block_size, p.symmetric, p.algorithm) == (8, None, True, WeightAlgorithm.GGUF)
    with pytest.raises(ValueError, match="no quantized weights"):
        QuantizeWeightsPass.from_options(PhaseOptions(QuantScheme.FP32))


def test_no_weights_is_a_no_op():
    model = _shared_weight_model()
    for node in model.graph:
        if node.op_type == "MatMul":
            node.replace_input_with(1, model.graph.inputs[0])
    model.graph.initializers.pop("W")
    result = QuantizeWeightsPass(bits=4)(model)
    assert not result.modified
