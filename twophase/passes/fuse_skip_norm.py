"""FuseSkipNormPass: residual Add + RMSNorm -> ORT's SkipSimplifiedLayerNormalization (ORT target).

    Before:  s = Add(a, b)                                       # the residual stream
             y = RMSNormalization(s, gamma, axis=-1, epsilon)    # (or ORT's SimplifiedLayerNormalization)
             ... later readers of s (the next residual Add)
    After:   y, _, _, s = com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma, epsilon)

One kernel reads the two addends once and writes both the sum (for the next residual) and the
normalized value, instead of an Add writing s and the norm reading it back. a and b must have the
same static-rank-3 shape [B, S, H] (no broadcasting) and the norm must normalize the last axis only.
A norm without a residual Add in front (the first layer's) stays as it is: ORT runs RMSNormalization.

Pipeline: ORT target, after the quantization passes (SmoothQuant folds into gamma before this runs).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_NORMS = {("", "RMSNormalization"), ("ai.onnx", "RMSNormalization"), (MS_DOMAIN, "SimplifiedLayerNormalization")}


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    return all(x == y for x, y in zip(a.shape, b.shape)) and a.dtype == b.dtype == ir.DataType.FLOAT


class FuseSkipNormPass(ir.passes.InPlacePass):
    """Add + RMSNorm -> SkipSimplifiedLayerNormalization (module doc)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for norm in list(graph):
            if (norm.domain, norm.op_type) not in _NORMS or len(norm.inputs) < 2:
                continue
            axis = norm.attributes.get("axis")
            if axis is not None and axis.as_int() != -1:
                continue
            s = norm.inputs[0]
            add = s.producer() if s is not None else None
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                continue
            a, b = add.inputs
            if a is None or b is None or not _same_shape(a, b) or s.is_graph_output():
                continue
            eps = norm.attributes.get("epsilon")
            attrs = [ir.AttrFloat32("epsilon", eps.as_float() if eps is not None else 1e-5)]
            skip = ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], attributes=attrs,
                           num_outputs=4, name=f"{norm.name or 'norm'}_skip")
            y, _, _, total = skip.outputs
            graph.insert_before(norm, skip)
            for new, old in ((y, norm.outputs[0]), (total, s)):
                new.dtype, new.shape = old.dtype, old.shape
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                name = old.name
                old.name = f"{name}.unfused"
                new.name = name
            # the unused mean / inv_std_var outputs are left unnamed (empty) so ORT does not compute them
            skip.outputs[1].name = skip.outputs[2].name = ""
            graph.remove([norm, add], safe=True)
            fused += 1
        if fused:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            log.info("fused %d residual Add + RMSNorm pairs", fused)
        return ir.passes.PassResult(model, modified=fused > 0)
