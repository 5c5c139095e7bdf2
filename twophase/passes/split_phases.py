"""SplitPhasesPass: specialize the canonical decoder graph into its prefill or its decode graph.

The canonical graph (DESIGN.md) serves both phases with one signature; each phase graph drops what
its phase never uses so that the folder, the quantizer and the backend see static facts.

PREFILL (no cache yet; logits of the last position only):

    Before:  input_ids[B,S]  attention_mask[B,P+S]  position_ids[B,S]  past_key_values.{i}.key|value[B,H,P,D]
             s = Shape(past_key_values.0.key, start=2, end=3)        # P
             present.{i}.key = Concat(past_key_values.{i}.key, k_i, axis=-2)
             logits[B,S,V] = MatMul(h[B,S,E], W_lm[E,V])
    After:   input_ids[B,S]  attention_mask[B,S]  position_ids[B,S]              (no past inputs)
             s = [0]  (folded away with the arithmetic on it)
             present.{i}.key = k_i                                   [B,H,S,D]
             logits[B,1,V] = MatMul(Slice(h, starts=[-1], ends=[INT64_MAX], axes=[-2]), W_lm)

  Each past input is replaced by what it is at past length 0: Shape slices of it become constants or
  Shape(input_ids)[0:1] (the batch), Concat operands of it along the time axis are dropped, and any
  other consumer reads ConstantOfShape([B, H, 0, D]). The last-position Slice goes on the hidden
  states feeding the lm_head MatMul (found by walking back from `logits` through elementwise ops
  with constant operands, e.g. a soft-cap), so the vocab-sized GEMM runs on one position only; if
  no such MatMul is found the logits output itself is sliced and a warning is logged.

DECODE (one new token against the cache):

    Before:  input_ids[B,S]  position_ids[B,S]  attention_mask[B,T]  past[B,H,P,D] -> logits[B,S,V]  present[B,H,P+S,D]
    After:   input_ids[B,1]  position_ids[B,1]  attention_mask[B,T]  past[B,H,P,D] -> logits[B,1,V]  present[B,H,P+1,D]

  S = 1 becomes static, so every Shape(input_ids)-derived quantity folds.

Both: the input model is not modified (the result is a clone sharing the weight tensors, so external
weights stay external and unloaded), stale intermediate shapes are cleared and re-inferred,
CleanupPass runs on the result, `twophase.phase` metadata is set and the model facts metadata kept.

Preconditions (PassError naming what is missing): inputs `input_ids` [B,S] and `attention_mask`,
at least one `past_key_values.{i}.key|value` input of rank 4 with a `present.{i}.key|value` output
for each, an output `logits` of rank 3; for PREFILL, the past inputs' head and head_dim dims static
(or given by the model facts metadata).

Pipeline: first pass after import/export, on the canonical graph; run once per phase. Quantization,
fusion and KV-cache I/O passes run on its outputs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from twophase.compiler.errors import PassError
from twophase.compiler.manifest import FACTS_METADATA_KEY, ModelFacts
from twophase.compiler.options import Phase
from twophase.passes.cleanup import CleanupPass

log = logging.getLogger(__name__)

PHASE_METADATA_KEY = "twophase.phase"

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_INT64_MAX = np.iinfo(np.int64).max

# Ops between the lm_head MatMul and the logits output that act per position, so slicing the last
# position before them equals slicing after them.
_UNARY_PASSTHROUGH = frozenset({"Cast", "Identity", "Tanh", "Neg", "Relu", "Softplus"})
_BINARY_PASSTHROUGH = frozenset({"Add", "Sub", "Mul", "Div"})


class PhasePreconditionError(PassError, ir.passes.PreconditionError):
    """The graph given to SplitPhasesPass does not fit the canonical decoder contract."""


class PhasePostconditionError(PassError, ir.passes.PostconditionError):
    """SplitPhasesPass produced a graph without the phase's signature (a bug in the pass)."""


@dataclass(frozen=True)
class _PastInput:
    layer: int
    kind: str  # "key" | "value"
    value: ir.Value

    @property
    def present_name(self) -> str:
        return f"present.{self.layer}.{self.kind}"


