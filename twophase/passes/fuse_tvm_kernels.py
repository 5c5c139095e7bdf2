"""FuseTVMKernelsPass: weight MatMuls and quantized embedding lookups -> twophase's own TVM kernels.

The TVM target's counterpart of FuseDequantMatMulPass. TVM's ONNX importer has no int4 tensors and
no blocked DequantizeLinear, and its default lowering would fold DequantizeLinear(weight) back into a
float constant (losing the quantization) and leave the matmul loops unscheduled. So each weight
product becomes one node of the `twophase.tvm` domain whose initializers are already in the layout
of the scheduled kernel that lower_tvm.py calls for it (twophase/kernels/tir):

    MatMul rule (float, int8 per channel or blocked, int4 / uint4 blocked, GGUF float offsets):
        Before:  y = MatMul(x, W)                                           W: float32 initializer [K, N]
                 y = MatMul(x, DequantizeLinear(W_q, W_s[, W_z], ...))              (QuantizeWeightsPass)
                 y = MatMul(x, Add(DequantizeLinear(W_q, W_s, ...), offset(W_m)))   (GGUF Q4_1 grid)
        After:   y = twophase.tvm.QMatMul(x, P_0, P_1, ..., bits, K, N, block_size, has_offset)
                 P_i = kernels.tir.qmatmul.pack(spec, codes, scale, offset)

    Every grid is rewritten as W[k, n] = (c[k, n] - zero) * s[k // bs, n] + o[k // bs, n] with unsigned
    4-bit codes c (signed int4 q -> c = q + 8, zero = 8; a zero point z -> o = -z s; a float offset
    m -> o = m) or signed 8-bit codes (uint8 u -> q = u - 128, zero = -128), o only where needed. The
    products are those of the QDQ graph: same codes, same scales, exact integer shifts.

    Gather rule (embedding tables, per row or blocked along D):
        Before:  h = Gather(DequantizeLinear(E_q, E_s[, E_z], ...), ids)            E_q: [V, D]
        After:   h = twophase.tvm.QGather(P_0, ids, P_1[, P_2], bits, D, block_size, has_offset)
                 4-bit codes two per byte [V, ceil(D/2)] (low nibble first), scales [V, G], offsets [V, G]

Initializers are shared between nodes reading the same weight. Weights that match no rule (not an
initializer, not 2-D, another dtype) stay as they are and `skipped` says why.

Preconditions: float32 activations. Pipeline: the TVM target's last quantization pass (after
QuantizeWeightsPass and BindKVCachePass); its output is for lower_tvm.py only (no other runtime
knows the domain).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from twophase.passes.fuse_dequant_matmul import NoMatch, read_dequant, read_offset, replace_node

log = logging.getLogger(__name__)

TVM_DOMAIN = "twophase.tvm"


def _affine(dq, offset_GN: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(codes, scale, offset, zero) with W = (codes - zero) * scale + offset: unsigned 4-bit or signed 8-bit
    codes; a constant zero (symmetric grids) needs no offset array."""
    scale = dq.scale.astype(np.float32)
    zp = None if dq.zero_point is None else dq.zero_point.astype(np.float32)
    codes, offset, zero = dq.codes, None, 0
    if dq.bits == 4:
        if dq.signed:  # q -> c = q + 8
            codes, zero = (codes.astype(np.int16) + 8).astype(np.uint8), 8
        codes = codes.astype(np.uint8)
        if zp is not None:  # (c - zero - zp) * s
            offset = (-zp * scale).astype(np.float32)
    else:
        if not dq.signed:  # u -> q = u - 128: (q + 128 - zp) * s
            codes, zero = (codes.astype(np.int16) - 128).astype(np.int8), -128
        codes = codes.astype(np.int8)
        if zp is not None:
            offset = (-zp * scale).astype(np.float32)
    if offset_GN is not None:
        offset = offset_GN.astype(np.float32) if offset is None else (offset + offset_GN).astype(np.float32)
    return codes, scale, offset, zero


