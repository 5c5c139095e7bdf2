"""QuantizeActivationsPass: standard-ONNX W8A8 QDQ around MatMuls with constant weights.

Every MatMul whose B input is a 2-D float initializer W[K, N] (and that `skip` does not exclude)
gets int8 weights and int8 activations in plain QDQ form, which any ONNX runtime executes and
which FuseInt8MatMulPass turns into ORT's integer GEMM.

DYNAMIC (per-token scales computed in the graph; one quantization per distinct activation):

    Before:  y[B,S,N] = MatMul(x[B,S,K], W[K,N])
    After:   x2[M,K]  = Reshape(x, [-1, K])                                   # M = B*S
             s[M]     = Max(Mul(ReduceMax(Abs(x2), axes=[1], keepdims=0), 1/127), eps)
             xq[M,K]  = QuantizeLinear(x2, s, axis=0, output_dtype=int8)       # symmetric, no zp
             xd[M,K]  = DequantizeLinear(xq, s, axis=0)
             wd[K,N]  = DequantizeLinear(Wq[K,N] int8, Ws[N], axis=1)          # per output channel
             y        = Reshape(MatMul(xd, wd), Concat(Shape(x, end=-1), [N]))

STATIC (one calibrated per-tensor scale per activation):

    After:   xd = DequantizeLinear(QuantizeLinear(x, s_c, zp=int8 0), s_c, zp=int8 0)
             y  = MatMul(xd, DequantizeLinear(Wq, Ws, axis=1))

STATIC with `per_token` (e.g. `input_wider_than(hidden_size)`, the MLP down projections): those
MatMuls get the DYNAMIC form, optionally after milder SmoothQuant (`per_token_smoothquant_alpha`),
the rest the STATIC one. A per-tensor scale of a down projection's input is set by rare values
(SmolLM2-135M: absmax / mean |x| of 50 typically, up to 3e4, against <= 50 for the other MatMul
inputs) that leave the other tokens a few codes; there, static everywhere costs +20..30% perplexity,
static except the down projections (alphas 0.9 / 0.4) +2.0% against +1.7% for all-dynamic.

Weights are 7-bit by default (codes in [-63, 63], `weight_bits=7`): ORT's u8 x s8 GEMM on AVX2
without VNNI sums pairs of u8*s8 products in saturating int16 (vpmaddubsw); 255*63*2 = 32130 fits,
255*127*2 does not. Activations are symmetric int8 here; the ORT fusion turns them into u8 with
zero point 128 on the same grid (u8 x s8 is the fast MLAS path; s8 x s8 is not).

SmoothQuant (optional, `smoothquant_alpha`) runs first via SmoothQuantPass and needs calibration
statistics; the static mode always needs them. Statistics: `ActivationStats`, a mapping from the
name of each MatMul's activation input value (input 0) to its per-input-channel absmax over the
calibration text, float32 [K] (the same graph the pass sees, i.e. the phase graph).

Preconditions: opset >= 21 (per-axis QuantizeLinear with output_dtype). Pipeline: after
SplitPhasesPass/CleanupPass on the prefill graph, before FuseInt8MatMulPass.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from twophase.compiler.options import ActivationMode

log = logging.getLogger(__name__)

# value name of a MatMul's activation input -> per-input-channel absmax float32 [K]
ActivationStats = Mapping[str, np.ndarray]
MatMulFilter = Callable[[ir.Node], bool]

# Smallest per-token scale: keeps an all-zero row finite (its codes are all 0 anyway).
SCALE_EPS = 1e-10
DEFAULT_WEIGHT_BITS = 7


# ---------------------------------------------------------------------------------------------
# Quantization math (the NumPy reference of every formula the graphs compute)


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """W[K, N] ~= codes[K, N] * scale[N]: symmetric per-output-channel int8 codes."""

    codes_KN: np.ndarray  # int8, |code| <= 2**(bits-1) - 1
    scale_N: np.ndarray  # float32
    bits: int

    def dequantize(self) -> np.ndarray:
        return self.codes_KN.astype(np.float32) * self.scale_N[None, :]


def quantize_weight_per_channel(w_KN: np.ndarray, bits: int = DEFAULT_WEIGHT_BITS) -> Int8Weight:
    """Symmetric round-to-nearest-even per output channel; qmax = 2**(bits-1) - 1 (63 for 7 bits)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in 2..8, got {bits}")
    qmax = float(2 ** (bits - 1) - 1)
    w = np.asarray(w_KN, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / scale[None, :]), -qmax, qmax).astype(np.int8)
    return Int8Weight(codes, scale, bits)


def per_token_scale(x_MK: np.ndarray) -> np.ndarray:
    """Dynamic activation scale per row: max(absmax(row) / 127, SCALE_EPS), float32 [M]."""
    amax = np.abs(x_MK).max(axis=1).astype(np.float32)
    return np.maximum(amax * np.float32(1.0 / 127.0), np.float32(SCALE_EPS))