def _past_inputs(graph: ir.Graph) -> list[_PastInput]:
    out = []
    for v in graph.inputs:
        m = _PAST_RE.match(v.name or "")
        if m:
            out.append(_PastInput(int(m.group(1)), m.group(2), v))
    return out


def _input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((v for v in graph.inputs if v.name == name), None)


def _output_index(graph: ir.Graph, name: str) -> int | None:
    return next((i for i, v in enumerate(graph.outputs) if v.name == name), None)


def _facts(model: ir.Model) -> ModelFacts | None:
    if FACTS_METADATA_KEY not in model.metadata_props:
        return None
    return ModelFacts.from_metadata(dict(model.metadata_props))


class SplitPhasesPass(ir.passes.FunctionalPass):
    """Returns the PREFILL or DECODE specialization of a canonical decoder graph (see module doc).

    Args:
        phase: which phase graph to build.
        cleanup: run CleanupPass on the result (off only to inspect the raw rewrite).
    """

    def __init__(self, phase: Phase, *, cleanup: bool = True) -> None:
        super().__init__()
        self.phase = Phase(phase)
        self.cleanup = cleanup

    # -- contract -------------------------------------------------------------------------------

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        where = f"SplitPhasesPass({self.phase.value})"
        problems: list[str] = []
        ids = _input(graph, "input_ids")
        if ids is None:
            problems.append("no graph input 'input_ids'")
        elif ids.shape is not None and len(ids.shape) != 2:
            problems.append(f"input 'input_ids' has rank {len(ids.shape)}, expected 2 ([batch, seq])")
        if _input(graph, "attention_mask") is None:
            problems.append("no graph input 'attention_mask'")
        past = _past_inputs(graph)
        if not past:
            problems.append(
                "no 'past_key_values.{i}.key|value' graph inputs: the graph must be exported with a "
                "KV cache (past in, present out), see DESIGN.md 'The canonical graph'"
            )
        present_names = {v.name for v in graph.outputs}
        for p in past:
            if p.value.shape is not None and len(p.value.shape) != 4:
                problems.append(f"input {p.value.name!r} has rank {len(p.value.shape)}, expected 4 ([B,H,P,D])")
            if p.present_name not in present_names:
                problems.append(f"input {p.value.name!r} has no matching output {p.present_name!r}")
        logits_idx = _output_index(graph, "logits")
        if logits_idx is None:
            problems.append("no graph output 'logits'")
        else:
            logits = graph.outputs[logits_idx]
            if logits.shape is not None and len(logits.shape) != 3:
                problems.append(f"output 'logits' has rank {len(logits.shape)}, expected 3 ([B,S,V])")
        if problems:
            raise PhasePreconditionError(f"{where}: " + "; ".join(problems))

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        if self.phase is Phase.PREFILL and _past_inputs(graph):
            raise PhasePostconditionError("SplitPhasesPass(prefill): past inputs remain in the prefill graph")
        idx = _output_index(graph, "logits")
        logits = graph.outputs[idx] if idx is not None else None
        if logits is None or logits.shape is None or logits.shape[1] != 1:
            raise PhasePostconditionError(f"SplitPhasesPass({self.phase.value}): output 'logits' is not [B,1,V]")

    # -- the rewrite ----------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        new = model.clone()
        _clear_intermediate_shapes(new.graph)
        if self.phase is Phase.PREFILL:
            _specialize_prefill(new, _facts(model))
        else:
            _specialize_decode(new)
        new.metadata_props[PHASE_METADATA_KEY] = self.phase.value
        if self.cleanup:
            CleanupPass()(new)
        log.info("split %s: %d -> %d nodes", self.phase.value, len(model.graph), len(new.graph))
        return ir.passes.PassResult(new, modified=True)


# ---------------------------------------------------------------------------------------------
# PREFILL


