"""PackProjectionsPass: projections that read the same activation become one wider MatMul (ORT target).

A decode step is a chain of small GEMVs; every kernel launch costs a thread-pool round trip, so the
q/k/v projections (same input: the attention norm) and the gate/up projections (same input: the MLP
norm) are packed along N into one op each, as onnxruntime-genai's builder does:

    Before:  q = MatMulNBits(x, Bq, Sq);  k = MatMulNBits(x, Bk, Sk);  v = MatMulNBits(x, Bv, Sv)
    After:   qkv = MatMulNBits(x, concat(Bq, Bk, Bv), concat(Sq, Sk, Sv), N = Nq + Nk + Nv)
             q, k, v = Split(qkv, [Nq, Nk, Nv], axis=-1)

Also for the TVM target's twophase.tvm.QMatMul (FuseTVMKernelsPass; its arrays are tiles of 32 columns,
concatenated along the tile axis, so every member but the last needs N % 32 == 0), for float weights
(MatMul(x, W), W concatenated along axis 1) and for FuseDequantMatMulPass's
float-offset form y = Add(MatMulNBits(x, ...), MatMul(blocksum(x), M)) (the offset matrices M are
concatenated too, one Add on the packed output). Members must agree on everything but N (bits,
block_size, accuracy_level, which optional inputs they have). When the split outputs are exactly a
GroupQueryAttention's query, key and value, the Split goes too: GroupQueryAttention takes packed QKV.

The packed weights are new initializers (the members' own stay in the other phase's graph only if it
still reads them). Numerics are unchanged: each output column is computed from the same codes.

Pipeline: ORT target, after FuseDequantMatMulPass and BindKVCachePass; TVM target, after FuseTVMKernelsPass
(and before FuseTVMElementwisePass).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from twophase.kernels.tir.qmatmul import TN as TVM_TILE  # columns per tile of a QMatMul's arrays
from twophase.passes.fuse_tvm_kernels import TVM_DOMAIN

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class _Member:
    node: ir.Node  # MatMul or MatMulNBits
    out: ir.Value  # what the consumers read: the node's output, or the correction Add's
    n: int  # output columns
    correction: ir.Node | None = None  # MatMul(blocksum(x), M) of the float-offset form
    add: ir.Node | None = None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def _member(node: ir.Node) -> _Member | None:
    """A packable projection: float MatMul(x, W[K, N]) or MatMulNBits(x, B, scales[, zp]) (+ correction)."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return None
        member = _Member(node, node.outputs[0], int(w.shape[1]))
    elif node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
            return None  # g_idx / bias: not packed
        if any(v is not None and _const(v) is None for v in node.inputs[1:]):
            return None
        member = _Member(node, node.outputs[0], node.attributes["N"].as_int())
    elif node.op_type == "QMatMul" and node.domain == TVM_DOMAIN:
        if any(k in node.attributes for k in ("prologue", "residual")):
            return None  # already fused with its neighbours
        if any(v is None or _const(v) is None for v in node.inputs[1:]):
            return None
        return _Member(node, node.outputs[0], node.attributes["N"].as_int())
    else:
        return None
    # The float-offset form: Add(y, MatMul(s, M)) with y read by that Add only.
    uses = list(member.out.uses())
    if node.op_type == "MatMulNBits" and len(uses) == 1 and uses[0][0].op_type == "Add":
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        corr = other.producer() if other is not None else None
        if corr is not None and corr.op_type == "MatMul" and _const(corr.inputs[1]) is not None and len(other.uses()) == 1:
            member.correction, member.add, member.out = corr, add, add.outputs[0]
    return member


def _signature(m: _Member) -> tuple:
    node = m.node
    attrs = tuple(sorted((k, str(v)) for k, v in node.attributes.items() if k != "N"))
    present = tuple(v is not None for v in node.inputs)
    corr = None if m.correction is None else id(m.correction.inputs[0])
    return (node.op_type, id(node.inputs[0]), attrs, present, corr)


