"""BindKVCachePass: attention over preallocated KV buffers updated in place (the ORT target's KV binding).

Each layer's attention, as the opset-23 exporter writes it, becomes one ORT GroupQueryAttention whose
past and present K/V are the same buffer [batch, kv_heads, capacity, head_dim], with the rotary
embedding inside the op (cos/sin tables precomputed for positions 0..max_len-1):

    Before (decode; prefill has no past and present = k_rot):
        q = RotaryEmbedding(Transpose(Reshape(x_q, [B,S,Hq,D])), cos(pos), sin(pos))
        k_rot = RotaryEmbedding(Transpose(Reshape(x_k, [B,S,Hkv,D])), cos(pos), sin(pos))
        present.i.key = Concat(past_key_values.i.key, k_rot, axis=2)           (value: no rotary)
        a = Attention(q, Reshape(Expand(Unsqueeze(present.i.key))), ..., mask(attention_mask), scale)
        y = Reshape(Transpose(a), [B,S,Hq*D])
    After:
        y, present.i.key, present.i.value = com.microsoft.GroupQueryAttention(
            x_q, x_k, x_v, past_key_values.i.key, past_key_values.i.value, seqlens_k,
            total_sequence_length, cos_cache, sin_cache, query_seqlens=query_seqlens,
            num_heads=Hq, kv_num_heads=Hkv, do_rotary=1, scale, softcap)

Graph signature after the pass (both phases; the runtime binds the K/V inputs and outputs to one buffer):

    input_ids              int64 [batch, seq]        (decode: seq = 1)
    seqlens_k              int32 [batch]             tokens in the cache after this step, minus one
    total_sequence_length  int32 []                  max over the batch of seqlens_k + 1
    query_seqlens          int32 [batch]             valid tokens of this step per row (right padding;
                                                     0 = an idle row whose cache is left unchanged)
    past_key_values.{i}.key|value  [batch, kv_heads, capacity, head_dim]
    -> logits [batch, 1, vocab] (each row's last valid token), present.{i}.key|value (the same buffers)

Rows are stored compactly from position 0 (no padding inside the cache), so a row's positions and
attention never depend on the other rows of its batch; `attention_mask` and `position_ids` are gone.
A prompt longer than one step's chunk runs as several steps (chunked prefill). In the prefill graph
the last-position Slice that SplitPhasesPass put before the lm_head becomes a per-row GatherND at
query_seqlens - 1.

`kv_dtype="int8"` stores the cache as int8 with one scale per (kv head, channel) for K and for V
(calibrated absmax / 127, given as `kv_scales`); GroupQueryAttention quantizes on write and
dequantizes on read.

Preconditions (PassError, naming the layer and what did not match, when any layer's attention is not
in the form above): the opset-23 form of SplitPhasesPass's output, full (not partial) rotary,
no sliding window, head_dim a multiple of 16. The compiler falls back to the "grow" binding for such graphs.
Pipeline: ORT target, after quantization and FuseDequantMatMulPass (it does not touch the projections).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from twophase.compiler.errors import PassError

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
BOUND_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
_GQA_INPUTS = 17  # query_seqlens is GroupQueryAttention's 17th input
GQA_HEAD_DIM_MULTIPLE = 16  # ORT's CPU kernel refuses other head sizes


class BindKVCacheError(PassError, ir.passes.PreconditionError):
    """The graph's attention is not in the form BindKVCachePass rewrites."""


@dataclasses.dataclass
class _Layer:
    index: int
    attention: ir.Node
    x_q: ir.Value
    x_k: ir.Value
    x_v: ir.Value
    cos: ir.Value
    sin: ir.Value
    interleaved: int
    out: ir.Value  # Reshape(Transpose(attention)) [B, S, Hq*D]
    num_heads: int
    kv_num_heads: int
    head_dim: int


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None:
        return None
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else None


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


