"""Graph-diff tests of FuseDequantMatMulPass: QDQ weight-only graphs -> MatMulNBits / GatherBlockQuantized,
application counts, op and initializer deltas, ONNX checker, and ORT numerics against the QDQ graph
(exact to float rounding at accuracy_level 1; level 4's int8 activations bounded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes.test_quantize_weights import EMBED, decode_feeds, gguf_gridded, session, weights
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase, WeightAlgorithm
from twophase.kernels.quant import quantize_rtn
from twophase.passes.fuse_dequant_matmul import FloatZeroPoints, FuseDequantMatMulPass
from twophase.passes.quantize_weights import QuantizeWeightsPass
from twophase.passes.split_phases import SplitPhasesPass

NBITS = "com.microsoft::MatMulNBits"
GBQ = "com.microsoft::GatherBlockQuantized"
SCHEMES = {
    "int8-per-channel": {"bits": 8, "block_size": None},
    "int8-b16": {"bits": 8, "block_size": 16},
    "int4-b32": {"bits": 4, "block_size": 32},
    "int4-b16": {"bits": 4, "block_size": 16},
    "uint4-b16-asym": {"bits": 4, "block_size": 16, "symmetric": False},
    "uint8-per-channel-asym": {"bits": 8, "block_size": None, "symmetric": False},
}


def ort_session(model: ir.Model, path: Path) -> ort.InferenceSession:
    """Fused graphs run as the runtime runs them (all optimizations on)."""
    ir.save(model, path, external_data=path.name + ".data")
    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def qdq_graph(canonical_onnx):
    """(tiny name, scheme) -> the decode graph after QuantizeWeightsPass, and its float weights count."""
    cache: dict[tuple, ir.Model] = {}

    def make(name: str, **scheme) -> ir.Model:
        key = (name, tuple(sorted(scheme.items())))
        if key not in cache:
            decode = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx(name))).model
            cache[key] = QuantizeWeightsPass(**scheme)(decode).model
        return cache[key].clone()

    return make


# -- graph diff -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_graph_diff(qdq_graph, scheme: str):
    model = qdq_graph("gqa", **SCHEMES[scheme])
    before = model.clone()
    n_dq = op_histogram(model)["DequantizeLinear"]
    n_mm = n_dq - 1  # every DQ feeds a MatMul except the embedding's
    p = FuseDequantMatMulPass(accuracy_level=1)
    result = p(model)
    assert result.modified
    assert dict(p.applied) == {"MatMulNBits": n_mm, "GatherBlockQuantized": 1} and not p.skipped
    d = diff_models(before, model)
    assert d.op_delta == {"DequantizeLinear": -n_dq, "MatMul": -n_mm, "Gather": -1, NBITS: n_mm, GBQ: 1}
    assert not d.signature_changed
    assert model.opset_imports["com.microsoft"] == 1
    bits = SCHEMES[scheme]["bits"]
    added = {i.name: i for i in d.initializers_added}
    removed = {i.name: i for i in d.initializers_removed}
    # MatMulNBits' B is uint8 [N, G, block*bits/8]; int4 tables are shared with GatherBlockQuantized as is.
    b_inits = [i for n, i in added.items() if n.endswith(".nbits_B")]
    assert len(b_inits) == n_mm and all(i.dtype == "uint8" and len(i.shape) == 3 for i in b_inits)
    if bits == 4:
        assert f"{EMBED}.qcodes" not in removed
        assert all(n.endswith((".qcodes", ".qscale", ".qzero")) for n in removed)
        assert (
            d.initializer_bytes_after.get("uint8", 0)
            >= sum(i.nbytes for i in removed.values() if i.dtype in ("int4", "uint4")) // 2
        )
    else:
        assert f"{EMBED}.gbq_data" in added and added[f"{EMBED}.gbq_data"].dtype == "uint8"
        assert "int8" not in d.initializer_bytes_after
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert node.attributes.get_int("bits") == bits and node.attributes.get_int("accuracy_level") == 1
            block = node.attributes.get_int("block_size")
            assert block >= 16 and block & (block - 1) == 0


def test_per_channel_block_size(qdq_graph):
    """A per-channel int8 weight becomes blocks of `per_channel_block_size` (scale repeated) or one block
    spanning K (padded to a power of two)."""
    for block, expect in ((32, {32}), (None, {64, 128})):  # K = 48 -> 64, K = 80 -> 128
        model = qdq_graph("gqa", bits=8, block_size=None)
        FuseDequantMatMulPass(4, per_channel_block_size=block)(model)
        blocks = {n.attributes.get_int("block_size") for n in model.graph if n.op_type == "MatMulNBits"}
        assert blocks == expect
        node = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes.get_int("K") == 48)
        scales = node.inputs[2].const_value.numpy()
        assert scales.shape == (node.attributes.get_int("N"), -(-48 // node.attributes.get_int("block_size")))
        assert (scales == scales[:, :1]).all()


def test_unsupported_block_is_left_as_qdq(qdq_graph):
    model = qdq_graph("gqa", bits=4, block_size=24)  # not a power of two
    p = FuseDequantMatMulPass()
    result = p(model)
    assert not result.modified and not p.applied
    assert len(p.skipped) == op_histogram(model)["DequantizeLinear"]
    assert all("power of two" in why for why in p.skipped.values())


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("name", ["gqa", "odd"])
def test_numerics_match_qdq(qdq_graph, tmp_path: Path, scheme: str, name: str):
    """accuracy_level 1: the fused kernels compute the QDQ graph's products to float rounding.
    accuracy_level 4: activations are quantized to int8 per block (step |x|max/127 per block of K), a
    relative error of order 1/127 per product -> a few 1e-3 of the logit range here."""
    qdq = qdq_graph(name, **SCHEMES[scheme])
    feeds = decode_feeds(qdq)
    ref = session(qdq, tmp_path / "qdq.onnx").run(None, feeds)
    scale = np.abs(ref[0]).max()
    for level in (1, 4):
        fused = FuseDequantMatMulPass(accuracy_level=level)(qdq.clone()).model
        out = ort_session(fused, tmp_path / f"fused{level}.onnx").run(None, feeds)
        err = max(np.abs(a - b).max() for a, b in zip(out, ref))
        if level == 1:
            assert err <= 1e-5 * max(1.0, scale)
        else:
            assert err <= 0.05 * scale
            np.testing.assert_allclose(out[1], ref[1], rtol=0, atol=0.05 * np.abs(ref[1]).max())


@pytest.mark.parametrize("K,block", [(40, 16), (64, 32), (96, 64)])
@pytest.mark.parametrize("sym", [True, False])
def test_matmulnbits_layout_against_numpy(tmp_path: Path, K: int, block: int, sym: bool):
    """One MatMul(x, DQ(W)) -> MatMulNBits equals x @ dequantize(codes) in NumPy (K % block != 0 included)."""
    rng = np.random.default_rng(K)
    N = 24
    W = rng.standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        initializer=[numpy_helper.from_array(W, "W")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    q = QuantizeWeightsPass(bits=4, block_size=block, symmetric=sym)
    q(model)
    p = FuseDequantMatMulPass(accuracy_level=1)
    p(model)
    assert p.applied == {"MatMulNBits": 1}
    x = rng.standard_normal((3, K)).astype(np.float32)
    y = ort_session(model, tmp_path / "m.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ q.encoded["W"].weight.dequantize(), rtol=1e-5, atol=1e-5)


# -- GGUF grids: float zero points ------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_qdq(canonical_onnx):
    decode = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx("mha"))).model
    gridded, kinds = gguf_gridded(decode)
    qdq = QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GGUF)(gridded.clone()).model
    return gridded, qdq, kinds


def test_gguf_q4_1_offset_as_correction(gguf_qdq, tmp_path: Path):
    """Q4_1: y = MatMulNBits(x, q, d) + ReduceSum(Reshape(x, [.., G, 32])) @ m' — integer kernels, exact
    algebra; the Q8_0 embedding becomes GatherBlockQuantized (uint8, default zero point 128)."""
    gridded, qdq, kinds = gguf_qdq
    model = qdq.clone()
    n_q41 = sum(k == "q4_1" for k in kinds.values())
    n_mm = len(kinds) - 1
    p = FuseDequantMatMulPass(accuracy_level=1)
    p(model)
    assert dict(p.applied) == {"MatMulNBits": n_mm, "offset_correction": n_q41, "GatherBlockQuantized": 1}
    d = diff_models(qdq, model)
    n_sums = op_histogram(model)["ReduceSum"]
    assert 0 < n_sums < n_q41  # one block sum per activation, shared by the q/k/v (gate/up) MatMuls
    assert d.op_delta == {
        "DequantizeLinear": -len(kinds),
        "Expand": -n_q41,
        "Reshape": n_sums - n_q41,
        "ReduceSum": n_sums,
        "MatMul": n_q41 - n_mm,
        "Gather": -1,
        NBITS: n_mm,
        GBQ: 1,
    }
    assert not any(n.endswith(".nbits_zero_points") for n in model.graph.initializers)  # default zp 8
    feeds = decode_feeds(model)
    ref = session(gridded, tmp_path / "float.onnx").run(None, feeds)  # == the QDQ graph's, bit for bit
    out = ort_session(model, tmp_path / "fused.onnx").run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))
    fused4 = FuseDequantMatMulPass(accuracy_level=4)(qdq.clone()).model
    out4 = ort_session(fused4, tmp_path / "fused4.onnx").run(None, feeds)
    assert np.abs(out4[0] - ref[0]).max() <= 0.05 * np.abs(ref[0]).max()


def test_gguf_q4_1_native_float_zero_points(gguf_qdq, tmp_path: Path):
    gridded, qdq, kinds = gguf_qdq
    model = qdq.clone()
    p = FuseDequantMatMulPass(accuracy_level=1, float_zero_points=FloatZeroPoints.NATIVE)
    p(model)
    assert "offset_correction" not in p.applied and p.applied["MatMulNBits"] == len(kinds) - 1
    zps = [
        model.graph.initializers[n].const_value for n in model.graph.initializers if n.endswith(".nbits_zero_points")
    ]
    assert len(zps) == sum(k == "q4_1" for k in kinds.values()) and all(z.dtype == ir.DataType.FLOAT for z in zps)
    feeds = decode_feeds(model)
    ref = session(gridded, tmp_path / "float.onnx").run(None, feeds)
    out = ort_session(model, tmp_path / "fused.onnx").run(None, feeds)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_float_offset_on_gather_is_left_as_qdq(canonical_onnx):
    """A Q4_1 embedding table has no GatherBlockQuantized form (no float zero points): DQ + Add + Gather stays."""
    decode = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx("mha"))).model
    table = weights(decode)[EMBED]
    qt = pytest.importorskip("gguf").GGMLQuantizationType.Q4_1
    import gguf

    new = gguf.quants.dequantize(gguf.quants.quantize(table, qt), qt).astype(np.float32)
    decode.graph.initializers[EMBED].const_value = ir.tensor(new, name=EMBED)
    QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GGUF)(decode)
    p = FuseDequantMatMulPass()
    p(decode)
    assert "GatherBlockQuantized" not in p.applied
    assert any("float zero points" in why for why in p.skipped.values())
    assert op_histogram(decode)["Gather"] == 1


def test_eight_bit_native_float_zero_points_refused():
    """ORT's CPU MatMulNBits has no 8-bit float zero points: NATIVE leaves such a pair alone."""
    rng = np.random.default_rng(0)
    K, N = 64, 8
    qw = quantize_rtn(rng.standard_normal((K, N)).astype(np.float32), 8, 32, symmetric=False)
    g = ir.Graph([], [], nodes=[], opset_imports={"": 21})
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, K]))
    g.inputs.append(x)

    def init(name: str, t: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(name=name, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
        g.register_initializer(v)
        return v

    codes = init("q", ir.tensor(qw.codes_KN, dtype=ir.DataType.UINT8))
    s = init("s", ir.tensor(qw.scale_GN))
    m = init("m", ir.tensor(rng.standard_normal((2, 1, N)).astype(np.float32)))
    shape1 = init("e", ir.tensor(np.array([2, 32, N], np.int64)))
    shape2 = init("r", ir.tensor(np.array([K, N], np.int64)))
    dq = ir.Node("", "DequantizeLinear", [codes, s], [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", 32)])
    ex = ir.Node("", "Expand", [m, shape1])
    rs = ir.Node("", "Reshape", [ex.outputs[0], shape2])
    add = ir.Node("", "Add", [dq.outputs[0], rs.outputs[0]])
    mm = ir.Node("", "MatMul", [x, add.outputs[0]], name="mm")
    for n in (dq, ex, rs, add, mm):
        g.append(n)
    mm.outputs[0].name = "y"
    g.outputs.append(mm.outputs[0])
    model = ir.Model(g, ir_version=10)
    p = FuseDequantMatMulPass(float_zero_points=FloatZeroPoints.NATIVE)
    assert not p(model).modified
    assert "8-bit" in p.skipped["mm"]
    p = FuseDequantMatMulPass()  # the correction form has no such limit
    assert p(model).modified and p.applied["offset_correction"] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="accuracy_level"):
        FuseDequantMatMulPass(accuracy_level=5)
    with pytest.raises(ValueError, match="power of two"):
        FuseDequantMatMulPass(per_channel_block_size=48)