class PackProjectionsPass(ir.passes.InPlacePass):
    """Packs projections of the same activation along N (module doc). `min_members` is 2."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        members = [m for m in map(_member, list(graph)) if m is not None and not m.out.is_graph_output()]
        corrections = {id(m.correction) for m in members if m.correction is not None}
        groups: dict[tuple, list[_Member]] = {}
        for m in members:
            if id(m.node) not in corrections:  # a correction MatMul is packed with its MatMulNBits
                groups.setdefault(_signature(m), []).append(m)
        packed = 0
        for members in groups.values():
            if members[0].node.op_type == "QMatMul" and any(m.n % TVM_TILE for m in members[:-1]):
                log.info("not packed: %s (a member before the last has N %% %d != 0)",
                         [m.node.name for m in members], TVM_TILE)
                continue
            if len(members) >= 2:
                _pack(graph, members, f"twophase_pack_{packed}")
                packed += 1
        if packed:
            log.info("packed %d projection groups", packed)
        return ir.passes.PassResult(model, modified=packed > 0)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype, value.shape = value.const_value.dtype, ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _concat_inputs(graph: ir.Graph, members: list[_Member], index: int, axis: int, name: str) -> ir.Value:
    arrays = [_const(m.node.inputs[index]) for m in members]
    if members[0].node.op_type == "QMatMul":  # [NT, ...] tiles
        return _initializer(graph, name, np.concatenate(arrays, axis=0))
    if members[0].node.op_type == "MatMulNBits" and index > 1:
        # scales / zero points are 1-D [N * G] or 2-D [N, G] (packed zero points [N, ceil(G*bits/8)])
        arrays = [a.reshape(m.n, -1) for a, m in zip(arrays, members)]
        return _initializer(graph, name, np.concatenate(arrays, axis=0).reshape(-1))
    return _initializer(graph, name, np.concatenate(arrays, axis=axis))


def _pack(graph: ir.Graph, members: list[_Member], name: str) -> None:
    first = members[0].node
    x = first.inputs[0]
    n_total = sum(m.n for m in members)
    inputs: list[ir.Value | None] = [x]
    if first.op_type == "MatMul":
        inputs.append(_concat_inputs(graph, members, 1, 1, f"{name}.weight"))
        attrs = []
    else:
        for i, v in enumerate(first.inputs[1:], start=1):
            inputs.append(None if v is None else _concat_inputs(graph, members, i, 0, f"{name}.in{i}"))
        attrs = [a if k != "N" else ir.AttrInt64("N", n_total) for k, a in first.attributes.items()]
    node = ir.Node(first.domain, first.op_type, inputs, attributes=attrs, name=name)
    y = node.outputs[0]
    y.name, y.dtype = name, ir.DataType.FLOAT
    new_nodes = [node]
    if members[0].correction is not None:
        corr0 = members[0].correction
        m_cat = np.concatenate([_const(m.correction.inputs[1]) for m in members], axis=1)
        corr = ir.Node("", "MatMul", [corr0.inputs[0], _initializer(graph, f"{name}.offsets", m_cat)],
                       name=f"{name}_correction")
        add = ir.Node("", "Add", [y, corr.outputs[0]], name=f"{name}_add")
        y = add.outputs[0]
        y.name, y.dtype = f"{name}.out", ir.DataType.FLOAT
        new_nodes += [corr, add]
    if x.shape is not None:
        y.shape = ir.Shape([*x.shape[:-1], n_total])
    # Insert after the last producer any member depends on: the first member's position works, as
    # every member reads the same x (and correction input).
    anchor = members[0].correction if members[0].correction is not None else first
    graph.insert_before(anchor, new_nodes)
    if not _feed_packed_gqa(graph, members, y):
        sizes = _initializer(graph, f"{name}.split", np.array([m.n for m in members], dtype=np.int64))
        split = ir.Node("", "Split", [y, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(members),
                        name=f"{name}_split")
        graph.insert_after(new_nodes[-1], split)
        for m, out in zip(members, split.outputs):
            out.dtype, out.shape = m.out.dtype, m.out.shape
            m.out.replace_all_uses_with(out)
            name = m.out.name
            m.out.name = f"{name}.unpacked"
            out.name = name
    for m in members:
        for dead in (m.add, m.correction, m.node):
            if dead is not None:
                graph.remove(dead, safe=True)


def _feed_packed_gqa(graph: ir.Graph, members: list[_Member], qkv: ir.Value) -> bool:
    """If the members are exactly a GroupQueryAttention's query, key and value, feed it packed QKV."""
    if len(members) != 3:
        return False
    uses = [list(m.out.uses()) for m in members]
    if any(len(u) != 1 for u in uses):
        return False
    gqa = uses[0][0][0]
    if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS_DOMAIN:
        return False
    if [(node, idx) for u in uses for node, idx in u] != [(gqa, 0), (gqa, 1), (gqa, 2)]:
        return False
    gqa.replace_input_with(0, qkv)
    gqa.replace_input_with(1, None)
    gqa.replace_input_with(2, None)
    return True