class BindKVCachePass(ir.passes.InPlacePass):
    """Rewrites every layer's attention into GroupQueryAttention over bound KV buffers (module doc).

    Args:
        max_len: the longest context the artifact serves (rows of the rotary tables).
        kv_dtype: "float32" or "int8" (then `kv_scales` {layer: (k_scale, v_scale)}, each [kv_heads, head_dim]).
        kv_scales: int8 cache scales per layer.
    """

    def __init__(
        self, max_len: int, *, kv_dtype: str = "float32", kv_scales: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    ) -> None:
        super().__init__()
        if max_len <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if kv_dtype not in ("float32", "int8"):
            raise ValueError(f"kv_dtype must be 'float32' or 'int8', got {kv_dtype!r}")
        if kv_dtype == "int8" and not kv_scales:
            raise ValueError("an int8 KV cache needs kv_scales (calibrated per layer)")
        self.max_len = max_len
        self.kv_dtype = kv_dtype
        self.kv_scales = kv_scales or {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = match_layers(graph)
        if self.kv_dtype == "int8":
            missing = sorted({layer.index for layer in layers} - set(self.kv_scales))
            if missing:
                raise BindKVCacheError(f"BindKVCachePass: no int8 KV scales for layers {missing}")
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        is_prefill = not any(v.name.startswith("past_key_values.") for v in graph.inputs)
        batch = _batch_dim(graph)
        capacity = ir.SymbolicDim("capacity")
        inputs = _bound_inputs(graph, batch)
        tables = _rotary_tables(graph, layers[0], self.max_len)
        cos_cache = _initializer(graph, "twophase_rotary_cos", tables[0])
        sin_cache = _initializer(graph, "twophase_rotary_sin", tables[1])
        cache_type = ir.DataType.INT8 if self.kv_dtype == "int8" else ir.DataType.FLOAT
        for layer in layers:
            if not (_same_value(layer.cos, layers[0].cos) and _same_value(layer.sin, layers[0].sin)):
                raise BindKVCacheError(f"BindKVCachePass: layer {layer.index} uses other rotary tables than layer 0")
            past = []
            for kind in ("key", "value"):
                shape = ir.Shape([batch, layer.kv_num_heads, capacity, layer.head_dim])
                past.append(_past_input(graph, f"past_key_values.{layer.index}.{kind}", shape, cache_type))
            gqa_inputs: list[ir.Value | None] = [
                layer.x_q, layer.x_k, layer.x_v, past[0], past[1],
                inputs["seqlens_k"], inputs["total_sequence_length"], cos_cache, sin_cache,
            ]
            gqa_inputs += [None] * (_GQA_INPUTS - len(gqa_inputs))
            gqa_inputs[16] = inputs["query_seqlens"]
            attrs = [
                ir.AttrInt64("num_heads", layer.num_heads),
                ir.AttrInt64("kv_num_heads", layer.kv_num_heads),
                ir.AttrInt64("do_rotary", 1),
                ir.AttrInt64("rotary_interleaved", layer.interleaved),
            ]
            scale = layer.attention.attributes.get("scale")
            if scale is not None:
                attrs.append(ir.AttrFloat32("scale", scale.as_float()))
            softcap = layer.attention.attributes.get("softcap")
            if softcap is not None and softcap.as_float() != 0.0:
                attrs.append(ir.AttrFloat32("softcap", softcap.as_float()))
            if self.kv_dtype == "int8":
                k_scale, v_scale = self.kv_scales[layer.index]
                shape4 = (1, layer.kv_num_heads, 1, layer.head_dim)
                gqa_inputs[12] = _initializer(graph, f"twophase_kv_scale.{layer.index}.key",
                                              np.asarray(k_scale, np.float32).reshape(shape4))
                gqa_inputs[13] = _initializer(graph, f"twophase_kv_scale.{layer.index}.value",
                                              np.asarray(v_scale, np.float32).reshape(shape4))
                attrs += [ir.AttrString("k_quant_type", "PER_CHANNEL"), ir.AttrString("v_quant_type", "PER_CHANNEL"),
                          ir.AttrInt64("kv_cache_bit_width", 8)]
            node = ir.Node(MS_DOMAIN, "GroupQueryAttention", gqa_inputs, attributes=attrs, num_outputs=3,
                           name=f"twophase_gqa_{layer.index}")
            y, present_k, present_v = node.outputs
            y.dtype, y.shape = ir.DataType.FLOAT, layer.out.shape
            graph.insert_after(layer.out.producer(), node)
            layer.out.replace_all_uses_with(y)
            y.name = f"twophase_attention_{layer.index}"
            for kind, value in (("key", present_k), ("value", present_v)):
                name = f"present.{layer.index}.{kind}"
                idx = next(i for i, v in enumerate(graph.outputs) if v.name == name)
                graph.outputs[idx].name = f"{name}.unbound"  # free the name for the new output
                graph.outputs[idx] = value
                value.name, value.dtype = name, cache_type
                value.shape = ir.Shape([batch, layer.kv_num_heads, capacity, layer.head_dim])
        if is_prefill:
            _gather_last_valid(graph, inputs["query_seqlens"])
        common_passes.RemoveUnusedNodesPass()(model)
        for name in ("attention_mask", "position_ids"):
            value = next((v for v in graph.inputs if v.name == name), None)
            if value is not None and not value.uses():
                graph.inputs.remove(value)
        leftover = [n.name for n in graph if n.op_type in ("Attention", "RotaryEmbedding") and n.domain == ""]
        if leftover:
            raise BindKVCacheError(f"BindKVCachePass: attention nodes left after the rewrite: {leftover[:4]}")
        model.metadata_props["twophase.kv_binding"] = "bound"
        log.info("bound the KV cache of %d layers (%s)", len(layers), self.kv_dtype)
        return ir.passes.PassResult(model, modified=True)


# -- matching -----------------------------------------------------------------------------------


def match_layers(graph: ir.Graph) -> list[_Layer]:
    """Every layer's attention in the opset-23 form, in layer order; BindKVCacheError says what differs."""
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if not attentions:
        raise BindKVCacheError("BindKVCachePass: the graph has no opset-23 Attention node to bind")
    layers = [_match_layer(n) for n in attentions]
    indices = sorted(layer.index for layer in layers)
    if indices != list(range(len(layers))):
        raise BindKVCacheError(f"BindKVCachePass: attention nodes map to layers {indices}, expected 0..{len(layers) - 1}")
    return sorted(layers, key=lambda layer: layer.index)


def _match_layer(attn: ir.Node) -> _Layer:
    where = f"BindKVCachePass: Attention node {attn.name!r}"
    if len(attn.inputs) > 4 and any(v is not None for v in attn.inputs[4:]):
        raise BindKVCacheError(f"{where} takes past K/V inputs of its own")
    if any(out.uses() or out.is_graph_output() for out in attn.outputs[1:]):
        raise BindKVCacheError(f"{where} has its present/qk outputs in use")
    if _int_attr(attn, "qk_matmul_output_mode", 0) != 0:
        raise BindKVCacheError(f"{where} has qk_matmul_output_mode != 0")
    q_rot = _producer(attn.inputs[0], "RotaryEmbedding")
    if q_rot is None:
        raise BindKVCacheError(f"{where}: its query is not the output of a RotaryEmbedding")
    x_q, num_heads, head_dim = _heads_input(q_rot.inputs[0], where, "query")
    present_k = _strip_gqa_expand(attn.inputs[1])
    present_v = _strip_gqa_expand(attn.inputs[2])
    layer = _present_layer(present_k, "key", where)
    if _present_layer(present_v, "value", where) != layer:
        raise BindKVCacheError(f"{where}: its key and value come from different layers' caches")
    k_new, v_new = _new_entry(present_k), _new_entry(present_v)
    k_rot = _producer(k_new, "RotaryEmbedding")
    if k_rot is None:
        raise BindKVCacheError(f"{where}: the new key entry is not the output of a RotaryEmbedding")
    for rot in (q_rot, k_rot):
        if len(rot.inputs) > 3 and rot.inputs[3] is not None:
            raise BindKVCacheError(f"{where}: RotaryEmbedding with position_ids input is not supported")
        if _int_attr(rot, "rotary_embedding_dim", 0) not in (0, head_dim):
            raise BindKVCacheError(f"{where}: partial rotary embeddings are not supported by GroupQueryAttention binding")
    if not all(_same_value(q_rot.inputs[i], k_rot.inputs[i]) for i in (1, 2)):
        raise BindKVCacheError(f"{where}: query and key use different rotary tables")
    if _int_attr(q_rot, "interleaved", 0) != _int_attr(k_rot, "interleaved", 0):
        raise BindKVCacheError(f"{where}: query and key rotate differently (interleaved)")
    x_k, kv_heads, k_dim = _heads_input(k_rot.inputs[0], where, "key")
    x_v, v_heads, v_dim = _heads_input(v_new, where, "value")
    if (kv_heads, k_dim) != (v_heads, v_dim) or k_dim != head_dim:
        raise BindKVCacheError(f"{where}: query/key/value head shapes differ ({head_dim}, {k_dim}, {v_dim})")
    if head_dim % GQA_HEAD_DIM_MULTIPLE:
        raise BindKVCacheError(
            f"{where}: head_dim {head_dim} is not a multiple of {GQA_HEAD_DIM_MULTIPLE}, which ORT's "
            "GroupQueryAttention requires"
        )
    if num_heads % kv_heads:
        raise BindKVCacheError(f"{where}: {num_heads} query heads are not a multiple of {kv_heads} kv heads")
    if attn.inputs[3] is None and _int_attr(attn, "is_causal", 0) == 0:
        raise BindKVCacheError(f"{where} is neither causal nor masked")
    out = _merged_heads_output(attn, where)
    return _Layer(layer, attn, x_q, x_k, x_v, q_rot.inputs[1], q_rot.inputs[2], _int_attr(q_rot, "interleaved", 0),
                  out, num_heads, kv_heads, head_dim)


def _same_value(a: ir.Value | None, b: ir.Value | None, depth: int = 8) -> bool:
    """a and b are the same value, or the same op with the same attributes over the same values (no CSE yet)."""
    if a is b:
        return True
    na, nb = (a.producer() if a is not None else None), (b.producer() if b is not None else None)
    if na is None or nb is None or depth == 0:
        return False
    if (na.op_type, na.domain, len(na.inputs)) != (nb.op_type, nb.domain, len(nb.inputs)):
        return False
    if {k: str(v) for k, v in na.attributes.items()} != {k: str(v) for k, v in nb.attributes.items()}:
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(na.inputs, nb.inputs))


