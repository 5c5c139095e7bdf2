"""Structural difference between two ONNX graphs: what a pass added, removed and changed.

`diff_models(before, after)` compares two models (onnx_ir `ir.Model`, `onnx.ModelProto` or a
path) by metadata only: the I/O signature, the op-type histogram (subgraphs of If/Loop/Scan
included), the initializers (by name, with dtype, shape and byte count, never their data) and the
nodes (by op type and output names). The result feeds report.json (`GraphDiff.to_dict`), the
`twophase diff` command (`GraphDiff.format`) and the graph-diff test every pass has.

Files are opened without their external data, so diffing two 500 MB models reads only their
protobufs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Iterable, Union

import numpy as np
import onnx
import onnx_ir as ir

ModelLike = Union[ir.Model, onnx.ModelProto, str, os.PathLike]

# Longest list of nodes a GraphDiff keeps (the counts are always exact).
DEFAULT_NODE_LIST_CAP = 50

DimLike = Union[int, str, None]


# ---------------------------------------------------------------------------------------------
# Loading and small helpers


def _as_ir(model: ModelLike) -> ir.Model:
    """An ir.Model view of `model`, without loading any external tensor data."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if isinstance(model, (str, os.PathLike)):
        proto = onnx.load_model(os.fspath(model), load_external_data=False)
        return ir.serde.deserialize_model(proto)
    raise TypeError(f"expected an ir.Model, onnx.ModelProto or a path, got {type(model).__name__}")


def dtype_name(dtype: ir.DataType | None) -> str:
    """The numpy-style name of an ONNX element type ("float32", "int4", ...), "undefined" if unknown."""
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return "undefined"
    try:
        return np.dtype(dtype.numpy()).name
    except (TypeError, ValueError, NotImplementedError):
        return dtype.name.lower()


def _dims(shape: ir.Shape | None) -> tuple[DimLike, ...] | None:
    if shape is None:
        return None
    out: list[DimLike] = []
    for d in shape.dims:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value)  # str or None
    return tuple(out)


def _nbytes(dtype: ir.DataType | None, shape: ir.Shape | None) -> int:
    """Storage size of a dense tensor from its dtype and static shape (sub-byte types packed)."""
    if dtype is None or shape is None or dtype == ir.DataType.UNDEFINED:
        return 0
    numel = 1
    for d in shape.dims:
        if not isinstance(d, int):
            return 0
        numel *= d
    try:
        itemsize = dtype.itemsize
    except (TypeError, ValueError, NotImplementedError):
        return 0
    return int(math.ceil(numel * itemsize))