class FuseTVMKernelsPass(ir.passes.InPlacePass):
    """MatMul on weights -> twophase.tvm.QMatMul, Gather on quantized tables -> QGather (module doc).

    After a call, `applied` counts rewrites per rule and `skipped` maps node names to why they were left.
    """

    def __init__(self) -> None:
        super().__init__()
        self.applied: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.applied, self.skipped = Counter(), {}
        graph = model.graph
        cache: dict[tuple, list[ir.Value]] = {}
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                if node.op_type == "MatMul":
                    self._matmul(graph, node, cache)
                    self.applied["QMatMul"] += 1
                elif node.op_type == "Gather":
                    self._gather(graph, node, cache)
                    self.applied["QGather"] += 1
            except NoMatch as e:
                self.skipped[node.name or node.outputs[0].name] = str(e)
        modified = sum(self.applied.values()) > 0
        if modified:
            model.opset_imports.setdefault(TVM_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
        log.info("TVM kernels: %s; %d candidates left", dict(self.applied), len(self.skipped))
        return ir.passes.PassResult(model, modified)

    def _matmul(self, graph: ir.Graph, node: ir.Node, cache: dict) -> None:
        from twophase.kernels.tir.qmatmul import QMatMulSpec, pack

        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.dtype != ir.DataType.FLOAT:
            raise NoMatch("MatMul input A is not known to be float32")
        if w is not None and w.is_initializer() and w.const_value is not None:
            W = w.const_value.numpy()
            if W.ndim != 2 or W.dtype != np.float32:
                raise NoMatch(f"weight of shape {W.shape} {W.dtype}; need a 2-D float32 initializer")
            key = ("f32", w.name)
            spec = QMatMulSpec(32, W.shape[0], W.shape[1], None)
            if key not in cache:
                cache[key] = self._initializers(graph, w.name, pack(spec, W))
        else:
            offset_value = None
            producer = w.producer() if w is not None else None
            if producer is not None and producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
                a, b = producer.inputs
                is_dq = a is not None and a.producer() is not None and a.producer().op_type == "DequantizeLinear"
                w, offset_value = (a, b) if is_dq else (b, a)
            dq = read_dequant(w, reduce_axis=0)
            K, N = dq.codes.shape
            G = dq.scale.shape[0]
            m = None
            if offset_value is not None:
                if dq.block_size is None:
                    raise NoMatch("a float offset on a per-channel DequantizeLinear")
                m = read_offset(offset_value, K, N, G, dq.block_size)
            codes, scale, offset, zero = _affine(dq, m)
            spec = QMatMulSpec(dq.bits, K, N, dq.block_size, offset is not None, zero)
            key = ("q", dq.code_value.name, dq.node.inputs[1].name, offset_value.name if offset_value else None)
            if key not in cache:
                base = dq.code_value.name.removesuffix(".qcodes")
                cache[key] = self._initializers(graph, base, pack(spec, codes, scale, offset))
        attrs = [
            ir.AttrInt64("bits", spec.bits),
            ir.AttrInt64("K", spec.K),
            ir.AttrInt64("N", spec.N),
            ir.AttrInt64("block_size", spec.block_size or 0),
            ir.AttrInt64("has_offset", int(spec.has_offset)),
            ir.AttrInt64("zero", spec.zero),
        ]
        fused = ir.Node(TVM_DOMAIN, "QMatMul", [x, *cache[key]], attrs, name=f"{node.name or node.outputs[0].name}.tvm")
        replace_node(graph, node, fused)

    def _gather(self, graph: ir.Graph, node: ir.Node, cache: dict) -> None:
        from twophase.kernels.tir.gather import pack_table

        if len(node.inputs) != 2 or node.attributes.get_int("axis", 0) != 0:
            raise NoMatch("Gather not on axis 0")
        table = node.inputs[0]
        producer = table.producer() if table is not None else None
        if producer is not None and producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
            raise NoMatch("a float-offset (Q4_1) table: left as DequantizeLinear + Add + Gather")
        if producer is None or producer.op_type != "DequantizeLinear":
            raise NoMatch("the table is not produced by DequantizeLinear")
        dq = read_dequant(table, reduce_axis=1)  # laid out as W[K=D, N=V]
        codes, scale, offset, zero = _affine(dq, None)
        if zero:  # the gather kernel takes explicit offsets: -zero * scale
            offset = (-zero * scale if offset is None else offset - zero * scale).astype(np.float32)
        D = codes.shape[0]
        key = ("gather", dq.code_value.name, dq.node.inputs[1].name)
        if key not in cache:
            base = dq.code_value.name.removesuffix(".qcodes")
            arrays = pack_table(dq.bits, codes.T, scale.T, None if offset is None else offset.T)
            cache[key] = self._initializers(graph, f"{base}.table", arrays)
        P = cache[key]
        attrs = [
            ir.AttrInt64("bits", dq.bits),
            ir.AttrInt64("D", D),
            ir.AttrInt64("block_size", dq.block_size or 0),
            ir.AttrInt64("has_offset", int(offset is not None)),
        ]
        fused = ir.Node(TVM_DOMAIN, "QGather", [P[0], node.inputs[1], *P[1:]], attrs,
                        name=f"{node.name or node.outputs[0].name}.tvm")
        replace_node(graph, node, fused)

    @staticmethod
    def _initializers(graph: ir.Graph, base: str, arrays: list[np.ndarray]) -> list[ir.Value]:
        out = []
        for i, array in enumerate(arrays):
            name = f"{base}.tvm{i}"
            if name in graph.initializers:
                raise NoMatch(f"initializer {name!r} already exists")
            tensor = ir.tensor(np.ascontiguousarray(array), name=name)
            value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
            graph.register_initializer(value)
            out.append(value)
        return out


__all__ = ["TVM_DOMAIN", "FuseTVMKernelsPass"]
