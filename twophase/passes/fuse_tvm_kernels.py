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
        After:   y = twophase.tvm.QMatMul(x, P_0, P_1, ..., bits, K, N, block_size, has_offset[, act_int8=1])
                 P_i = kernels.tir.qmatmul.pack(spec, codes, scale, offset)
                 act_int8 (accuracy_level 4, 4 / 8 bits): few-row calls quantize x to int8 per block
                 (kernels.tir.qgemv_a8, ORT MatMulNBits accuracy_level 4's counterpart); same P_i

    Every grid is rewritten as W[k, n] = (c[k, n] - zero) * s[k // bs, n] + o[k // bs, n] with unsigned
    4-bit codes c (signed int4 q -> c = q + 8, zero = 8; a zero point z -> o = -z s; a float offset
    m -> o = m) or signed 8-bit codes (uint8 u -> q = u - 128, zero = -128), o only where needed. The
    products are those of the QDQ graph: same codes, same scales, exact integer shifts.

    W8A8 rule (QuantizeActivationsPass's QDQ; int8 weights per output channel, int8 activations):
        Before (DYNAMIC, per-token scales; one activation quantization may feed several MatMuls):
                 x2 = Reshape(x, [-1, K])
                 s  = Max(Mul(ReduceMax(Abs(x2), axes=[1], keepdims=0), 1/127), eps)
                 xd = DequantizeLinear(QuantizeLinear(x2, s, axis=0, int8), s, axis=0)
                 y  = Reshape(MatMul(xd, DequantizeLinear(W_q int8 [K, N], W_s [N], axis=1)),
                              Concat(Shape(x, end=-1), [N]))
        Before (STATIC, one calibrated scale s_c, int8 zero point 0):
                 y  = MatMul(DequantizeLinear(QuantizeLinear(x, s_c, 0), s_c, 0), DequantizeLinear(W_q, W_s, axis=1))
        After:   y  = twophase.tvm.QMatMulA8(x, P_0, P_1[, s_c], K, N, act="dynamic" | "static")
                 P_i = kernels.tir.qmatmul_int8.pack(spec, W_q, W_s); the kernel quantizes x itself
        The activation-side nodes (and the Shape/Concat arithmetic) lose their last reader and go.

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

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from twophase.passes.fuse_dequant_matmul import NoMatch, read_dequant, read_offset, replace_node, split_offset

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

    def __init__(self, accuracy_level: int = 0) -> None:
        """accuracy_level: ORT MatMulNBits' (PhaseOptions.accuracy_level); at 4 the 4-bit / 8-bit QMatMul
        nodes carry act_int8=1: their kernel quantizes activations to int8 per block for few rows (qgemv_a8.py)."""
        super().__init__()
        self.accuracy_level = accuracy_level
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
                if node.op_type == "MatMul" and _is_w8a8(node):
                    self._matmul_a8(graph, node, cache)
                    self.applied["QMatMulA8"] += 1
                elif node.op_type == "MatMul":
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
            w, offset_value = split_offset(w)
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
        if self.accuracy_level == 4 and _gemv_a8_ok(spec):
            attrs.append(ir.AttrInt64("act_int8", 1))
        fused = ir.Node(TVM_DOMAIN, "QMatMul", [x, *cache[key]], attrs, name=f"{node.name or node.outputs[0].name}.tvm")
        replace_node(graph, node, fused)

    def _matmul_a8(self, graph: ir.Graph, node: ir.Node, cache: dict) -> None:
        from twophase.kernels.tir.qmatmul_int8 import QMatMulA8Spec, pack

        m = read_w8a8(node)
        K, N = m.codes.shape
        spec = QMatMulA8Spec(K, N, m.act)
        key = ("a8", m.codes_value.name, m.scale_value.name)
        if key not in cache:
            cache[key] = self._initializers(graph, f"{m.codes_value.name}.a8", pack(spec, m.codes, m.scale))
        inputs = [m.x, *cache[key]] + ([m.static_scale] if m.static_scale is not None else [])
        attrs = [ir.AttrInt64("K", K), ir.AttrInt64("N", N), ir.AttrString("act", m.act.value)]
        fused = ir.Node(TVM_DOMAIN, "QMatMulA8", inputs, attrs, name=f"{node.name or node.outputs[0].name}.tvm")
        replace_node(graph, m.output_node, fused)

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


def _gemv_a8_ok(spec) -> bool:
    """Whether qgemv_a8 takes this weight (4 / 8 bits, blocks of a multiple of 4 rows)."""
    from twophase.kernels.tir.qgemv_a8 import QGemvA8Spec

    if spec.bits not in (4, 8):
        return False
    try:
        QGemvA8Spec.of(spec)
    except ValueError:
        return False
    return True


# --- W8A8 matching ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class W8A8Match:
    x: ir.Value  # the float activation the kernel reads ([..., K]; dynamic: before the Reshape to [M, K])
    act: object  # qmatmul_int8.ActQuant
    static_scale: ir.Value | None  # the constant per-tensor scale (STATIC)
    codes_value: ir.Value
    codes: np.ndarray  # int8 [K, N]
    scale_value: ir.Value
    scale: np.ndarray  # float32 [N]
    output_node: ir.Node  # the node whose output the fused node replaces (MatMul, or the Reshape back)


def _is_w8a8(node: ir.Node) -> bool:
    """A MatMul whose activation input is DequantizeLinear(QuantizeLinear(...)): the W8A8 rule's to take."""
    dqx = node.inputs[0].producer() if node.inputs[0] is not None else None
    return (dqx is not None and dqx.op_type == "DequantizeLinear" and dqx.inputs[0] is not None
            and dqx.inputs[0].producer() is not None and dqx.inputs[0].producer().op_type == "QuantizeLinear")


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _op(v: ir.Value | None, op_type: str) -> ir.Node:
    node = v.producer() if v is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        raise NoMatch(f"{getattr(v, 'name', None)!r} is not produced by {op_type}")
    return node


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def _zero_point_ok(node: ir.Node) -> bool:
    """No zero point or an int8 constant 0 (symmetric int8)."""
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is None:
        return True
    value = _const(zp)
    return value is not None and zp.dtype == ir.DataType.INT8 and not np.any(value)


def read_w8a8(node: ir.Node) -> W8A8Match:
    """The parts of a QuantizeActivationsPass W8A8 MatMul (module doc); NoMatch says what differs."""
    from twophase.kernels.tir.qmatmul_int8 import INV127, SCALE_EPS, ActQuant

    dqx = _op(node.inputs[0], "DequantizeLinear")
    qx = _op(dqx.inputs[0], "QuantizeLinear")
    dqw = _op(node.inputs[1], "DequantizeLinear")
    # weights: int8 [K, N] codes, per-channel (or per-tensor) scale on axis 1, no zero point, not blocked
    codes, scale = _const(dqw.inputs[0]), _const(dqw.inputs[1])
    if codes is None or codes.dtype != np.int8 or codes.ndim != 2:
        raise NoMatch("weight codes are not a constant int8 [K, N] initializer")
    K, N = codes.shape
    if scale is None or scale.size not in (1, N) or (scale.size == N and _int_attr(dqw, "axis", 1) not in (1, -1)):
        raise NoMatch("weight scale is neither per tensor nor per output channel")
    if not _zero_point_ok(dqw) or _int_attr(dqw, "block_size", 0):
        raise NoMatch("weight DequantizeLinear has a zero point or blocks")
    scale = np.broadcast_to(scale.astype(np.float32).reshape(-1), (N,)).copy()
    # activations: int8, zero point 0, the scale shared by Q and DQ
    s = qx.inputs[1]
    if dqx.inputs[1] is not s or not _zero_point_ok(qx) or not _zero_point_ok(dqx):
        raise NoMatch("activation Q/DQ do not share one scale with an int8 zero point 0")
    out_dtype = _int_attr(qx, "output_dtype", 0)
    if (len(qx.inputs) < 3 or qx.inputs[2] is None) and out_dtype != ir.DataType.INT8.value:
        raise NoMatch("activation QuantizeLinear does not produce int8")
    static = _const(s)
    if static is not None:
        if static.size != 1:
            raise NoMatch("static activation scale is not per tensor")
        x = qx.inputs[0]
        if x.shape is not None and (len(x.shape) < 1 or (isinstance(x.shape[-1], int) and x.shape[-1] != K)):
            raise NoMatch(f"activation's last dimension is not K={K}")
        return W8A8Match(x, ActQuant.STATIC, s, dqw.inputs[0], codes, dqw.inputs[1], scale, node)
    # dynamic: s = Max(Mul(ReduceMax(Abs(x2), [1], keepdims=0), 1/127), eps), per row (axis 0) of x2 [M, K]
    if _int_attr(qx, "axis", 1) != 0 or _int_attr(dqx, "axis", 1) != 0:
        raise NoMatch("dynamic activation scale is not on axis 0")
    mx = _op(s, "Max")
    mul, eps = mx.inputs
    mul_node = _op(mul, "Mul")
    rmax, inv = mul_node.inputs
    rmax_node = _op(rmax, "ReduceMax")
    x2 = qx.inputs[0]
    if _op(rmax_node.inputs[0], "Abs").inputs[0] is not x2:
        raise NoMatch("the scale is not the absmax of the quantized value")
    axes = _const(rmax_node.inputs[1]) if len(rmax_node.inputs) > 1 else None
    if axes is None or list(axes.reshape(-1)) not in ([1], [-1]) or _int_attr(rmax_node, "keepdims", 1) != 0:
        raise NoMatch("the absmax is not over axis 1 with keepdims=0")
    inv, eps = _const(inv), _const(eps)
    if inv is None or inv.size != 1 or np.float32(inv.reshape(-1)[0]) != INV127:
        raise NoMatch("the scale multiplier is not float32(1/127)")
    if eps is None or eps.size != 1 or np.float32(eps.reshape(-1)[0]) != np.float32(SCALE_EPS):
        raise NoMatch(f"the scale floor is not {SCALE_EPS}")
    reshape = _op(x2, "Reshape")
    shape = _const(reshape.inputs[1])
    if shape is None or list(shape.reshape(-1)) != [-1, K]:
        raise NoMatch(f"the activation is not reshaped to [-1, {K}]")
    x = reshape.inputs[0]
    # the product back to x's leading dims: Reshape(MatMul, Concat(Shape(x, end=-1), [N])), else [M, N] as is
    y2 = node.outputs[0]
    out_node, uses = node, list(y2.uses())
    if len(uses) == 1 and not y2.is_graph_output():
        back = uses[0].node
        if back.op_type == "Reshape" and back.inputs[0] is y2 and back.inputs[1] is not None:
            try:
                concat = _op(back.inputs[1], "Concat")
                shp = _op(concat.inputs[0], "Shape")
                tail = _const(concat.inputs[1]) if len(concat.inputs) == 2 else None
                if (shp.inputs[0] is x and _int_attr(shp, "end", 0) == -1 and _int_attr(shp, "start", 0) == 0
                        and tail is not None and list(tail.reshape(-1)) == [N]):
                    out_node = back
            except NoMatch:
                pass
    if out_node is node:  # no reshape back: the kernel reads x2 [M, K] and its result is [M, N]
        x = x2
    return W8A8Match(x, ActQuant.DYNAMIC, None, dqw.inputs[0], codes, dqw.inputs[1], scale, out_node)


__all__ = ["TVM_DOMAIN", "FuseTVMKernelsPass", "W8A8Match", "read_w8a8"]