def _heads_input(value: ir.Value | None, where: str, what: str) -> tuple[ir.Value, int, int]:
    """x [B, S, H*D] behind Transpose(Reshape(x, [B, S, H, D]), perm=[0, 2, 1, 3]) -> (x, H, D)."""
    transpose = _producer(value, "Transpose")
    reshape = _producer(transpose.inputs[0] if transpose else None, "Reshape")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3] or reshape is None:
        raise BindKVCacheError(f"{where}: the {what} is not Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3])")
    x = reshape.inputs[0]
    assert x is not None
    if x.shape is None or len(x.shape) != 3 or not isinstance(x.shape[2], int):
        raise BindKVCacheError(f"{where}: the {what} projection output has shape {x.shape}, expected [B, S, H*D]")
    shape = reshape.outputs[0].shape
    head_dim = shape[3] if shape is not None and len(shape) == 4 else None
    if not isinstance(head_dim, int) or x.shape[2] % head_dim:
        raise BindKVCacheError(f"{where}: the {what} heads reshape has no static head_dim ({shape})")
    return x, x.shape[2] // head_dim, head_dim


def _strip_gqa_expand(value: ir.Value | None) -> ir.Value | None:
    """present behind Reshape(Expand(Unsqueeze(present, 2), [B, Hkv, g, T, D]), [B, Hkv*g, T, D]), if there."""
    reshape = _producer(value, "Reshape")
    expand = _producer(reshape.inputs[0] if reshape else None, "Expand")
    unsqueeze = _producer(expand.inputs[0] if expand else None, "Unsqueeze")
    if unsqueeze is None:
        return value
    return unsqueeze.inputs[0]


