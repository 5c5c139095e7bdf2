"""SmoothQuantPass: move activation outlier channels into the weights before W8A8 quantization.

For the MatMuls reading one activation x[..., K] (e.g. q/k/v, or gate/up), with calibration
absmax a[K] of x and w[K] = max over those MatMuls' weights of |W[k, :]|:

    f[k] = a[k]**alpha / w[k]**(1 - alpha)     (clipped to [1e-5, 1e5]; 1 where a or w is 0)
    x @ W == (x / f) @ (f[:, None] * W)

The division by f is folded into whatever produces x, so it costs nothing at run time:

    Before:  x = RMSNormalization(h, g);         y_i = MatMul(x, W_i)
    After:   x = RMSNormalization(h, g / f);     y_i = MatMul(x, f[:, None] * W_i)

    Before:  x = Mul(SiLU-ish(a), MatMul(u, W_up));   y = MatMul(x, W_down)
    After:   x = Mul(SiLU-ish(a), MatMul(u, W_up / f[None, :]));   y = MatMul(x, f[:, None] * W_down)

    otherwise (e.g. the attention output feeding o_proj), when `insert_mul` is set:
    After:   x_s = Mul(x, 1 / f);   y = MatMul(x_s, f[:, None] * W)

Folding into a producer needs every consumer of x to be one of the smoothed MatMuls; a norm
scale shared with other readers is copied first, a producer MatMul's weight must have no other reader. RMSNormalization, SimplifiedLayerNormalization and
LayerNormalization (scale and bias) are recognized.

`smoothed_stats` (after the pass ran) holds the calibration statistics of the smoothed
activations (a / f), keyed by the activation value names of the rewritten graph, for the static
activation scales computed next. Run by QuantizeActivationsPass when `smoothquant_alpha` is set.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from twophase.passes.quantize_activations import (
    ActivationStats,
    MatMulFilter,
    _const,
    quantizable_matmuls,
    weight_of,
)

log = logging.getLogger(__name__)

NORM_OPS = {"RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"}
F_MIN, F_MAX = 1e-5, 1e5


def smoothing_factors(act_absmax_K: np.ndarray, weight_absmax_K: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel factor f = a**alpha / w**(1-alpha) (1 where undefined), float32 [K]."""
    a = np.asarray(act_absmax_K, np.float64)
    w = np.asarray(weight_absmax_K, np.float64)
    ok = (a > 0) & (w > 0)
    f = np.ones_like(a)
    f[ok] = np.clip(a[ok] ** alpha / w[ok] ** (1.0 - alpha), F_MIN, F_MAX)
    return f.astype(np.float32)


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)


def _private_const(value: ir.Value | None) -> bool:
    """A float initializer read by exactly one node."""
    return value is not None and value.const_value is not None and len(value.uses()) == 1 and not value.is_graph_output()


class SmoothQuantPass(ir.passes.InPlacePass):
    """Scale activation channels down and weight rows up by SmoothQuant factors (see module doc).

    Args:
        calibration: per-channel absmax of each MatMul activation input, keyed by value name.
        alpha: migration strength in [0, 1] (0.5 is SmoothQuant's default).
        skip: MatMuls to leave alone (they are also left in float by QuantizeActivationsPass).
        insert_mul: smooth activations with no foldable producer through an explicit Mul.
    """

    def __init__(self, calibration: ActivationStats, alpha: float, skip: MatMulFilter | None = None,
                 insert_mul: bool = True) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
        self.calibration = calibration
        self.alpha = alpha
        self.skip = skip
        self.insert_mul = insert_mul
        self.smoothed_stats: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.smoothed_stats = {k: np.asarray(v, np.float32) for k, v in self.calibration.items()}
        groups: dict[int, list[ir.Node]] = {}
        for node in quantizable_matmuls(graph, self.skip):
            groups.setdefault(id(node.inputs[0]), []).append(node)
        counts = {"norm": 0, "matmul": 0, "mul": 0, "none": 0}
        for nodes in groups.values():
            x = nodes[0].inputs[0]
            if x.name not in self.calibration:
                counts["none"] += 1
                continue
            if any(not _private_const(n.inputs[1]) for n in nodes):
                counts["none"] += 1  # a weight shared with another reader cannot be rescaled
                continue
            w_absmax = np.max([np.abs(weight_of(n)).max(axis=1) for n in nodes], axis=0)
            f = smoothing_factors(self.calibration[x.name], w_absmax, self.alpha)
            how = self._fold_into_producer(graph, x, nodes, f)
            if how == "none":
                counts["none"] += 1
                continue
            for n in nodes:
                _set_const(n.inputs[1], weight_of(n) * f[:, None])
            counts[how] += 1
        log.info("SmoothQuantPass(alpha=%s): folded into %d norms, %d producer MatMuls, %d Muls; %d not smoothed",
                 self.alpha, counts["norm"], counts["matmul"], counts["mul"], counts["none"])
        return ir.passes.PassResult(model, counts["norm"] + counts["matmul"] + counts["mul"] > 0)

    def _fold_into_producer(self, graph: ir.Graph, x: ir.Value, nodes: list[ir.Node], f: np.ndarray) -> str:
        """Divide x by f: in its producer's constants if possible, else by a Mul. Returns how."""
        stats = self.smoothed_stats.pop(x.name)
        only_ours = {id(u.node) for u in x.uses()} == {id(n) for n in nodes} and not x.is_graph_output()
        producer = x.producer()
        if only_ours and producer is not None and producer.op_type in NORM_OPS:
            consts = [v for v in producer.inputs[1:3] if v is not None]
            if all(v.const_value is not None and v.const_value.numpy().shape == f.shape for v in consts):
                for i, v in enumerate(producer.inputs[1:3], start=1):
                    if v is None:
                        continue
                    if not _private_const(v):  # a scale shared by several norms: give this one a copy
                        producer.replace_input_with(i, _const(graph, f"{v.name}_smoothed", v.const_value.numpy() / f))
                    else:
                        _set_const(v, v.const_value.numpy() / f)
                self.smoothed_stats[x.name] = stats / f
                return "norm"
        if only_ours and producer is not None and producer.op_type == "Mul":
            for operand in producer.inputs:
                mm = operand.producer() if operand is not None else None
                if mm is None or len(operand.uses()) != 1 or weight_of(mm) is None or not _private_const(mm.inputs[1]):
                    continue
                if weight_of(mm).shape[1] != f.shape[0] or x.shape is None or operand.shape != x.shape:
                    continue  # a broadcasting Mul would spread the column scale elsewhere
                _set_const(mm.inputs[1], weight_of(mm) / f[None, :])
                self.smoothed_stats[x.name] = stats / f
                return "matmul"
        if not self.insert_mul:
            self.smoothed_stats[x.name] = stats
            return "none"
        tape = ir.tape.Tape()
        xs = tape.op("Mul", [x, _const(graph, f"{x.name}_smooth_inv", (1.0 / f).astype(np.float32))])
        xs.name = f"{x.name}_smoothed"
        xs.shape, xs.type = x.shape, x.type
        graph.insert_before(nodes[0], tape.nodes)
        for n in nodes:
            n.replace_input_with(0, xs)
        self.smoothed_stats[xs.name] = stats / f
        return "mul"