def op_key(node: ir.Node) -> str:
    """Op type, qualified by its domain when that is not the default ONNX domain."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def _iter_nodes(model: ir.Model) -> Iterable[ir.Node]:
    """Every node of the main graph and of the subgraphs nested in it (If/Loop/Scan bodies)."""
    return ir.traversal.RecursiveGraphIterator(model.graph)


# ---------------------------------------------------------------------------------------------
# Public helpers (also used by `twophase inspect`)


def op_histogram(model: ModelLike) -> collections.Counter[str]:
    """Count of nodes per (domain-qualified) op type, subgraph nodes included."""
    m = _as_ir(model)
    return collections.Counter(op_key(n) for n in _iter_nodes(m))


def initializer_bytes_by_dtype(model: ModelLike) -> dict[str, int]:
    """Total initializer bytes per dtype name, computed from dtype and shape (no data loaded)."""
    m = _as_ir(model)
    out: dict[str, int] = collections.defaultdict(int)
    for info in _initializers(m).values():
        out[info.dtype] += info.nbytes
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Diff records


@dataclasses.dataclass(frozen=True)
class TensorSig:
    """A graph input or output: name, dtype name and shape (ints static, strings symbolic)."""

    name: str
    dtype: str
    shape: tuple[DimLike, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}

    def describe(self) -> str:
        return f"{self.dtype}{_fmt_shape(self.shape)}"


@dataclasses.dataclass(frozen=True)
class SigChange:
    """An input or output present in both graphs whose dtype or shape differs."""

    name: str
    before: TensorSig
    after: TensorSig

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before.to_dict(), "after": self.after.to_dict()}


@dataclasses.dataclass(frozen=True)
class InitializerInfo:
    name: str
    dtype: str
    shape: tuple[DimLike, ...] | None
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
            "nbytes": self.nbytes,
        }


@dataclasses.dataclass(frozen=True)
class InitializerChange:
    """An initializer present in both graphs (same name) whose dtype or shape differs."""

    name: str
    before: InitializerInfo
    after: InitializerInfo

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before.to_dict(), "after": self.after.to_dict()}


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """A node identified by its op type and output names (its name when it has no named output)."""

    op: str
    outputs: tuple[str, ...]
    name: str = ""

    def key(self) -> tuple[str, tuple[str, ...]]:
        return (self.op, self.outputs if any(self.outputs) else (f"#{self.name}",))

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "outputs": list(self.outputs), "name": self.name}

    def describe(self) -> str:
        outs = ", ".join(self.outputs) if any(self.outputs) else f"node {self.name!r}"
        return f"{self.op} -> {outs}"


@dataclasses.dataclass(frozen=True)
class GraphDiff:
    """What changed from graph `a` (before) to graph `b` (after). Lists of nodes are capped."""

    inputs_added: tuple[TensorSig, ...] = ()
    inputs_removed: tuple[TensorSig, ...] = ()
    inputs_changed: tuple[SigChange, ...] = ()
    outputs_added: tuple[TensorSig, ...] = ()
    outputs_removed: tuple[TensorSig, ...] = ()
    outputs_changed: tuple[SigChange, ...] = ()
    op_delta: dict[str, int] = dataclasses.field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    nodes_added_count: int = 0
    nodes_removed_count: int = 0
    nodes_added: tuple[NodeRef, ...] = ()  # first `node_list_cap` of them
    nodes_removed: tuple[NodeRef, ...] = ()
    initializers_added: tuple[InitializerInfo, ...] = ()
    initializers_removed: tuple[InitializerInfo, ...] = ()
    initializers_changed: tuple[InitializerChange, ...] = ()
    initializer_bytes_before: dict[str, int] = dataclasses.field(default_factory=dict)
    initializer_bytes_after: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def signature_changed(self) -> bool:
        return bool(
            self.inputs_added or self.inputs_removed or self.inputs_changed
            or self.outputs_added or self.outputs_removed or self.outputs_changed
        )

    @property
    def is_empty(self) -> bool:
        """True when nothing this diff tracks differs."""
        return not (
            self.signature_changed or self.op_delta or self.nodes_added_count or self.nodes_removed_count
            or self.initializers_added or self.initializers_removed or self.initializers_changed
        )

    def ops_added(self) -> dict[str, int]:
        return {k: v for k, v in self.op_delta.items() if v > 0}

    def ops_removed(self) -> dict[str, int]:
        return {k: -v for k, v in self.op_delta.items() if v < 0}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary (for report.json)."""
        return {
            "inputs": {
                "added": [t.to_dict() for t in self.inputs_added],
                "removed": [t.to_dict() for t in self.inputs_removed],
                "changed": [c.to_dict() for c in self.inputs_changed],
            },
            "outputs": {
                "added": [t.to_dict() for t in self.outputs_added],
                "removed": [t.to_dict() for t in self.outputs_removed],
                "changed": [c.to_dict() for c in self.outputs_changed],
            },
            "op_delta": dict(self.op_delta),
            "nodes": {
                "before": self.nodes_before,
                "after": self.nodes_after,
                "added_count": self.nodes_added_count,
                "removed_count": self.nodes_removed_count,
                "added": [n.to_dict() for n in self.nodes_added],
                "removed": [n.to_dict() for n in self.nodes_removed],
            },
            "initializers": {
                "added": [i.to_dict() for i in self.initializers_added],
                "removed": [i.to_dict() for i in self.initializers_removed],
                "changed": [c.to_dict() for c in self.initializers_changed],
                "bytes_by_dtype_before": dict(self.initializer_bytes_before),
                "bytes_by_dtype_after": dict(self.initializer_bytes_after),
            },
        }

    def format(self, max_nodes: int = 20) -> str:
        """Human-readable multi-line text (for `twophase diff A.onnx B.onnx`).

        Lists at most `max_nodes` added and removed nodes each; the counts are always complete.
        """
        lines: list[str] = []
        for kind, added, removed, changed in (
            ("inputs", self.inputs_added, self.inputs_removed, self.inputs_changed),
            ("outputs", self.outputs_added, self.outputs_removed, self.outputs_changed),
        ):
            if not (added or removed or changed):
                lines.append(f"{kind}: unchanged")
                continue
            lines.append(f"{kind}:")
            lines += [f"  + {t.name}  {t.describe()}" for t in added]
            lines += [f"  - {t.name}  {t.describe()}" for t in removed]
            lines += [f"  ~ {c.name}  {c.before.describe()} -> {c.after.describe()}" for c in changed]

        lines.append(f"nodes: {self.nodes_before} -> {self.nodes_after} "
                     f"({self.nodes_added_count} added, {self.nodes_removed_count} removed)")
        if self.op_delta:
            lines.append("ops:")
            width = max(len(k) for k in self.op_delta)
            for op, d in sorted(self.op_delta.items(), key=lambda kv: (-abs(kv[1]), kv[0])):
                lines.append(f"  {op:<{width}}  {d:+d}")
        else:
            lines.append("ops: unchanged")
        for sign, nodes, count in (("+", self.nodes_added, self.nodes_added_count),
                                   ("-", self.nodes_removed, self.nodes_removed_count)):
            shown = nodes[:max_nodes]
            lines += [f"  {sign} {n.describe()}" for n in shown]
            if count > len(shown):
                lines.append(f"  {sign} ... and {count - len(shown)} more")

        inits = (self.initializers_added, self.initializers_removed, self.initializers_changed)
        if any(inits):
            lines.append(
                f"initializers: {len(self.initializers_added)} added "
                f"({_fmt_bytes(sum(i.nbytes for i in self.initializers_added))}), "
                f"{len(self.initializers_removed)} removed "
                f"({_fmt_bytes(sum(i.nbytes for i in self.initializers_removed))}), "
                f"{len(self.initializers_changed)} changed"
            )
            for c in self.initializers_changed:
                lines.append(
                    f"  ~ {c.name}  {c.before.dtype}{_fmt_shape(c.before.shape)} {_fmt_bytes(c.before.nbytes)}"
                    f" -> {c.after.dtype}{_fmt_shape(c.after.shape)} {_fmt_bytes(c.after.nbytes)}"
                )
        else:
            lines.append("initializers: unchanged")
        dtypes = sorted(set(self.initializer_bytes_before) | set(self.initializer_bytes_after))
        if dtypes:
            lines.append("initializer bytes by dtype:")
            for dt in dtypes:
                b0 = self.initializer_bytes_before.get(dt, 0)
                b1 = self.initializer_bytes_after.get(dt, 0)
                lines.append(f"  {dt:<10} {_fmt_bytes(b0):>10} -> {_fmt_bytes(b1):>10}")
            t0 = sum(self.initializer_bytes_before.values())
            t1 = sum(self.initializer_bytes_after.values())
            lines.append(f"  {'total':<10} {_fmt_bytes(t0):>10} -> {_fmt_bytes(t1):>10}")
        return "\n".join(lines)


