"""FuseDequantMatMulPass: weight-only QDQ -> ONNX Runtime's quantized kernels (the ORT target's fusion).

    MatMul rule (bits 4 and 8):
        Before:  y = MatMul(x, DequantizeLinear(W_q, W_s[, W_z], axis=0, block_size=bs))    W_q: [K, N]
                 y = MatMul(x, DequantizeLinear(W_q, W_s[, W_z], axis=1))   (per output channel)
        After:   y = com.microsoft.MatMulNBits(x, B, scales[, zero_points], K, N, bits, block_size,
                                               accuracy_level)
                 B: uint8 [N, G, bs*bits/8] (pack_matmulnbits), scales: [N, G],
                 zero_points: uint8 packed [N, ceil(G*bits/8)] (absent: the op's default 2^(b-1))

    Float zero points (GGUF Q4_1, from QuantizeWeightsPass's offset form):
        Before:  y = MatMul(x, Add(DequantizeLinear(W_q, W_s, axis=0, block_size=bs),
                                   [Slice](Reshape(Expand(W_m, [G, bs, N]), [G*bs, N]))))
        After (FloatZeroPoints.CORRECTION, default; needs K % bs == 0):
                 y = Add(MatMulNBits(x, B, scales),                        # codes read as (q - 2^(b-1)) * s
                         MatMul(ReduceSum(Reshape(x, [.., G, bs]), axes=[-1]), M))   M = W_m + 2^(b-1) * W_s
                 (one block sum per activation, shared by the MatMuls reading it; centered codes keep
                 the int8 activations of accuracy_level 4 as accurate as for symmetric int4)
        After (FloatZeroPoints.NATIVE):
                 y = MatMulNBits(x, B, scales, zero_points = -W_m / W_s as float [N, G])

    Gather rule (embedding tables):
        Before:  h = Gather(DequantizeLinear(E_q, E_s[, E_z], axis=1, block_size=bs), ids)  E_q: [V, D]
                 h = Gather(DequantizeLinear(E_q, E_s[, E_z], axis=0), ids)   (per row)
        After:   h = com.microsoft.GatherBlockQuantized(data, ids, scales[, zero_points],
                                                        gather_axis=0, quantize_axis=1, block_size, bits)
                 int4 / uint4 tables are used as they are (the same initializer); int8 ones become uint8
                 (q + 128, the op's default zero point); a per-row scale becomes one block spanning D.

Signed codes become offset binary (q + 2^(b-1)) for MatMulNBits, whose default zero point is
2^(b-1); unsigned codes without a zero point get explicit zeros (ONNX's default is 0, the op's is not).
K need not be a multiple of the block size (B is padded with zero-point codes). A per-channel weight
becomes blocks of `per_channel_block_size` along K with the channel's scale repeated (same codes, same
products): on SmolLM2 decode (AVX2, 2 threads) blocks of 128 ran faster than 32, 256 or one block
spanning K (benchmarks/weight_only.py), which also pads K=576 to 1024 bytes per row.

ORT 1.32 CPU constraints, checked before rewriting (a pair that fails stays as QDQ and `skipped` says
why): MatMulNBits block_size a power of two >= 16, x float32 of rank >= 2, no float zero points with
8 bits. GatherBlockQuantized: gather axis 0, block_size a power of two >= 16, data int4/uint4/uint8
(not int8), no float zero points (a Q4_1 table stays DQ + Add + Gather). Measured, not enforced:
8-bit MatMulNBits has a fast kernel only at accuracy_level 4 (at 0/1 it dequantizes the weight on
every call, ~4x slower than float32; the pass logs a warning), and MatMulNBits with float zero points
has none at any level (hence CORRECTION). Numerics: accuracy_level 1 matches the QDQ graph to float
rounding; 4 quantizes x to int8 per block of K (SmolLM2, 96 teacher-forced decode steps: mean KL to
fp32 0.011 for w8a16 at level 4 vs 0.003 at level 1; GGUF-grid w4a16 0.003 vs 0.000).

Preconditions: weights quantized by QuantizeWeightsPass (or any QDQ whose codes, scales and zero points
are initializers). Pipeline: last quantization pass of the ORT target, after QuantizeWeightsPass;
the TVM target keeps the QDQ form.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from twophase.kernels.quant import pack_int4, pack_matmulnbits, pack_matmulnbits_zero_points, unpack_int4

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 4
DEFAULT_PER_CHANNEL_BLOCK = 32

_CODE_TYPES = {
    ir.DataType.INT4: (4, True),
    ir.DataType.UINT4: (4, False),
    ir.DataType.INT8: (8, True),
    ir.DataType.UINT8: (8, False),
}


class FloatZeroPoints(enum.Enum):
    """How a float zero point (GGUF Q4_1's offset) reaches ORT."""

    CORRECTION = "correction"  # integer MatMulNBits + blocksum(x) @ m: fast kernels (default)
    NATIVE = "native"  # MatMulNBits' float zero_points input: no fast CPU kernel in ORT 1.32


class NoMatch(Exception):
    """A candidate that a rule does not rewrite; the message says why."""


@dataclasses.dataclass
class _Dequant:
    """A DequantizeLinear over initializers, read as W[K, N] blocked along K (or a table [V, D] along D)."""

    node: ir.Node
    codes: np.ndarray  # unpacked integer codes, shape of the DQ input
    code_value: ir.Value
    bits: int
    signed: bool
    scale: np.ndarray  # float32, (G, N) along axis 0 of a [K, N] weight
    zero_point: np.ndarray | None  # integer, (G, N)
    block_size: int | None  # None: one block per channel (per-axis or per-tensor DQ)


def _is_pow2_block(b: int) -> bool:
    return b >= 16 and b & (b - 1) == 0


def _covering_block(k: int) -> int:
    """The smallest power of two >= max(k, 16): one block spanning the whole axis."""
    return max(16, 1 << (k - 1).bit_length())


def _initializer(value: ir.Value | None, what: str) -> ir.TensorProtocol:
    if value is None or value.const_value is None or not value.is_initializer():
        raise NoMatch(f"{what} is not an initializer")
    return value.const_value


def _codes(tensor: ir.TensorProtocol) -> np.ndarray:
    """Integer codes of an initializer as int8/uint8, int4 unpacked."""
    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        packed = np.frombuffer(tensor.tobytes(), np.uint8)
        return unpack_int4(packed, tuple(tensor.shape), tensor.dtype == ir.DataType.INT4)
    return tensor.numpy()


def read_dequant(value: ir.Value | None, reduce_axis: int) -> _Dequant:
    """The DequantizeLinear producing `value`, normalized to blocks along `reduce_axis` of its 2-D input.

    reduce_axis 0: a MatMul weight [K, N]; 1: an embedding table [V, D] (blocks along D). The returned
    arrays are laid out as for W[K, N] = table.T in the second case.
    """
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        raise NoMatch("the weight is not produced by DequantizeLinear")
    t_codes = _initializer(node.inputs[0], "DequantizeLinear input x")
    if t_codes.dtype not in _CODE_TYPES:
        raise NoMatch(f"codes of type {t_codes.dtype.name} (need int4/uint4/int8/uint8)")
    if len(t_codes.shape) != 2:
        raise NoMatch(f"codes of rank {len(t_codes.shape)} (need 2)")
    bits, signed = _CODE_TYPES[t_codes.dtype]
    scale = _initializer(node.inputs[1], "DequantizeLinear x_scale").numpy()
    if scale.dtype != np.float32:
        raise NoMatch(f"scales of type {scale.dtype} (need float32)")
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = _codes(_initializer(zp_value, "DequantizeLinear x_zero_point")) if zp_value is not None else None
    codes = _codes(t_codes)
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    rank = 2
    axis = axis + rank if axis < 0 else axis
    keep_axis = 1 - reduce_axis  # the output-channel axis of the 2-D input
    if scale.ndim == 0 or scale.size == 1:  # per tensor: one block per channel, scale repeated
        n = codes.shape[keep_axis]
        scale = np.full((1, n), scale.reshape(()), np.float32)
        zp = None if zp is None else np.full((1, n), zp.reshape(()), zp.dtype)
        block = None
    elif block == 0:
        if axis != keep_axis or scale.ndim != 1:
            raise NoMatch(f"per-axis DequantizeLinear on axis {axis}; need the output-channel axis {keep_axis}")
        scale = scale[None, :]
        zp = None if zp is None else zp[None, :]
        block = None
    else:
        if axis != reduce_axis:
            raise NoMatch(f"blocked DequantizeLinear along axis {axis}; need the reduction axis {reduce_axis}")
        if reduce_axis == 1:
            scale, zp = scale.T, (None if zp is None else zp.T)
    if reduce_axis == 1:
        codes = codes.T
    return _Dequant(node, codes, node.inputs[0], bits, signed, np.ascontiguousarray(scale), zp, block)


def split_offset(w: ir.Value | None) -> tuple[ir.Value | None, ir.Value | None]:
    """(the DequantizeLinear side, the float offset) of a weight Add(DequantizeLinear(...), offset) — the
    GGUF Q4_1 form of QuantizeWeightsPass — or (w, None) for any other weight."""
    producer = w.producer() if w is not None else None
    if producer is None or producer.op_type != "Add" or producer.domain not in ("", "ai.onnx"):
        return w, None
    a, b = producer.inputs
    if a is not None and a.producer() is not None and a.producer().op_type == "DequantizeLinear":
        return a, b
    return b, a


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = value.const_value if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def read_offset(value: ir.Value | None, K: int, N: int, G: int, block: int) -> np.ndarray:
    """m (G, N) from [Slice(_, 0, K, axis 0)](Reshape(Expand(m[G, 1, N], [G, bs, N]), [G*bs, N]))."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == "Slice":
        if [_const_ints(v) for v in node.inputs[1:4]] != [[0], [K], [0]] or len(node.inputs) > 4:
            raise NoMatch("the offset's Slice is not rows [0, K) of axis 0")
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Reshape" or _const_ints(node.inputs[1]) != [G * block, N]:
        raise NoMatch(f"the offset term is not Reshape(Expand(m), [{G * block}, {N}])")
    expand = node.inputs[0].producer()
    if expand is None or expand.op_type != "Expand" or _const_ints(expand.inputs[1]) != [G, block, N]:
        raise NoMatch(f"the offset term is not Reshape(Expand(m, [{G}, {block}, {N}]))")
    m = _initializer(expand.inputs[0], "the offset m").numpy()
    if m.shape != (G, 1, N) or m.dtype != np.float32:
        raise NoMatch(f"offset m of shape {m.shape} {m.dtype}; need ({G}, 1, {N}) float32")
    return m[:, 0, :]


class FuseDequantMatMulPass(ir.passes.InPlacePass):
    """DQ + MatMul -> MatMulNBits and DQ + Gather -> GatherBlockQuantized for ONNX Runtime (see module doc).

    Args:
        accuracy_level: MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
        per_channel_block_size: block along K used for per-channel weights (a power of two >= 16), or
            None for one block spanning K (padded to a power of two).
        float_zero_points: CORRECTION (default) or NATIVE, see FloatZeroPoints.
        fuse_gather: also rewrite embedding lookups into GatherBlockQuantized.

    After a call, `applied` counts rewrites per rule and `skipped` maps each unfused candidate's
    node name to why it was left alone.
    """

    def __init__(
        self,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
        *,
        per_channel_block_size: int | None = DEFAULT_PER_CHANNEL_BLOCK,
        float_zero_points: FloatZeroPoints = FloatZeroPoints.CORRECTION,
        fuse_gather: bool = True,
    ) -> None:
        super().__init__()
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
        if per_channel_block_size is not None and not _is_pow2_block(per_channel_block_size):
            raise ValueError(
                f"per_channel_block_size must be a power of two >= 16 or None, got {per_channel_block_size}"
            )
        self.accuracy_level = accuracy_level
        self.per_channel_block_size = per_channel_block_size
        self.float_zero_points = FloatZeroPoints(float_zero_points)
        self.fuse_gather = fuse_gather
        self.applied: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}
        self._slow_8bit = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.applied = Counter()
        self.skipped = {}
        self._slow_8bit = 0
        graph = model.graph
        cache: dict[tuple, list[ir.Value | None]] = {}
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                if node.op_type == "MatMul":
                    self._fuse_matmul(graph, node, cache)
                    self.applied["MatMulNBits"] += 1
                elif node.op_type == "Gather" and self.fuse_gather:
                    self._fuse_gather(graph, node, cache)
                    self.applied["GatherBlockQuantized"] += 1
            except NoMatch as e:
                if _reads_dequant(node.inputs[1 if node.op_type == "MatMul" else 0]):
                    self.skipped[node.name or node.outputs[0].name] = str(e)
        modified = sum(self.applied.values()) > 0
        if self._slow_8bit:
            log.warning(
                "%d 8-bit MatMulNBits at accuracy_level %d: ORT 1.32's CPU kernels dequantize such weights on "
                "every call (~4x slower than float32 in benchmarks/weight_only.py); use accuracy_level 4",
                self._slow_8bit,
                self.accuracy_level,
            )
        if modified:
            if MS_DOMAIN not in model.opset_imports:
                model.opset_imports[MS_DOMAIN] = 1
            common_passes.RemoveUnusedNodesPass()(model)
        for name, why in self.skipped.items():
            log.debug("not fused: %s: %s", name, why)
        log.info("fused %s; %d candidates left as QDQ", dict(self.applied), len(self.skipped))
        return ir.passes.PassResult(model, modified)

    # -- rules ----------------------------------------------------------------------------------

    def _fuse_matmul(self, graph: ir.Graph, node: ir.Node, cache: dict) -> None:
        x, w = node.inputs[0], node.inputs[1]
        if x is None or x.dtype != ir.DataType.FLOAT:
            raise NoMatch("MatMul input A is not known to be float32")
        if x.shape is None or len(x.shape) < 2:
            raise NoMatch("MatMul input A has unknown rank or rank < 2")
        w, offset_value = split_offset(w)
        dq = read_dequant(w, reduce_axis=0)
        if dq.zero_point is not None and offset_value is not None:
            raise NoMatch("both an integer zero point and a float offset")
        K, N = dq.codes.shape
        G = dq.scale.shape[0]
        if dq.block_size is None:
            if offset_value is not None:
                raise NoMatch("a float offset on a per-channel DequantizeLinear")
            block = self.per_channel_block_size or _covering_block(K)
        else:
            block = dq.block_size
            if not _is_pow2_block(block):
                raise NoMatch(f"block_size {block} is not a power of two >= 16 (MatMulNBits)")
        float_zp = m = None
        if offset_value is not None:
            m = read_offset(offset_value, K, N, G, block)
            correction = self.float_zero_points is FloatZeroPoints.CORRECTION and K % block == 0
            if not correction:
                if dq.bits == 8:
                    raise NoMatch("8-bit MatMulNBits on CPU has no float zero points")
                if np.any((dq.scale == 0) & (m != 0)):
                    raise NoMatch("a zero scale with a nonzero offset has no zero point")
                with np.errstate(divide="ignore", invalid="ignore"):
                    float_zp = np.where(dq.scale == 0, 0, -m / dq.scale).astype(np.float32)
                if dq.signed:
                    float_zp = float_zp + np.float32(1 << (dq.bits - 1))  # codes shift by +2^(b-1) below
                m = None

        key = ("MatMulNBits", dq.code_value.name, dq.node.inputs[1].name, float_zp is not None, block)
        if key not in cache:
            cache[key] = self._matmulnbits_initializers(graph, dq, block, float_zp, mid_zero_point=m is not None)
        b_val, s_val, z_val = cache[key]
        attrs = [
            ir.AttrInt64("K", K),
            ir.AttrInt64("N", N),
            ir.AttrInt64("bits", dq.bits),
            ir.AttrInt64("block_size", block),
            ir.AttrInt64("accuracy_level", self.accuracy_level),
        ]
        inputs = [x, b_val, s_val] + ([z_val] if z_val is not None else [])
        base = node.name or node.outputs[0].name
        self._slow_8bit += dq.bits == 8 and self.accuracy_level != 4
        fused = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attrs, name=f"{base}.nbits")
        if m is None:
            replace_node(graph, node, fused)
            return
        # W = q*s + m = (u - 2^(b-1))*s + m' with u the op's unsigned codes (mid zero point, centered
        # weights: int8 activations at accuracy_level 4 then err as for symmetric int4) and
        # m' = m + (2^(b-1) - shift)*s; so y = MatMulNBits(x) + blocksum(x) @ m'.
        sums = self._block_sums(graph, node, x, G, block, cache)
        m_key = ("offset", offset_value.name)
        if m_key not in cache:
            half = 1 << (dq.bits - 1)
            m_mid = (m + np.float32(0 if dq.signed else half) * dq.scale).astype(np.float32)
            cache[m_key] = _new_initializer(
                graph, f"{_weight_name(dq)}.nbits_offsets", ir.tensor(np.ascontiguousarray(m_mid))
            )
        corr = ir.Node("", "MatMul", [sums, cache[m_key]], name=f"{base}.offset_correction")
        total = ir.Node("", "Add", [fused.outputs[0], corr.outputs[0]], name=f"{base}.add_correction")
        fused.outputs[0].name, corr.outputs[0].name = f"{base}.nbits_out", f"{base}.correction_out"
        for v in (fused.outputs[0], corr.outputs[0]):
            v.dtype, v.shape = node.outputs[0].dtype, node.outputs[0].shape
        graph.insert_before(node, [fused, corr])
        replace_node(graph, node, total)
        self.applied["offset_correction"] += 1

    def _block_sums(self, graph: ir.Graph, before: ir.Node, x: ir.Value, G: int, block: int, cache: dict) -> ir.Value:
        """ReduceSum(Reshape(x, [..., G, block]), axes=[-1]): one per activation and block size."""
        key = ("block_sums", id(x), G, block)
        if key in cache:
            return cache[key]
        rank = len(x.shape)
        shape = _new_const(
            graph, f"twophase_blocks_{rank}_{G}_{block}", np.array([0] * (rank - 1) + [G, block], np.int64)
        )
        axes = _new_const(graph, "twophase_last_axis", np.array([-1], np.int64))
        name = x.name or "x"
        reshape = ir.Node("", "Reshape", [x, shape], name=f"{name}.blocks{block}")
        reduce = ir.Node(
            "", "ReduceSum", [reshape.outputs[0], axes], [ir.AttrInt64("keepdims", 0)], name=f"{name}.block_sums{block}"
        )
        reshape.outputs[0].name, reduce.outputs[0].name = f"{name}.blocks{block}", f"{name}.block_sums{block}"
        reshape.outputs[0].dtype = reduce.outputs[0].dtype = ir.DataType.FLOAT
        dims = list(x.shape.dims[:-1])
        reshape.outputs[0].shape = ir.Shape([*dims, G, block])
        reduce.outputs[0].shape = ir.Shape([*dims, G])
        graph.insert_before(before, [reshape, reduce])
        cache[key] = reduce.outputs[0]
        return cache[key]

    def _matmulnbits_initializers(
        self, graph: ir.Graph, dq: _Dequant, block: int, float_zp: np.ndarray | None, *, mid_zero_point: bool = False
    ) -> list[ir.Value | None]:
        """B, scales and zero points (None: the op's default 2^(b-1)) for a rewritten DequantizeLinear.

        mid_zero_point: give unsigned codes without zero point the op's default 2^(b-1) (the caller
        corrects for it) instead of explicit zeros.
        """
        K, N = dq.codes.shape
        G = -(-K // block)
        half = 1 << (dq.bits - 1)
        shift = half if dq.signed else 0
        codes = (dq.codes.astype(np.int16) + shift).astype(np.uint8)
        scale, zp = dq.scale, dq.zero_point
        if zp is not None:
            zp = (zp.astype(np.int16) + shift).astype(np.uint8)
        elif not dq.signed and float_zp is None and not mid_zero_point:
            zp = np.zeros_like(scale, np.uint8)  # ONNX's default zero point is 0, the op's 2^(b-1)
        if dq.block_size is None:  # one block per channel -> the channel's scale in each of G blocks
            scale = np.repeat(scale, G, axis=0)
            zp = None if zp is None else np.repeat(zp, G, axis=0)
        # Rows of K past the end (last block) hold the zero point, so they dequantize to 0.
        padded = np.empty((G * block, N), np.uint8)
        padded[:K] = codes
        padded[K:] = zp[-1] if zp is not None else (half if float_zp is None else 0)
        base = _weight_name(dq)
        out: list[ir.Value | None] = [
            _new_initializer(graph, f"{base}.nbits_B", ir.tensor(pack_matmulnbits(padded, dq.bits, block))),
            _new_initializer(graph, f"{base}.nbits_scales", ir.tensor(np.ascontiguousarray(scale.T))),
        ]
        if float_zp is not None:
            zp_t = ir.tensor(np.ascontiguousarray(float_zp.T))
        elif zp is not None:
            zp_t = ir.tensor(pack_matmulnbits_zero_points(zp, dq.bits))
        else:
            return out + [None]
        return out + [_new_initializer(graph, f"{base}.nbits_zero_points", zp_t)]

    def _fuse_gather(self, graph: ir.Graph, node: ir.Node, cache: dict) -> None:
        if len(node.inputs) != 2 or node.attributes.get_int("axis", 0) != 0:
            raise NoMatch("Gather not on axis 0")
        table = node.inputs[0]
        producer = table.producer() if table is not None else None
        if producer is not None and producer.op_type == "Add":
            raise NoMatch("GatherBlockQuantized has no float zero points; DQ + Add + Gather kept")
        dq = read_dequant(table, reduce_axis=1)
        D = dq.codes.shape[0]  # codes as W[K=D, N=V]
        if dq.block_size is None:
            block = _covering_block(D)
        else:
            block = dq.block_size
            if not _is_pow2_block(block):
                raise NoMatch(f"block_size {block} is not a power of two >= 16 (GatherBlockQuantized)")
        key = ("GatherBlockQuantized", dq.code_value.name, dq.node.inputs[1].name, block)
        if key not in cache:
            cache[key] = self._gather_initializers(graph, dq, block)
        data, scales, zp = cache[key]
        attrs = [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", block),
            ir.AttrInt64("bits", dq.bits),
        ]
        inputs = [data, node.inputs[1], scales] + ([zp] if zp is not None else [])
        fused = ir.Node(
            MS_DOMAIN, "GatherBlockQuantized", inputs, attrs, name=f"{node.name or node.outputs[0].name}.gbq"
        )
        replace_node(graph, node, fused)

    def _gather_initializers(self, graph: ir.Graph, dq: _Dequant, block: int) -> list[ir.Value | None]:
        """data [V, D] (int4/uint4 as they are, else uint8), scales [V, ceil(D / block)], zero points."""
        base = _weight_name(dq)
        scale = np.ascontiguousarray(dq.scale.T)  # (V, G)
        zp = None if dq.zero_point is None else np.ascontiguousarray(dq.zero_point.T)
        if dq.bits == 4:
            data = dq.code_value  # the DQ's own int4 / uint4 initializer, shared
            z_val = None
            if zp is not None:
                dtype = ir.DataType.INT4 if dq.signed else ir.DataType.UINT4
                z_val = _new_initializer(
                    graph, f"{base}.gbq_zero_points", ir.PackedTensor(pack_int4(zp), dtype, shape=zp.shape)
                )
            return [data, _new_initializer(graph, f"{base}.gbq_scales", ir.tensor(scale)), z_val]
        codes = np.ascontiguousarray(dq.codes.T)  # (V, D)
        if dq.signed:
            codes = (codes.astype(np.int16) + 128).astype(np.uint8)
            zp = None if zp is None else (zp.astype(np.int16) + 128).astype(np.uint8)  # None: default 128
        elif zp is None:
            zp = np.zeros_like(scale, np.uint8)  # ONNX's default 0, not the op's 128
        out = [
            _new_initializer(graph, f"{base}.gbq_data", ir.tensor(codes.astype(np.uint8))),
            _new_initializer(graph, f"{base}.gbq_scales", ir.tensor(scale)),
            None if zp is None else _new_initializer(graph, f"{base}.gbq_zero_points", ir.tensor(zp.astype(np.uint8))),
        ]
        return out


def _reads_dequant(value: ir.Value | None) -> bool:
    """True when `value` is DequantizeLinear's output or Add(DequantizeLinear, ...) (a QDQ candidate)."""
    node = value.producer() if value is not None else None
    if node is None:
        return False
    if node.op_type == "DequantizeLinear":
        return True
    return node.op_type == "Add" and any(
        v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs
    )


def _weight_name(dq: _Dequant) -> str:
    """Base name of the fused initializers: the weight's name (QuantizeWeightsPass names codes W.qcodes)."""
    return dq.code_value.name.removesuffix(".qcodes")


def _new_const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small shared constant initializer (created once per graph)."""
    if name in graph.initializers:
        return graph.initializers[name]
    return _new_initializer(graph, name, ir.tensor(array))


def _new_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    if name in graph.initializers:
        raise NoMatch(f"initializer {name!r} already exists")
    tensor.name = name
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def replace_node(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` is; its output takes the old output's name, type, shape and uses."""
    out_old, out_new = old.outputs[0], new.outputs[0]
    out_new.dtype, out_new.shape = out_old.dtype, out_old.shape
    graph.insert_before(old, new)
    out_old.replace_all_uses_with(out_new, replace_graph_outputs=True)
    name = out_old.name
    graph.remove(old, safe=True)
    out_new.name = name


__all__ = ["DEFAULT_ACCURACY_LEVEL", "DEFAULT_PER_CHANNEL_BLOCK", "FloatZeroPoints", "FuseDequantMatMulPass", "NoMatch"]