def _present_layer(value: ir.Value | None, kind: str, where: str) -> int:
    match = _PRESENT_RE.match(value.name or "") if value is not None else None
    if value is None or match is None or not value.is_graph_output() or match.group(2) != kind:
        raise BindKVCacheError(f"{where}: its {kind} is not a graph output present.{{i}}.{kind}")
    return int(match.group(1))


def _new_entry(present: ir.Value) -> ir.Value | None:
    """The step's new K or V: Concat(past, new, axis=2)'s last operand (decode), or present itself (prefill)."""
    concat = _producer(present, "Concat")
    if concat is None:
        return present
    past = concat.inputs[0]
    if len(concat.inputs) != 2 or past is None or not past.is_graph_input():
        raise BindKVCacheError(f"BindKVCachePass: {present.name} is not Concat(past input, new entry)")
    return concat.inputs[1]


def _merged_heads_output(attn: ir.Node, where: str) -> ir.Value:
    """y = Reshape(Transpose(attention output, [0, 2, 1, 3]), [B, S, H*D])."""
    uses = list(attn.outputs[0].uses())
    transpose = uses[0][0] if len(uses) == 1 else None
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != [0, 2, 1, 3]:
        raise BindKVCacheError(f"{where}: its output is not transposed back to [B, S, H, D]")
    uses = list(transpose.outputs[0].uses())
    reshape = uses[0][0] if len(uses) == 1 else None
    if reshape is None or reshape.op_type != "Reshape":
        raise BindKVCacheError(f"{where}: its output heads are not merged by a Reshape")
    return reshape.outputs[0]


# -- new graph pieces ---------------------------------------------------------------------------


def _batch_dim(graph: ir.Graph) -> int | ir.SymbolicDim:
    ids = next((v for v in graph.inputs if v.name == "input_ids"), None)
    if ids is None or ids.shape is None:
        raise BindKVCacheError("BindKVCachePass: no input_ids [batch, seq] graph input")
    return ids.shape[0]


