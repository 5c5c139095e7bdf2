"""PackProjectionsPass on twophase.tvm.QMatMul and FuseTVMElementwisePass: graph diff on the tiny bound decode
graph (per layer: QKV -> attention -> O -> gate|up -> down, nothing else) and the rules' refusals. The fused
graphs' numerics through TVM against ONNX Runtime are in tests/compiler/test_lower_tvm.py (every weight format,
decode at levels 1 and 4, prefill, GGUF grids)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.options import Phase
from twophase.passes.fuse_tvm_elementwise import FuseTVMElementwisePass
from twophase.passes.fuse_tvm_kernels import TVM_DOMAIN, FuseTVMKernelsPass
from twophase.passes.pack_projections import PackProjectionsPass

tvm = pytest.importorskip("tvm")

from compiler.test_lower_tvm import SCHEMES, bound_graph  # noqa: E402

QM = f"{TVM_DOMAIN}::QMatMul"


def _kernels(canonical_onnx, phase=Phase.DECODE, scheme="int4-b32", level: int = 4) -> ir.Model:
    return FuseTVMKernelsPass(level)(bound_graph(canonical_onnx, phase, SCHEMES[scheme])).model


def _layers(model: ir.Model) -> int:
    return sum(1 for v in model.graph.inputs if v.name.endswith(".key"))


@pytest.mark.parametrize("scheme", ["int4-b32", "fp32"])
def test_graph_diff(canonical_onnx, scheme):
    before = _kernels(canonical_onnx, scheme=scheme)
    L = _layers(before)
    packed = PackProjectionsPass()(before.clone()).model
    d = diff_models(before, packed)
    assert d.op_delta == {"twophase.tvm::QMatMul": -3 * L, "Split": L}  # QKV into attention, gate|up split
    p = FuseTVMElementwisePass()
    after = p(packed).model
    assert dict(p.applied) == {"rms_norm": 2 * L + 1, "swiglu": L, "residual": 2 * L}
    hist = op_histogram(after)
    assert hist[QM] == 4 * L + 1 and hist["com.microsoft::GroupQueryAttention"] == L
    left = {op for op in hist if op not in (QM, "com.microsoft::GroupQueryAttention", f"{TVM_DOMAIN}::QGather")}
    assert left <= {"Gather"}, left  # the float embedding of fp32 stays a Gather; no norm, Add, Mul, Sigmoid, Split
    by_prologue = {}
    for n in after.graph:
        if n.op_type == "QMatMul":
            key = (n.attributes.get_string("prologue", "none"), n.attributes.get_int("residual", 0))
            by_prologue[key] = by_prologue.get(key, 0) + 1
    # QKV and gate|up (and the lm_head) after a norm; O with the residual; down with SwiGLU and the residual
    assert by_prologue == {("rms_norm", 0): 2 * L + 1, ("none", 1): L, ("swiglu", 1): L}
    gqa = [n for n in after.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[2] is None for n in gqa)  # packed QKV
    qkv = gqa[0].inputs[0].producer()
    assert qkv.attributes.get_int("N") == qkv.attributes.get_int("K") + 2 * 2 * 16  # 4 heads + 2 x 2 kv heads of 16


def test_values_read_elsewhere_are_not_folded(canonical_onnx):
    """A norm output that a non-QMatMul node also reads, and a matmul output read twice, stay as they are."""
    model = PackProjectionsPass()(_kernels(canonical_onnx)).model
    norm = next(n for n in model.graph if n.op_type == "RMSNormalization")
    extra = ir.Node("", "Identity", [norm.outputs[0]], name="also_reads_norm")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name, extra.outputs[0].dtype, extra.outputs[0].shape = "norm_out", ir.DataType.FLOAT, norm.outputs[0].shape
    add = next(n for n in model.graph if n.op_type == "Add")
    mm_out = next(v for v in add.inputs if v.producer().op_type == "QMatMul")
    twice = ir.Node("", "Identity", [mm_out], name="also_reads_o_proj")
    model.graph.append(twice)
    model.graph.outputs.append(twice.outputs[0])
    twice.outputs[0].name, twice.outputs[0].dtype, twice.outputs[0].shape = "o_out", ir.DataType.FLOAT, mm_out.shape
    L = _layers(model)
    p = FuseTVMElementwisePass()
    p(model)
    assert p.applied["rms_norm"] == 2 * L and p.applied["residual"] == 2 * L - 1
    assert norm in list(model.graph) and add in list(model.graph)


def test_gate_in_the_second_half_is_left(canonical_onnx):
    """SwiGLU reads the gate from the first half: a graph whose packed output has up first keeps its ops."""
    model = PackProjectionsPass()(_kernels(canonical_onnx)).model
    split = next(n for n in model.graph if n.op_type == "Split")
    g, u = split.outputs
    for node, idx in list(g.uses()) + list(u.uses()):  # swap which half is the gate
        node.replace_input_with(idx, u if node.inputs[idx] is g else g)
    p = FuseTVMElementwisePass()
    p(model)
    assert p.applied["swiglu"] == _layers(model) - 1
    assert op_histogram(model)["Sigmoid"] == 1
