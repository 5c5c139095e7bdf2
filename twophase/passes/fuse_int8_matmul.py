"""FuseInt8MatMulPass: W8A8 QDQ MatMuls -> ONNX Runtime's integer GEMM (u8 activations x s8 weights).

ORT's fast int8 GEMM (MLAS) takes u8 activations and s8 weights; s8 x s8 has no fast path on AVX2
(about 4x slower than fp32 measured here). So the symmetric int8 activations of the QDQ form are
re-expressed as u8 with zero point 128 on the same grid (identical values), and the GEMM, its
int32 -> float conversion and the per-output-channel weight scale become one
com.microsoft.MatMulIntegerToFloat; the per-token activation scale is one Mul on the output.

DYNAMIC (QuantizeActivationsPass, per-token scale s[M]):

    Before:  xq = QuantizeLinear(x2, s, axis=0, output_dtype=int8)
             y  = MatMul(DequantizeLinear(xq, s, axis=0), DequantizeLinear(Wq, Ws, axis=1))
    After:   xu = QuantizeLinear(x2, s, Expand(uint8 128, Shape(s)), axis=0)          # once per x
             s_M1 = Unsqueeze(s, [1])                                                   # once per x
             y  = Mul(MatMulIntegerToFloat(xu, Wq, 1.0, Ws, uint8 128), s_M1)

STATIC (scalar calibrated scale s_c, int8 zero point 0):

    Before:  y = MatMul(DequantizeLinear(QuantizeLinear(x, s_c, 0), s_c, 0), DequantizeLinear(Wq, Ws, axis=1))
    After:   y = MatMulIntegerToFloat(QuantizeLinear(x, s_c, uint8 128), Wq, s_c, Ws, uint8 128)

Correctness on AVX2 without VNNI: MLAS's u8 x s8 kernel adds pairs of u8*s8 products in saturating
int16 (vpmaddubsw), exact only while 255 * (|w_a| + |w_b|) <= 32767, i.e. |code| <= 64. A MatMul
whose weight codes exceed that is left in QDQ form with a warning unless `allow_8bit_weights`
(use on VNNI / AMX machines only, where MLAS accumulates in int32). QuantizeActivationsPass's
default 7-bit weights (|code| <= 63) always fuse.

Preconditions: QDQ exactly as QuantizeActivationsPass emits it (constant int8 weight codes with a
1-D per-output-channel scale on axis 1, no weight zero point). Pipeline: after
QuantizeActivationsPass, before lowering; ORT target only (TVM keeps the QDQ form).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from twophase.passes.quantize_activations import _const

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Largest |s8 weight code| for which u8 x s8 pair sums fit int16: 255 * 64 * 2 = 32640 <= 32767.
AVX2_SAFE_WEIGHT_CODE = 64


def _shared_const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer `name` if it already holds `array`, else a new one."""
    v = graph.initializers.get(name)
    if (v is not None and v.const_value is not None and v.dtype == ir.DataType.from_numpy(array.dtype)
            and np.array_equal(v.const_value.numpy(), array)):
        return v
    return _const(graph, name, array)


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else a.as_int()


def _quantized_dtype(q: ir.Node) -> ir.DataType | None:
    """Element type a QuantizeLinear produces: its zero point's, else output_dtype, else uint8."""
    if len(q.inputs) > 2 and q.inputs[2] is not None:
        return q.inputs[2].dtype
    out = _attr(q, "output_dtype", 0)
    return ir.DataType(out) if out else ir.DataType.UINT8


def _is_zero_or_none(v: ir.Value | None) -> bool:
    if v is None:
        return True
    return v.const_value is not None and not np.any(v.const_value.numpy())