def _bound_inputs(graph: ir.Graph, batch: int | ir.SymbolicDim) -> dict[str, ir.Value]:
    shapes = {"seqlens_k": ir.Shape([batch]), "total_sequence_length": ir.Shape([]), "query_seqlens": ir.Shape([batch])}
    values = {}
    for name, shape in shapes.items():
        if any(v.name == name for v in graph.inputs):
            raise BindKVCacheError(f"BindKVCachePass: the graph already has an input {name!r}")
        values[name] = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT32), shape=shape)
        graph.inputs.append(values[name])
    return values


def _past_input(graph: ir.Graph, name: str, shape: ir.Shape, dtype: ir.DataType) -> ir.Value:
    """The (existing, decode) or new (prefill) past input, reshaped to the bound buffer."""
    value = next((v for v in graph.inputs if v.name == name), None)
    if value is None:
        value = ir.Value(name=name)
        graph.inputs.append(value)
    value.shape, value.type = shape, ir.TensorType(dtype)
    return value


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.dtype, value.shape = value.const_value.dtype, ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _rotary_tables(graph: ir.Graph, layer: _Layer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_len, D/2]: the graph's own cos/sin subgraph evaluated at positions 0..max_len-1."""
    cos, sin = evaluate_subgraph(graph, [layer.cos, layer.sin],
                                 {"position_ids": np.arange(max_len, dtype=np.int64)[None, :]})
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        t = np.asarray(t, dtype=np.float32)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        if t.shape != (max_len, layer.head_dim // 2):
            raise BindKVCacheError(
                f"BindKVCachePass: the rotary {name} table has shape {t.shape}, expected ({max_len}, {layer.head_dim // 2})"
            )
        tables.append(np.ascontiguousarray(t))
    return tables[0], tables[1]


def evaluate_subgraph(graph: ir.Graph, outputs: list[ir.Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Values of `outputs` computed from graph inputs `feeds` and constants only (ONNX Runtime, no fusions)."""
    import onnx
    import onnxruntime as ort

    needed: set[ir.Node] = set()
    inputs: set[str] = set()
    initializers: dict[str, ir.Value] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        if value.const_value is not None and value.is_initializer():
            initializers[value.name] = value
            continue
        if value.is_graph_input():
            if value.name not in feeds:
                raise BindKVCacheError(f"BindKVCachePass: {outputs[0].name} depends on graph input {value.name!r}")
            inputs.add(value.name)
            continue
        node = value.producer()
        if node is None or node in needed:
            continue
        needed.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    nodes = [ir.serde.serialize_node(n) for n in graph if n in needed]  # graph order is topological
    proto = onnx.helper.make_graph(
        nodes, "twophase_subgraph",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape)
         for n in sorted(inputs)],
        [onnx.helper.make_tensor_value_info(v.name, (v.dtype or ir.DataType.FLOAT).value, None) for v in outputs],
        [ir.serde.serialize_tensor(v.const_value) for v in initializers.values()],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()]
    sub = onnx.helper.make_model(proto, opset_imports=opsets)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run([v.name for v in outputs], {n: feeds[n] for n in inputs})


def _gather_last_valid(graph: ir.Graph, query_seqlens: ir.Value) -> None:
    """Replace the lm_head's last-position Slice by hidden[b, query_seqlens[b] - 1] (GatherND, batch_dims=1)."""
    from twophase.passes.split_phases import find_last_position_slice

    node = find_last_position_slice(graph)
    if node is None:
        raise BindKVCacheError("BindKVCachePass: the prefill graph has no last-position Slice before its lm_head")
    hidden, sliced = node.inputs[0], node.outputs[0]
    one = _initializer(graph, "twophase_one_i32", np.array(1, dtype=np.int32))
    last_axis = _initializer(graph, "twophase_axes_last", np.array([-1], dtype=np.int64))
    axis1 = _initializer(graph, "twophase_axes_1", np.array([1], dtype=np.int64))
    sub = ir.Node("", "Sub", [query_seqlens, one])
    cast = ir.Node("", "Cast", [sub.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT64)])
    index = ir.Node("", "Unsqueeze", [cast.outputs[0], last_axis])  # [B, 1]
    gather = ir.Node("", "GatherND", [hidden, index.outputs[0]], attributes=[ir.AttrInt64("batch_dims", 1)])
    last = ir.Node("", "Unsqueeze", [gather.outputs[0], axis1], name="twophase_last_valid_hidden")  # [B, 1, E]
    graph.insert_before(node, [sub, cast, index, gather, last])
    last.outputs[0].name = "twophase_last_valid_hidden"
    last.outputs[0].dtype = hidden.dtype
    sliced.replace_all_uses_with(last.outputs[0])
    graph.remove(node, safe=True)