def _specialize_prefill(model: ir.Model, facts: ModelFacts | None) -> None:
    graph = model.graph
    ids = _input(graph, "input_ids")
    assert ids is not None
    batch_dim, seq_dim = _dims2(ids)

    # Shape(input_ids)[0:1]: the batch size, the only dynamic dim of an empty past tensor.
    batch_node = ir.Node("", "Shape", [ids], attributes=[ir.AttrInt64("start", 0), ir.AttrInt64("end", 1)],
                         name="twophase_prefill_batch")
    batch_node.outputs[0].name = "twophase_prefill_batch"
    batch_node.outputs[0].dtype = ir.DataType.INT64
    batch_node.outputs[0].shape = ir.Shape([1])
    if len(graph):
        graph.insert_before(graph.node(0), batch_node)
    else:
        graph.append(batch_node)
    batch_1d = batch_node.outputs[0]

    for p in _past_inputs(graph):
        heads, head_dim = _static_kv_dims(p, facts)
        _replace_empty_past(graph, p, batch_1d, batch_dim, heads, head_dim)
        graph.inputs.remove(p.value)
        out_idx = _output_index(graph, p.present_name)
        if out_idx is not None:
            graph.outputs[out_idx].shape = ir.Shape([batch_dim, heads, seq_dim, head_dim])

    mask = _input(graph, "attention_mask")
    assert mask is not None
    mask.shape = ir.Shape([batch_dim, seq_dim])
    if not batch_node.outputs[0].uses():
        graph.remove(batch_node, safe=True)
    _slice_last_position(graph)


def _dims2(ids: ir.Value) -> tuple[int | ir.SymbolicDim, int | ir.SymbolicDim]:
    if ids.shape is None:
        return ir.SymbolicDim("batch"), ir.SymbolicDim("seq")
    return ids.shape[0], ids.shape[1]


def _static_kv_dims(p: _PastInput, facts: ModelFacts | None) -> tuple[int, int]:
    shape = p.value.shape
    heads = shape[1] if shape is not None else None
    head_dim = shape[3] if shape is not None else None
    if not isinstance(heads, int) and facts is not None:
        heads = facts.num_kv_heads
    if not isinstance(head_dim, int) and facts is not None:
        head_dim = facts.head_dim
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise PhasePreconditionError(
            f"SplitPhasesPass(prefill): input {p.value.name!r} has shape {shape}; the kv_heads and head_dim "
            f"dims (1 and 3) must be static or given by the {FACTS_METADATA_KEY!r} metadata"
        )
    return heads, head_dim


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer (its name made unique in `graph`)."""
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _replace_empty_past(
    graph: ir.Graph,
    p: _PastInput,
    batch_1d: ir.Value,
    batch_dim: int | ir.SymbolicDim,
    heads: int,
    head_dim: int,
) -> None:
    """Rewire every consumer of past input `p` to see a [B, heads, 0, head_dim] tensor."""
    past = p.value
    dims: list[int | ir.SymbolicDim] = [batch_dim, heads, 0, head_dim]
    empty: ir.Value | None = None
    for node, index in list(past.uses()):
        if node.op_type == "Concat" and node.domain == "" and _axis(node, rank=4) == 2 and len(node.inputs) > 1:
            _drop_input(node, index)  # a Concat of the past alone becomes the empty tensor, below
        elif node.op_type == "Shape" and node.domain == "":
            piece = _shape_slice(graph, node, dims, batch_1d)
            node.outputs[0].replace_all_uses_with(piece, replace_graph_outputs=True)
        else:
            if empty is None:
                empty = _empty_tensor(graph, p, batch_1d, dims)
            node.replace_input_with(index, empty)


def _axis(node: ir.Node, rank: int) -> int | None:
    attr = node.attributes.get("axis")
    if attr is None:
        return None
    axis = attr.as_int()
    return axis + rank if axis < 0 else axis


def _drop_input(node: ir.Node, index: int) -> None:
    n = len(node.inputs)
    for j in range(index, n - 1):
        node.replace_input_with(j, node.inputs[j + 1])
    node.resize_inputs(n - 1)


def _shape_slice(graph: ir.Graph, shape_node: ir.Node, dims: list, batch_1d: ir.Value) -> ir.Value:
    """The value of Shape(past)[start:end] at past length 0, as constants and Shape(input_ids)[0:1]."""
    start_attr, end_attr = shape_node.attributes.get("start"), shape_node.attributes.get("end")
    start = start_attr.as_int() if start_attr is not None else 0
    end = end_attr.as_int() if end_attr is not None else len(dims)
    picked = dims[slice(start, end)]
    pieces: list[ir.Value] = []
    run: list[int] = []
    for d in picked:
        if isinstance(d, int):
            run.append(d)
            continue
        if run:
            pieces.append(_const(graph, "twophase_past0_dims", np.array(run, dtype=np.int64)))
            run = []
        pieces.append(batch_1d)  # the only symbolic dim of the empty past is the batch
    if run or not pieces:
        pieces.append(_const(graph, "twophase_past0_dims", np.array(run, dtype=np.int64)))
    if len(pieces) == 1:
        return pieces[0]
    concat = ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", 0)])
    concat.outputs[0].dtype = ir.DataType.INT64
    concat.outputs[0].shape = ir.Shape([len(picked)])
    graph.insert_before(shape_node, concat)
    return concat.outputs[0]


def _empty_tensor(graph: ir.Graph, p: _PastInput, batch_1d: ir.Value, dims: list) -> ir.Value:
    """ConstantOfShape(Concat(batch, [H, 0, D])) with the past input's dtype."""
    name = f"twophase_empty_{p.value.name}"
    rest = _const(graph, f"{name}_dims", np.array(dims[1:], dtype=np.int64))
    shape = ir.Node("", "Concat", [batch_1d, rest], attributes=[ir.AttrInt64("axis", 0)])
    shape.outputs[0].dtype = ir.DataType.INT64
    shape.outputs[0].shape = ir.Shape([4])
    dtype = p.value.dtype or ir.DataType.FLOAT
    zero = ir.tensor(np.zeros((1,), dtype=dtype.numpy()))
    fill = ir.Node("", "ConstantOfShape", [shape.outputs[0]], attributes=[ir.AttrTensor("value", zero)])
    out = fill.outputs[0]
    out.name, out.dtype, out.shape = name, dtype, ir.Shape(dims)
    batch_node = batch_1d.producer()
    assert batch_node is not None
    graph.insert_after(batch_node, [shape, fill])
    return out


