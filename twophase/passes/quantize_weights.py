"""QuantizeWeightsPass: weight-only quantization as standard ONNX QDQ (DequantizeLinear on initializers).

Each float32 MatMul weight initializer W[K, N] (the lm_head included) and the embedding table
E[V, D] read by Gather are replaced by integer codes and a DequantizeLinear (opset >= 21) that
rebuilds them, so any ONNX runtime runs the result and a target fusion (FuseDequantMatMulPass for
ONNX Runtime) can turn each pair into one quantized kernel:

    int8 per output channel (w8a16, block_size=None):
        Before:  y = MatMul(x, W)                                   W: float32 [K, N]
        After:   y = MatMul(x, DequantizeLinear(W_q, W_s, axis=1))  W_q: int8 [K, N], W_s: [N]
    int4 / uint4 blocked along K (w4a16, block_size=bs):
        After:   y = MatMul(x, DequantizeLinear(W_q, W_s[, W_z], axis=0, block_size=bs))
                 W_q: int4 [K, N] (uint4 with W_z: uint4 [G, N] when asymmetric), W_s: [G, N]
    float zero points (GGUF Q4_1: W = d * q + m, m off the integer grid):
        After:   y = MatMul(x, Add(DequantizeLinear(W_q, W_s, axis=0, block_size=bs),
                                   Reshape(Expand(W_m, [G, bs, N]), [G*bs, N])))     # [Slice to K]
                 W_q: uint4 [K, N], W_s and W_m: [G, N] stored as [G, 1, N], expanded at run time
    embedding (include_embedding):
        Before:  h = Gather(E, input_ids)                           E: float32 [V, D]
        After:   h = Gather(DequantizeLinear(E_q, E_s, axis=0), input_ids)           per row, or
                 h = Gather(DequantizeLinear(E_q, E_s, axis=1, block_size=bs), input_ids)
                 (blocks run along D, so the table and a tied lm_head share one grid)

Codes come from, per weight: the GGUF grid the weight already sits on (algorithm GGUF: Q4_0 / Q4_1 /
Q8_0 recovered exactly from the float values, any bit width, rebuilt bit for bit; RTN where none
is found), a `quantizer` hook (GPTQ: name, W[K, N] -> QuantizedWeight, None = use RTN), or
round to nearest (kernels/quant.py has the grids). Initializer names derive from the weight's name
and the codes are deterministic, so prefill and decode graphs quantized alike share their bytes.

One DequantizeLinear is inserted per consumer (a weight read by two MatMuls gets two DQ nodes over
the same initializers) so that every DQ -> MatMul pair can be fused on its own. The float weight is
removed once nothing reads it.

Preconditions: default-domain opset >= 21 (PassError otherwise). Embedding tables are Gathers on
axis 0 of a 2-D float32 initializer indexed by a graph input. Weights that are not float32 2-D
initializers are left alone.

Pipeline: after SplitPhasesPass (and its cleanup), before FuseDequantMatMulPass / lowering. Keep
constant folding away from its output (CleanupPass never folds large initializers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from twophase.compiler.errors import PassError
from twophase.compiler.options import PhaseOptions, QuantScheme, WeightAlgorithm
from twophase.kernels.formats import QuantizedWeight
from twophase.kernels.quant import detect_gguf_grid, float_offset_GN, pack_int4, quantize_rtn
from twophase.passes.split_phases import find_lm_head

log = logging.getLogger(__name__)

MIN_OPSET = 21
Quantizer = Callable[[str, np.ndarray], "QuantizedWeight | None"]


class QuantizePreconditionError(PassError, ir.passes.PreconditionError):
    """A graph QuantizeWeightsPass cannot rewrite (opset too old)."""


@dataclasses.dataclass(frozen=True)
class EncodedWeight:
    """A weight's quantized form and where it came from ("rtn", "gguf:q4_1", "quantizer")."""

    weight: QuantizedWeight
    offset_GN: np.ndarray | None  # exact additive offset for float zero points (else derived)
    source: str

    @property
    def float_zero_point(self) -> bool:
        zp = self.weight.zero_point_GN
        return zp is not None and np.issubdtype(zp.dtype, np.floating)


