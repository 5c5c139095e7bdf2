"""DecomposeAttentionPass: opset-23 RotaryEmbedding and Attention -> standard ops older consumers import.

TVM's ONNX frontend (and runtimes older than opset 23) do not take these two ops; this pass spells them
out with ops every consumer knows (DESIGN.md: "decompose for that target").

    RotaryEmbedding (4-D input [B, H, S, D], cos/sin [B, S, D/2], full rotary, not interleaved):
        Before:  y = RotaryEmbedding(x, cos, sin)
        After:   c, s = Unsqueeze(cos, 1), Unsqueeze(sin, 1)                         # [B, 1, S, D/2]
                 x1, x2 = Split(x, 2, axis=-1)
                 y = Concat(x1 * c - x2 * s, x2 * c + x1 * s, axis=-1)

    Attention (4-D Q [B, H, S, D], K/V [B, H, T, D] with as many heads as Q (or one), no past inputs, no softcap):
        Before:  y = Attention(q, k, v, mask, scale=a)
        After:   scores = MatMul(q, Transpose(k, [0, 1, 3, 2])) * a
                 scores = Where(mask, scores, lowest float)     # a boolean mask (True = attend)
                          | scores + mask                       # an additive float mask
                 y = MatMul(Softmax(scores, axis=-1), v)
        (is_causal adds ONNX's causal mask: query i sees keys j <= i, the upper-left aligned triangle.)

The masked score is the lowest finite float, not -inf: a query whose keys are all masked (a left-padding
position) then averages instead of producing NaN, and a masked key gets exactly zero weight, so padding
never leaks into real positions. Nodes outside these forms (partial or interleaved rotary, position_ids
input, grouped K/V heads, past inputs, softcap) are left in place and listed in `skipped`.

Pipeline: targets without the opset-23 ops (TVM), on a phase graph after SplitPhasesPass.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


class _Builder:
    """Appends standard-op nodes before an anchor node, with fresh constant initializers."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str) -> None:
        self.graph, self.anchor, self.prefix, self.n = graph, anchor, prefix, 0

    def const(self, array: np.ndarray) -> ir.Value:
        self.n += 1
        name = f"{self.prefix}_c{self.n}"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype, value.shape = value.const_value.dtype, ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list, outputs: int = 1, **attrs) -> ir.Value | tuple[ir.Value, ...]:
        attributes = [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) if isinstance(v, int)
                      else ir.AttrFloat32(k, v) for k, v in attrs.items()]
        node = ir.Node("", op_type, inputs, attributes=attributes, num_outputs=outputs)
        self.n += 1
        node.name = f"{self.prefix}_{op_type}_{self.n}"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)


class DecomposeAttentionPass(ir.passes.InPlacePass):
    """RotaryEmbedding and Attention (opset 23) -> standard ops (module doc); `skipped` lists what stayed."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.skipped = []
        graph = model.graph
        done = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "RotaryEmbedding":
                reason = self._rotary(graph, node)
            elif node.op_type == "Attention":
                reason = self._attention(graph, node)
            else:
                continue
            if reason:
                self.skipped.append(f"{node.name}: {reason}")
            else:
                done += 1
        if self.skipped:
            log.warning("DecomposeAttentionPass left %d nodes: %s", len(self.skipped), self.skipped[:3])
        return ir.passes.PassResult(model, modified=done > 0)

    @staticmethod
    def _rotary(graph: ir.Graph, node: ir.Node) -> str | None:
        x, cos, sin = node.inputs[:3]
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return "position_ids input"
        if _int_attr(node, "interleaved", 0):
            return "interleaved rotary"
        if x is None or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return "input is not [B, H, S, D] with a static D"
        if _int_attr(node, "rotary_embedding_dim", 0) not in (0, x.shape[3]):
            return "partial rotary"
        b = _Builder(graph, node, node.name or "rope")
        axis1 = b.const(np.array([1], dtype=np.int64))
        c, s = b.op("Unsqueeze", [cos, axis1]), b.op("Unsqueeze", [sin, axis1])
        x1, x2 = b.op("Split", [x], outputs=2, axis=-1, num_outputs=2)
        first = b.op("Sub", [b.op("Mul", [x1, c]), b.op("Mul", [x2, s])])
        second = b.op("Add", [b.op("Mul", [x2, c]), b.op("Mul", [x1, s])])
        y = b.op("Concat", [first, second], axis=-1)
        y.dtype, y.shape = node.outputs[0].dtype, node.outputs[0].shape
        _replace(graph, node, [y])
        return None

    @staticmethod
    def _attention(graph: ir.Graph, node: ir.Node) -> str | None:
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        if len(node.inputs) > 4 and any(i is not None for i in node.inputs[4:]):
            return "past key/value inputs"
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return "present / qk outputs in use"
        softcap = node.attributes.get("softcap")
        if softcap is not None and softcap.as_float() != 0.0:
            return "softcap"
        shapes = [t.shape if t is not None else None for t in (q, k, v)]
        if any(s is None or len(s) != 4 for s in shapes):
            return "inputs are not 4-D [B, H, S, D]"
        if not (isinstance(shapes[0][3], int)):
            return "head_dim not static"
        hq, hk, hv = (sh[1] for sh in shapes)
        # MatMul broadcasting is exact for equal head counts and for one K/V head; other static mismatches are
        # grouped heads (unknown counts are left to the MatMul, which refuses a mismatch at run time)
        if any(isinstance(h, int) and isinstance(hq, int) and h not in (hq, 1) for h in (hk, hv)):
            return "grouped K/V heads (expand them first)"
        scale = node.attributes.get("scale")
        scale = scale.as_float() if scale is not None else 1.0 / float(np.sqrt(shapes[0][3]))
        b = _Builder(graph, node, node.name or "attn")
        kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
        scores = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(np.array(scale, dtype=np.float32))])
        lowest = b.const(np.array(np.finfo(np.float32).min, dtype=np.float32))
        if _int_attr(node, "is_causal", 0):
            scores = b.op("Where", [_causal_mask(b, q, k), scores, lowest])
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                scores = b.op("Where", [mask, scores, lowest])
            else:
                scores = b.op("Add", [scores, mask])
        y = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])
        y.dtype, y.shape = node.outputs[0].dtype, node.outputs[0].shape
        _replace(graph, node, [y])
        return None


def _causal_mask(b: _Builder, q: ir.Value, k: ir.Value) -> ir.Value:
    """Boolean [S, T]: query i sees keys j <= i (ONNX's is_causal: the upper-left aligned lower triangle)."""
    zero, one = b.const(np.array(0, dtype=np.int64)), b.const(np.array(1, dtype=np.int64))
    rows = b.op("Range", [zero, b.op("Squeeze", [b.op("Shape", [q], start=2, end=3)]), one])  # [S]
    cols = b.op("Range", [zero, b.op("Squeeze", [b.op("Shape", [k], start=2, end=3)]), one])  # [T]
    return b.op("LessOrEqual", [cols, b.op("Unsqueeze", [rows, b.const(np.array([1], dtype=np.int64))])])


def _replace(graph: ir.Graph, node: ir.Node, new_outputs: list[ir.Value]) -> None:
    for old, new in zip(node.outputs, new_outputs):
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{name}.decomposed"
        new.name = name
    graph.remove(node, safe=True)