def _fmt_shape(shape: tuple[DimLike, ...] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# The diff


def _signature(values: Iterable[ir.Value]) -> dict[str, TensorSig]:
    out: dict[str, TensorSig] = {}
    for v in values:
        name = v.name or ""
        out[name] = TensorSig(name, dtype_name(v.dtype), _dims(v.shape))
    return out


def _diff_signature(
    a: dict[str, TensorSig], b: dict[str, TensorSig]
) -> tuple[tuple[TensorSig, ...], tuple[TensorSig, ...], tuple[SigChange, ...]]:
    added = tuple(b[n] for n in b if n not in a)
    removed = tuple(a[n] for n in a if n not in b)
    changed = tuple(SigChange(n, a[n], b[n]) for n in a if n in b and a[n] != b[n])
    return added, removed, changed


def _initializers(model: ir.Model) -> dict[str, InitializerInfo]:
    """Initializers of the main graph and of every subgraph, keyed by name."""
    out: dict[str, InitializerInfo] = {}
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            dtype = value.dtype
            shape = value.shape
            tensor = value.const_value
            if tensor is not None:
                dtype = dtype or tensor.dtype
                shape = shape or tensor.shape
            out[name] = InitializerInfo(name, dtype_name(dtype), _dims(shape), _nbytes(dtype, shape))
    return out


def _node_refs(model: ir.Model) -> list[NodeRef]:
    return [
        NodeRef(op_key(n), tuple(o.name or "" for o in n.outputs), n.name or "")
        for n in _iter_nodes(model)
    ]


def diff_models(a: ModelLike, b: ModelLike, *, node_list_cap: int = DEFAULT_NODE_LIST_CAP) -> GraphDiff:
    """The difference from model `a` (before) to model `b` (after).

    Either may be an `ir.Model`, an `onnx.ModelProto` or a path to a .onnx file (read without its
    external data). Nodes are matched by (op type, output names), initializers by name.
    """
    ma, mb = _as_ir(a), _as_ir(b)

    in_added, in_removed, in_changed = _diff_signature(_signature(ma.graph.inputs), _signature(mb.graph.inputs))
    out_added, out_removed, out_changed = _diff_signature(
        _signature(ma.graph.outputs), _signature(mb.graph.outputs)
    )

    hist_a, hist_b = op_histogram(ma), op_histogram(mb)
    op_delta = {k: hist_b[k] - hist_a[k] for k in sorted(set(hist_a) | set(hist_b)) if hist_b[k] != hist_a[k]}

    refs_a, refs_b = _node_refs(ma), _node_refs(mb)
    count_a = collections.Counter(r.key() for r in refs_a)
    count_b = collections.Counter(r.key() for r in refs_b)
    only_b = count_b - count_a
    only_a = count_a - count_b
    added_refs = _pick(refs_b, only_b)
    removed_refs = _pick(refs_a, only_a)

    init_a, init_b = _initializers(ma), _initializers(mb)
    init_added = tuple(init_b[n] for n in init_b if n not in init_a)
    init_removed = tuple(init_a[n] for n in init_a if n not in init_b)
    init_changed = tuple(
        InitializerChange(n, init_a[n], init_b[n])
        for n in init_a
        if n in init_b and (init_a[n].dtype, init_a[n].shape) != (init_b[n].dtype, init_b[n].shape)
    )

    return GraphDiff(
        inputs_added=in_added,
        inputs_removed=in_removed,
        inputs_changed=in_changed,
        outputs_added=out_added,
        outputs_removed=out_removed,
        outputs_changed=out_changed,
        op_delta=op_delta,
        nodes_before=len(refs_a),
        nodes_after=len(refs_b),
        nodes_added_count=len(added_refs),
        nodes_removed_count=len(removed_refs),
        nodes_added=tuple(added_refs[:node_list_cap]),
        nodes_removed=tuple(removed_refs[:node_list_cap]),
        initializers_added=init_added,
        initializers_removed=init_removed,
        initializers_changed=init_changed,
        initializer_bytes_before=initializer_bytes_by_dtype(ma),
        initializer_bytes_after=initializer_bytes_by_dtype(mb),
    )


def _pick(refs: list[NodeRef], wanted: collections.Counter) -> list[NodeRef]:
    """The refs whose key is in `wanted`, as many of each as `wanted` counts, in graph order."""
    left = collections.Counter(wanted)
    out = []
    for r in refs:
        k = r.key()
        if left[k] > 0:
            left[k] -= 1
            out.append(r)
    return out


__all__ = [
    "GraphDiff",
    "InitializerChange",
    "InitializerInfo",
    "NodeRef",
    "SigChange",
    "TensorSig",
    "diff_models",
    "dtype_name",
    "initializer_bytes_by_dtype",
    "op_histogram",
    "op_key",
]