# -- last-position logits ---------------------------------------------------------------------


def _is_constant_expr(value: ir.Value | None, depth: int = 4) -> bool:
    """True for an initializer/Constant, or an op tree over them (Transpose(W), DequantizeLinear(...))."""
    if value is None:
        return False
    if value.const_value is not None:
        return True
    if value.is_graph_input():
        return False
    node = value.producer()
    if node is None or depth == 0 or not node.inputs:
        return node is not None and node.op_type == "Constant"
    return all(v is None or _is_constant_expr(v, depth - 1) for v in node.inputs)


def _broadcasts_per_position(value: ir.Value) -> bool:
    """A constant operand that does not vary along the sequence axis (rank <= 1)."""
    shape = value.shape if value.shape is not None else (
        value.const_value.shape if value.const_value is not None else None
    )
    return shape is not None and len(shape) <= 1


def find_lm_head(graph: ir.Graph) -> ir.Node | None:
    """The MatMul(hidden, W) that produces `logits` through per-position elementwise ops, if any."""
    idx = _output_index(graph, "logits")
    if idx is None:
        return None
    value = graph.outputs[idx]
    while True:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul" and _is_constant_expr(node.inputs[1]):
            return node
        if node.op_type in _UNARY_PASSTHROUGH and len(node.inputs) == 1:
            nxt = node.inputs[0]
        elif node.op_type in _BINARY_PASSTHROUGH and len(node.inputs) == 2:
            a, b = node.inputs
            if _is_constant_expr(b) and b is not None and _broadcasts_per_position(b):
                nxt = a
            elif _is_constant_expr(a) and a is not None and _broadcasts_per_position(a):
                nxt = b
            else:
                return None
        else:
            return None
        # Slicing below `nxt` would change it for any other consumer.
        if nxt is None or len(nxt.uses()) != 1 or nxt.is_graph_output():
            return None
        value = nxt


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _is_last_position_slice(node: ir.Node) -> bool:
    """Slice(x, starts=[-1], ends=[>= 2**62], axes=[-2] or [1]): the one this pass inserts."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 4:
        return False
    starts, ends, axes = (_const_ints(v) for v in node.inputs[1:4])
    return starts == [-1] and ends is not None and len(ends) == 1 and ends[0] >= 2**62 and axes in ([-2], [1])


def find_last_position_slice(graph: ir.Graph) -> ir.Node | None:
    """The prefill graph's last-position Slice nearest to `logits` (breadth-first through producers; it may
    sit before a quantized lm_head, e.g. MatMulNBits), or None."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    frontier, seen = ([logits] if logits is not None else []), set()
    while frontier:
        nxt = []
        for value in frontier:
            node = value.producer()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if _is_last_position_slice(node):
                return node
            nxt.extend(v for v in node.inputs if v is not None)
        frontier = nxt
    return None