class FuseInt8MatMulPass(ir.passes.InPlacePass):
    """Rewrite W8A8 QDQ MatMuls into MatMulIntegerToFloat (u8 zp 128 x s8), see module doc.

    Args:
        allow_8bit_weights: fuse MatMuls with weight codes beyond +-64 too (wrong on AVX2 without
            VNNI: only for machines whose MLAS int8 kernels accumulate in int32).
    """

    def __init__(self, allow_8bit_weights: bool = False) -> None:
        super().__init__()
        self.allow_8bit_weights = allow_8bit_weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if model.opset_imports.get(MS_DOMAIN) is None:
            model.opset_imports[MS_DOMAIN] = 1
        acts: dict[int, tuple[ir.Value, ir.Value | None, ir.Value]] = {}  # id(xq) -> (xu, s_M1, a_scale)
        fused = 0
        for node in list(graph):
            match = self._match(node)
            if isinstance(match, str):
                if node.op_type == "MatMul" and match != "not a MatMul of two DequantizeLinear":
                    log.debug("%s not fused: %s", node.name, match)
                continue
            xq_node, wq, ws = match
            key = id(xq_node.outputs[0])
            if key not in acts:
                acts[key] = self._requantize_u8(graph, xq_node)
            xu, s_M1, a_scale = acts[key]
            zp = _shared_const(graph, "twophase_u8_zp128", np.array(128, np.uint8))
            tape = ir.tape.Tape()
            y = tape.op("MatMulIntegerToFloat", [xu, wq, a_scale, ws, zp], domain=MS_DOMAIN, name=node.name)
            if s_M1 is not None:
                y = tape.op("Mul", [y, s_M1])
            y_old = node.outputs[0]
            y.shape, y.type = y_old.shape, y_old.type
            graph.insert_before(node, tape.nodes)
            y_old.replace_all_uses_with(y, replace_graph_outputs=True)
            name = y_old.name
            graph.remove(node, safe=True)
            y_old.name = None
            y.name = name
            fused += 1
        self._remove_dead(graph)
        log.info("FuseInt8MatMulPass: %d MatMuls fused into MatMulIntegerToFloat, %d activations", fused, len(acts))
        return ir.passes.PassResult(model, fused > 0)

    def _match(self, node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | str:
        """(activation QuantizeLinear, weight codes, weight scales), or why the node does not match."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return "not a MatMul of two DequantizeLinear"
        dqx, dqw = (v.producer() if v is not None else None for v in node.inputs)
        if dqx is None or dqw is None or dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear":
            return "not a MatMul of two DequantizeLinear"
        wq, ws = dqw.inputs[0], dqw.inputs[1]
        if wq.const_value is None or wq.dtype != ir.DataType.INT8 or wq.shape is None or len(wq.shape) != 2:
            return "weight codes are not a constant int8 [K, N] initializer"
        if ws.const_value is None or ws.const_value.numpy().size not in (1, wq.shape[1]):
            return "weight scale is neither per tensor nor per output channel"
        if ws.const_value.numpy().size > 1 and _attr(dqw, "axis", 1) not in (1, -1):
            return "weight scale is not on the output-channel axis"
        if len(dqw.inputs) > 2 and not _is_zero_or_none(dqw.inputs[2]):
            return "weight zero point is not 0"
        if _attr(dqw, "block_size", 0):
            return "blocked weight quantization"
        code_max = int(np.abs(wq.const_value.numpy().astype(np.int16)).max())
        if code_max > AVX2_SAFE_WEIGHT_CODE and not self.allow_8bit_weights:
            log.warning("%s: weight codes up to %d would saturate int16 in AVX2 u8 x s8 kernels; left as QDQ "
                        "(quantize weights to 7 bits)", node.name, code_max)
            return f"weight codes up to {code_max} (> {AVX2_SAFE_WEIGHT_CODE})"
        qx = dqx.inputs[0].producer()
        if qx is None or qx.op_type != "QuantizeLinear":
            return "activation DequantizeLinear does not read a QuantizeLinear"
        if _quantized_dtype(qx) != ir.DataType.INT8 or dqx.inputs[1] is not qx.inputs[1]:
            return "activation quantization is not int8 with the scale shared by Q and DQ"
        if not _is_zero_or_none(qx.inputs[2] if len(qx.inputs) > 2 else None):
            return "activation zero point is not 0"
        s = qx.inputs[1]
        per_token = s.const_value is None
        if per_token and (_attr(qx, "axis", 1) != 0 or (s.shape is not None and len(s.shape) != 1)):
            return "dynamic activation scale is not per row (1-D, axis 0) of a 2-D view"
        if not per_token and s.const_value.numpy().size != 1:
            return "static activation scale is not per tensor"
        return qx, wq, ws

    def _requantize_u8(self, graph: ir.Graph, qx: ir.Node) -> tuple[ir.Value, ir.Value | None, ir.Value]:
        """u8 (zero point 128) codes of the activation on the grid of the int8 QuantizeLinear `qx`."""
        x, s = qx.inputs[0], qx.inputs[1]
        tape = ir.tape.Tape()
        if s.const_value is None:  # per token: 1-D zero point of M entries, [M, 1] output scale
            zp_M = tape.op("Expand", [_shared_const(graph, "twophase_u8_zp128", np.array(128, np.uint8)),
                                      tape.op("Shape", [s])])
            xu = tape.op("QuantizeLinear", [x, s, zp_M], {"axis": 0})
            s_M1 = tape.op("Unsqueeze", [s, _shared_const(graph, "twophase_axes1", np.array([1], np.int64))])
            a_scale = _shared_const(graph, "twophase_one", np.array(1.0, np.float32))
        else:
            xu = tape.op("QuantizeLinear", [x, s, _shared_const(graph, "twophase_u8_zp128", np.array(128, np.uint8))])
            s_M1, a_scale = None, s
        xu.name = f"{qx.outputs[0].name}_u8"
        graph.insert_after(qx, tape.nodes)
        return xu, s_M1, a_scale

    @staticmethod
    def _remove_dead(graph: ir.Graph) -> None:
        """Drop the now unused int8 Q/DQ nodes and initializers."""
        freed: list[ir.Value] = []
        changed = True
        while changed:
            changed = False
            for node in reversed(list(graph)):
                if node.op_type in ("QuantizeLinear", "DequantizeLinear") and all(
                    not o.uses() and not o.is_graph_output() for o in node.outputs
                ):
                    freed.extend(v for v in node.inputs if v is not None and v.const_value is not None)
                    graph.remove(node, safe=True)
                    changed = True
        for v in freed:
            if not v.uses() and not v.is_graph_output() and graph.initializers.get(v.name) is v:
                graph.initializers.pop(v.name)