def quantize_symmetric(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ONNX QuantizeLinear to int8 without zero point: saturate(round_half_even(x / scale))."""
    return np.clip(np.rint(x / scale), -128, 127).astype(np.int8)


def reference_w8a8_matmul(x: np.ndarray, w: Int8Weight, mode: ActivationMode, static_scale: float | None = None) -> np.ndarray:
    """What the QDQ graph computes for y = x @ W (x [..., K]), in float64 then float32."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).astype(np.float32)
    if mode is ActivationMode.DYNAMIC:
        s = per_token_scale(x2)[:, None]
    else:
        s = np.float32(static_scale)
    xd = quantize_symmetric(x2, s).astype(np.float64) * s
    y = xd @ w.dequantize().astype(np.float64)
    return y.reshape(*x.shape[:-1], -1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Matching


def weight_of(node: ir.Node) -> np.ndarray | None:
    """The float32 [K, N] constant B input of a MatMul, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    if b is None or b.const_value is None or b.dtype != ir.DataType.FLOAT:
        return None
    if b.shape is None or len(b.shape) != 2:
        return None
    return b.const_value.numpy()


def produces_graph_output(node: ir.Node) -> bool:
    """Skip helper: True for a MatMul whose result is a graph output (e.g. the lm_head in prefill,
    which runs on one position only, so quantizing it buys no prefill time)."""
    return any(out.is_graph_output() for out in node.outputs)


def input_wider_than(width: int) -> MatMulFilter:
    """Filter: MatMuls whose weight has more than `width` rows (K > width). With the model's hidden
    size, these are a decoder's MLP down projections, whose inputs carry rare huge values that a
    per-tensor static scale cannot cover: use it as `per_token` with STATIC."""

    def wider(node: ir.Node) -> bool:
        w = weight_of(node)
        return w is not None and w.shape[0] > width

    return wider


def quantizable_matmuls(graph: ir.Graph, skip: MatMulFilter | None) -> list[ir.Node]:
    """MatMuls with a constant float [K, N] weight and a float activation input, minus `skip`."""
    found = []
    for node in graph:
        if weight_of(node) is None or node.inputs[0] is None:
            continue
        if node.inputs[0].dtype not in (ir.DataType.FLOAT, None):
            continue
        if skip is not None and skip(node):
            continue
        found.append(node)
    return found


# ---------------------------------------------------------------------------------------------
# The pass


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register an initializer (a fresh name if taken) and return its value."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class QuantizeActivationsPass(ir.passes.InPlacePass):
    """Insert W8A8 QDQ (int8 weights per channel, int8 activations per token or per tensor).

    Args:
        mode: DYNAMIC (per-token scales in the graph) or STATIC (calibrated per-tensor scales).
        calibration: per-channel activation absmax (`ActivationStats`); required for STATIC and
            for SmoothQuant, unused otherwise.
        smoothquant_alpha: migrate activation outliers into the weights with this alpha (0..1);
            None: no smoothing.
        skip: MatMuls to leave in float (e.g. `produces_graph_output` for the lm_head).
        weight_bits: 7 (default; saturation-safe on AVX2 u8 x s8 kernels) or 8.
        per_token: STATIC only: MatMuls whose activation gets dynamic per-token scales anyway
            (the few whose inputs have token outliers a per-tensor scale cannot cover); a value
            read by several MatMuls takes the form chosen for its first reader.
        per_token_smoothquant_alpha: SmoothQuant alpha for the `per_token` MatMuls (default:
            `smoothquant_alpha`); per-token scales take milder smoothing than per-tensor ones.
    """

    def __init__(
        self,
        mode: ActivationMode = ActivationMode.DYNAMIC,
        calibration: ActivationStats | None = None,
        smoothquant_alpha: float | None = None,
        skip: MatMulFilter | None = None,
        weight_bits: int = DEFAULT_WEIGHT_BITS,
        per_token: MatMulFilter | None = None,
        per_token_smoothquant_alpha: float | None = None,
    ) -> None:
        super().__init__()
        if (mode is ActivationMode.STATIC or smoothquant_alpha is not None) and calibration is None:
            raise ValueError("static activation scales and SmoothQuant need calibration statistics")
        self.per_token = per_token
        self.per_token_smoothquant_alpha = per_token_smoothquant_alpha
        if per_token_smoothquant_alpha is not None and (per_token is None or smoothquant_alpha is None):
            raise ValueError("per_token_smoothquant_alpha needs per_token and smoothquant_alpha")
        self.mode = mode
        self.calibration = calibration
        self.smoothquant_alpha = smoothquant_alpha
        self.skip = skip
        self.weight_bits = weight_bits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stats = self.calibration
        if self.smoothquant_alpha is not None:
            from twophase.passes.smooth_quant import SmoothQuantPass

            if self.per_token_smoothquant_alpha is None:
                sq = SmoothQuantPass(stats, self.smoothquant_alpha, skip=self.skip)
                sq(model)
                stats = sq.smoothed_stats
            else:  # two alphas: the static MatMuls first, then the per-token ones
                skip, per_token = self.skip, self.per_token
                for alpha, chosen in ((self.smoothquant_alpha, False), (self.per_token_smoothquant_alpha, True)):
                    sq = SmoothQuantPass(stats, alpha, skip=lambda n, c=chosen: (skip is not None and skip(n))
                                         or per_token(n) != c)
                    sq(model)
                    stats = sq.smoothed_stats
        opset = model.opset_imports.get("", 0)
        if opset < 21:
            raise ValueError(f"QuantizeActivationsPass needs opset >= 21, the model has {opset}")
        nodes = quantizable_matmuls(graph, self.skip)
        cache: dict[int, tuple] = {}  # id(activation value) -> quantized activation parts
        for node in nodes:
            x = node.inputs[0]
            if not self._dynamic(node) and id(x) not in cache and (stats is None or x.name not in stats):
                log.warning("no calibration statistics for %s (input of %s): left in float", x.name, node.name)
                continue
            self._rewrite(graph, node, x, stats, cache)
        log.info("QuantizeActivationsPass: %d MatMuls quantized (%s, %d-bit weights), %d activations",
                 len(nodes), self.mode.value, self.weight_bits, len(cache))
        return ir.passes.PassResult(model, bool(nodes))

    # -- activation side, shared by all MatMuls reading the same value
    def _quantize_activation(self, graph: ir.Graph, node: ir.Node, x: ir.Value, stats: ActivationStats | None) -> tuple:
        tape = ir.tape.Tape()
        tag = x.name or node.name
        K = weight_of(node).shape[0]
        if self._dynamic(node):
            x2 = tape.op("Reshape", [x, _const(graph, f"{tag}_shape_MK", np.array([-1, K], np.int64))],
                         name=f"{tag}_to_MK")
            amax = tape.op("ReduceMax", [tape.op("Abs", [x2]), _const(graph, f"{tag}_axes1", np.array([1], np.int64))],
                           {"keepdims": 0})
            s = tape.op("Max", [tape.op("Mul", [amax, _const(graph, f"{tag}_inv127", np.array(1 / 127, np.float32))]),
                                _const(graph, f"{tag}_eps", np.array(SCALE_EPS, np.float32))])
            s.name = f"{tag}_scale_M"
            s.dtype = ir.DataType.FLOAT
            xq = tape.op("QuantizeLinear", [x2, s], {"axis": 0, "output_dtype": ir.DataType.INT8.value})
            xq.name = f"{tag}_q8_MK"
            xq.dtype = ir.DataType.INT8
            xd = tape.op("DequantizeLinear", [xq, s], {"axis": 0})
            prefix = tape.op("Shape", [x], {"end": -1})
            parts = (xd, prefix)
        else:
            amax = float(np.max(stats[x.name]))
            scale = np.array(max(amax / 127.0, SCALE_EPS), np.float32)
            s = _const(graph, f"{tag}_scale", scale)
            zp = _const(graph, f"{tag}_zp", np.array(0, np.int8))
            xq = tape.op("QuantizeLinear", [x, s, zp])
            xq.name = f"{tag}_q8"
            xq.dtype = ir.DataType.INT8
            xd = tape.op("DequantizeLinear", [xq, s, zp])
            parts = (xd, None)
        graph.insert_before(node, tape.nodes)
        return parts

    def _dynamic(self, node: ir.Node) -> bool:
        return self.mode is ActivationMode.DYNAMIC or (self.per_token is not None and self.per_token(node))

    def _rewrite(self, graph: ir.Graph, node: ir.Node, x: ir.Value, stats: ActivationStats | None, cache: dict) -> None:
        key = id(x)
        if key not in cache:
            cache[key] = self._quantize_activation(graph, node, x, stats)
        xd, prefix = cache[key]
        w = weight_of(node)
        _K, N = w.shape
        qw = quantize_weight_per_channel(w, self.weight_bits)
        wname = node.inputs[1].name or f"{node.name}_W"
        codes = _const(graph, f"{wname}_q{self.weight_bits}", qw.codes_KN)
        scale = _const(graph, f"{wname}_scale_N", qw.scale_N)
        tape = ir.tape.Tape()
        wd = tape.op("DequantizeLinear", [codes, scale], {"axis": 1})
        y_old = node.outputs[0]
        if prefix is None:  # static: same rank as before
            y = tape.op("MatMul", [xd, wd], name=node.name)
        else:
            y2 = tape.op("MatMul", [xd, wd], name=node.name)
            shape = tape.op("Concat", [prefix, _const(graph, f"{wname}_N", np.array([N], np.int64))], {"axis": 0})
            y = tape.op("Reshape", [y2, shape])
        y.shape, y.type = y_old.shape, y_old.type
        graph.insert_before(node, tape.nodes)
        w_value = node.inputs[1]
        y_old.replace_all_uses_with(y, replace_graph_outputs=True)
        name = y_old.name
        graph.remove(node, safe=True)
        y_old.name = None
        y.name = name
        if not w_value.uses() and not w_value.is_graph_output() and w_value.name in graph.initializers:
            graph.initializers.pop(w_value.name)