def _last_position_slice(graph: ir.Graph, value: ir.Value, name: str) -> ir.Node:
    starts = _const(graph, "twophase_last_starts", np.array([-1], dtype=np.int64))
    ends = _const(graph, "twophase_last_ends", np.array([_INT64_MAX], dtype=np.int64))
    axes = _const(graph, "twophase_last_axes", np.array([-2], dtype=np.int64))
    node = ir.Node("", "Slice", [value, starts, ends, axes], name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype = value.dtype
    return node


def _slice_last_position(graph: ir.Graph) -> None:
    idx = _output_index(graph, "logits")
    assert idx is not None
    logits = graph.outputs[idx]
    old_shape = logits.shape
    matmul = find_lm_head(graph)
    if matmul is not None:
        hidden = matmul.inputs[0]
        assert hidden is not None
        node = _last_position_slice(graph, hidden, "twophase_last_hidden")
        graph.insert_before(matmul, node)
        matmul.replace_input_with(0, node.outputs[0])
        log.debug("prefill: last-position Slice inserted before lm_head MatMul %r", matmul.name)
    else:
        log.warning(
            "prefill: no lm_head MatMul with a constant weight found behind output 'logits'; "
            "slicing the logits instead (the vocab-sized GEMM runs on every prompt position)"
        )
        node = _last_position_slice(graph, logits, "twophase_last_logits")
        logits_producer = logits.producer()
        assert logits_producer is not None
        graph.insert_after(logits_producer, node)
        logits.name = "twophase_logits_all"
        node.outputs[0].name = "logits"
        graph.outputs[idx] = node.outputs[0]
        logits = node.outputs[0]
    if old_shape is not None and len(old_shape) == 3:
        logits.shape = ir.Shape([old_shape[0], 1, old_shape[2]])


# ---------------------------------------------------------------------------------------------
# DECODE


def _specialize_decode(model: ir.Model) -> None:
    graph = model.graph
    ids = _input(graph, "input_ids")
    assert ids is not None
    batch_dim, _ = _dims2(ids)
    ids.shape = ir.Shape([batch_dim, 1])
    pos = _input(graph, "position_ids")
    if pos is not None:
        pos.shape = ir.Shape([pos.shape[0] if pos.shape is not None else batch_dim, 1])
    for p in _past_inputs(graph):
        idx = _output_index(graph, p.present_name)
        if idx is None or p.value.shape is None:
            continue
        b, h, past, d = p.value.shape
        total = past + 1 if isinstance(past, int) else ir.SymbolicDim(f"{past.value or 'past'} + 1")
        graph.outputs[idx].shape = ir.Shape([b, h, total, d])
    idx = _output_index(graph, "logits")
    assert idx is not None
    logits = graph.outputs[idx]
    vocab = logits.shape[2] if logits.shape is not None else ir.SymbolicDim("vocab")
    logits.shape = ir.Shape([batch_dim, 1, vocab])


# ---------------------------------------------------------------------------------------------


def _clear_intermediate_shapes(graph: ir.Graph) -> None:
    """Forget shapes inferred for the general graph; CleanupPass re-infers them for the phase."""
    outputs = set(graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for out in node.outputs:
            if out not in outputs:
                out.shape = None