def codes_dtype(qw: QuantizedWeight) -> ir.DataType:
    """ONNX element type of the codes: INT4/UINT4 for 4 bits, INT8/UINT8 for 8."""
    if qw.bits == 4:
        return ir.DataType.INT4 if qw.signed else ir.DataType.UINT4
    if qw.bits == 8:
        return ir.DataType.INT8 if qw.signed else ir.DataType.UINT8
    raise PassError(f"{qw.bits}-bit codes have no ONNX DequantizeLinear type (use 4 or 8)")


def int_tensor(codes: np.ndarray, dtype: ir.DataType, name: str) -> ir.TensorProtocol:
    """An ONNX tensor of integer codes; INT4/UINT4 packed two per byte, low nibble first (pack_int4)."""
    if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return ir.PackedTensor(pack_int4(codes), dtype, shape=codes.shape, name=name)
    return ir.tensor(codes.astype(dtype.numpy()), dtype=dtype, name=name)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Insert DequantizeLinear on MatMul weights (lm_head included) and the embedding table (see module doc).

    Args:
        bits: 4 or 8 (round-to-nearest codes; GGUF grids keep their own width).
        block_size: rows of K per block; None = one scale per output channel.
        symmetric: signed codes without zero points; False: unsigned codes with integer zero points.
        algorithm: RTN, or GGUF (keep each weight's exact GGUF grid, RTN where it has none). GPTQ
            need `quantizer`.
        quantizer: (initializer name, W[K, N] float32) -> QuantizedWeight for MatMul weights (None: RTN).
        include_lm_head: quantize the MatMul producing `logits` too.
        include_embedding: quantize embedding tables read by Gather.
    """

    def __init__(
        self,
        bits: int = 4,
        block_size: int | None = 32,
        symmetric: bool = True,
        algorithm: WeightAlgorithm = WeightAlgorithm.RTN,
        *,
        quantizer: Quantizer | None = None,
        include_lm_head: bool = True,
        include_embedding: bool = True,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be positive or None, got {block_size}")
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric
        self.algorithm = WeightAlgorithm(algorithm)
        self.quantizer = quantizer
        self.include_lm_head = include_lm_head
        self.include_embedding = include_embedding
        if self.algorithm is WeightAlgorithm.GPTQ and quantizer is None:
            raise ValueError(f"algorithm {self.algorithm.value} needs a quantizer (calibrated codes per weight)")
        # Filled by call(): initializer name -> how it was encoded.
        self.encoded: dict[str, EncodedWeight] = {}

    @classmethod
    def from_options(cls, options: PhaseOptions, quantizer: Quantizer | None = None) -> QuantizeWeightsPass:
        """The weight quantization of a phase's scheme: w8a16 / w8a8 int8 per channel, w4a16 blocked int4."""
        bits = options.scheme.weight_bits
        if bits is None:
            raise ValueError(f"scheme {options.scheme.value} has no quantized weights")
        block = options.block_size if options.scheme is QuantScheme.W4A16 else None
        symmetric = options.symmetric if options.scheme is QuantScheme.W4A16 else True
        return cls(bits, block, symmetric, options.algorithm, quantizer=quantizer)

    # -- contract -------------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or opset < MIN_OPSET:
            raise QuantizePreconditionError(
                f"QuantizeWeightsPass needs default-domain opset >= {MIN_OPSET} (blocked DequantizeLinear, "
                f"int4 types); the model imports opset {opset}. Re-export at opset 21 or newer."
            )

    # -- encoding -------------------------------------------------------------------------------

    def _encode(self, name: str, W_KN: np.ndarray, *, hook: bool) -> EncodedWeight:
        if self.algorithm is WeightAlgorithm.GGUF:
            grid = detect_gguf_grid(W_KN)
            if grid is not None:
                return EncodedWeight(grid.weight, grid.offset_GN, f"gguf:{grid.kind.value}")
            log.info("%s: on no GGUF grid; round to nearest", name)
        if hook and self.quantizer is not None:
            qw = self.quantizer(name, W_KN)
            if qw is not None:
                if qw.shape != W_KN.shape:
                    raise PassError(f"quantizer returned codes of shape {qw.shape} for {name!r} of shape {W_KN.shape}")
                return EncodedWeight(qw, None, "quantizer")
        return EncodedWeight(quantize_rtn(W_KN, self.bits, self.block_size, self.symmetric), None, "rtn")

    # -- graph building -------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.encoded = {}
        lm_head = find_lm_head(graph)
        inits: dict[str, _Initializers] = {}
        uses: dict[str, int] = {}
        count = 0
        before = after = 0

        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "MatMul":
                if node is lm_head and not self.include_lm_head:
                    continue
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                transpose = False
            elif node.op_type == "Gather" and self.include_embedding and _is_embedding_lookup(node):
                weight = node.inputs[0]
                transpose = True  # table [V, D] = W[K=D, N=V] transposed: blocks along D
            else:
                continue
            if not _is_float_matrix_initializer(graph, weight):
                continue
            name = weight.name
            if name in inits and inits[name].transposed != transpose:
                log.info("%s: read both as a MatMul weight and as a Gather table; left float for the latter", name)
                continue
            if name not in inits:
                uses[name] = 0
                table = weight.const_value.numpy()
                W_KN = np.ascontiguousarray(table.T if transpose else table, dtype=np.float32)
                enc = self._encode(name, W_KN, hook=not transpose)
                self.encoded[name] = enc
                inits[name] = _Initializers.create(graph, name, enc, transpose)
                before += table.nbytes
                after += inits[name].nbytes
            dq_out = inits[name].dequantize(graph, node, weight, uses[name])
            uses[name] = uses.get(name, 0) + 1
            node.replace_input_with(1 if node.op_type == "MatMul" else 0, dq_out)
            count += 1
            if not weight.uses() and not weight.is_graph_output():
                graph.initializers.pop(name)

        if count:
            sources: dict[str, int] = {}
            for enc in self.encoded.values():
                sources[enc.source] = sources.get(enc.source, 0) + 1
            log.info(
                "quantized %d weights (%s) for %d consumers: %.1f MB float -> %.1f MB",
                len(self.encoded),
                ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
                count,
                before / 1e6,
                after / 1e6,
            )
        return ir.passes.PassResult(model, modified=bool(count))


def _is_float_matrix_initializer(graph: ir.Graph, value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.name in graph.initializers
        and graph.initializers[value.name] is value
        and value.const_value is not None
        and value.const_value.dtype == ir.DataType.FLOAT
        and len(value.const_value.shape) == 2
    )


def _is_embedding_lookup(node: ir.Node) -> bool:
    """Gather(table, ids) on axis 0 with ids a graph input (input_ids): a token embedding."""
    if len(node.inputs) != 2 or node.attributes.get_int("axis", 0) != 0:
        return False
    ids = node.inputs[1]
    return ids is not None and ids.is_graph_input()


@dataclasses.dataclass
class _Initializers:
    """The initializers encoding one weight and how to read them back with standard ops."""

    codes: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    offset: ir.Value | None  # float zero points: m as [G, 1, N] (MatMul) or [V, G, 1] (table)
    expand_shape: ir.Value | None
    reshape_shape: ir.Value | None
    slice_args: tuple[ir.Value, ...] | None
    axis: int
    block_size: int | None
    shape: tuple[int, int]
    nbytes: int
    transposed: bool

    @classmethod
    def create(cls, graph: ir.Graph, name: str, enc: EncodedWeight, transpose: bool) -> _Initializers:
        """Register the codes, scales and zero points (or offsets) of `enc` as initializers of `graph`.

        transpose: `enc` encodes W[K, N] = table.T; the initializers are laid out like the table [N, K].
        """
        qw = enc.weight
        K, N = qw.shape
        G = qw.scale_GN.shape[0]
        per_channel = G == 1 and not enc.float_zero_point
        dtype = codes_dtype(qw)

        def add(array_or_tensor, suffix: str, dt: ir.DataType | None = None) -> ir.Value:
            full = f"{name}.{suffix}"
            if isinstance(array_or_tensor, np.ndarray):
                t = int_tensor(array_or_tensor, dt, full) if dt is not None else ir.tensor(array_or_tensor, name=full)
            else:
                t = array_or_tensor
            v = ir.Value(name=full, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
            graph.register_initializer(v)
            return v

        codes = qw.codes_KN.T if transpose else qw.codes_KN
        scale = qw.scale_GN.astype(np.float32)
        zp = None if enc.float_zero_point else qw.zero_point_GN
        if per_channel:
            scale, zp = scale[0], (None if zp is None else zp[0])
            axis, block = (0 if transpose else 1), None
        else:
            if transpose:
                scale, zp = scale.T, (None if zp is None else zp.T)
            axis, block = (1 if transpose else 0), qw.block_size
        v_codes = add(np.ascontiguousarray(codes), "qcodes", dtype)
        v_scale = add(np.ascontiguousarray(scale), "qscale")
        v_zp = None if zp is None else add(np.ascontiguousarray(zp), "qzero", dtype)
        nbytes = v_codes.const_value.nbytes + v_scale.const_value.nbytes + (v_zp.const_value.nbytes if v_zp else 0)

        offset = expand_shape = reshape_shape = slice_args = None
        if enc.float_zero_point:
            m = enc.offset_GN if enc.offset_GN is not None else float_offset_GN(qw)
            bs = qw.block_size
            if transpose:  # table [N=V, K=D]: m [V, G, 1] -> [V, G, bs] -> [V, G*bs]
                m3, expand, reshape = m.T[:, :, None], [N, G, bs], [N, G * bs]
            else:  # W [K, N]: m [G, 1, N] -> [G, bs, N] -> [G*bs, N]
                m3, expand, reshape = m[:, None, :], [G, bs, N], [G * bs, N]
            offset = add(np.ascontiguousarray(m3, dtype=np.float32), "qoffset")
            expand_shape = add(np.array(expand, np.int64), "qoffset_expand")
            reshape_shape = add(np.array(reshape, np.int64), "qoffset_reshape")
            if G * bs != K:
                slice_args = (
                    add(np.array([0], np.int64), "qoffset_start"),
                    add(np.array([K], np.int64), "qoffset_end"),
                    add(np.array([1 if transpose else 0], np.int64), "qoffset_axis"),
                )
            nbytes += offset.const_value.nbytes
        shape = (N, K) if transpose else (K, N)
        return cls(
            v_codes,
            v_scale,
            v_zp,
            offset,
            expand_shape,
            reshape_shape,
            slice_args,
            axis,
            block,
            shape,
            nbytes,
            transpose,
        )

    def dequantize(self, graph: ir.Graph, consumer: ir.Node, weight: ir.Value, use: int) -> ir.Value:
        """Insert the nodes rebuilding the float weight before `consumer` (its `use`-th reader)."""
        attrs = [ir.AttrInt64("axis", self.axis)]
        if self.block_size is not None:
            attrs.append(ir.AttrInt64("block_size", self.block_size))
        inputs = [self.codes, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
        base = f"{weight.name}.dq{use}" if use else f"{weight.name}.dq"
        dq = ir.Node("", "DequantizeLinear", inputs, attrs, name=base)
        nodes = [dq]
        out = dq.outputs[0]
        out.name = f"{base}.out" if self.offset is None else f"{base}.codes"
        _set_type(out, self.shape)
        if self.offset is not None:
            expand = ir.Node("", "Expand", [self.offset, self.expand_shape], name=f"{base}.offset_expand")
            reshape = ir.Node("", "Reshape", [expand.outputs[0], self.reshape_shape], name=f"{base}.offset_reshape")
            expand.outputs[0].name = f"{base}.offset_expanded"
            reshape.outputs[0].name = f"{base}.offset_blocks"
            nodes += [expand, reshape]
            offset = reshape.outputs[0]
            if self.slice_args is not None:
                sl = ir.Node("", "Slice", [offset, *self.slice_args], name=f"{base}.offset_slice")
                sl.outputs[0].name = f"{base}.offset_full"
                nodes.append(sl)
                offset = sl.outputs[0]
            _set_type(offset, self.shape)
            add = ir.Node("", "Add", [out, offset], name=f"{base}.add_offset")
            nodes.append(add)
            out = add.outputs[0]
            out.name = f"{base}.out"
            _set_type(out, self.shape)
        graph.insert_before(consumer, nodes)
        return out


def _set_type(value: ir.Value, shape: tuple[int, ...]) -> None:
    value.dtype = ir.DataType.FLOAT
    value.shape = ir.Shape(shape)


__all__ = [
    "EncodedWeight",
    "QuantizePreconditionError",
    "QuantizeWeightsPass",
    "Quantizer",
    "codes_dtype",
    "int_tensor",
]
