"""Bytes a decode step reads: the weights of an ONNX graph, counted from its initializers.

Every initializer counts once (a decode step reads each weight once, whatever the batch), except
tables read by row (the embedding through a Gather or the TVM backend's QGather, GroupQueryAttention's rotary
cos/sin caches). The TVM backend marks such parameters in its `{phase}.params.json` ("rows": true) from the same
rule (`row_read_names`). External data counts by its stored length, so the numbers are those of the file the
runtime maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

GATHER_OPS = frozenset({"Gather", "GatherBlockQuantized", "GatherND", "GatherElements"})
ROTARY_INPUTS = (7, 8)  # GroupQueryAttention's cos/sin caches: one row per position is read
QGATHER_IDS = 1  # twophase.tvm.QGather (TVM backend): every input but the ids (table, scales, offsets) is read by row


@dataclasses.dataclass(frozen=True)
class GraphBytes:
    streamed: int  # initializer bytes a step reads in full (MatMul weights, scales, norms, tables)
    gathered: int  # initializer bytes read by row (embedding tables): not part of a step's stream

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _nbytes(init) -> int:
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in init.external_data}.get("length", 0))
    if init.raw_data:
        return len(init.raw_data)
    import numpy as np
    from onnx import numpy_helper

    return int(np.asarray(numpy_helper.to_array(init)).nbytes)


def row_read_names(nodes: Iterable[tuple[str, Sequence[str]]]) -> set[str]:
    """Names of the values that the nodes (op type, input names) read only by row (module doc)."""
    rows: set[str] = set()
    other: set[str] = set()
    for op_type, inputs in nodes:
        for i, name in enumerate(inputs):
            by_row = ((op_type in GATHER_OPS and i == 0) or (op_type == "GroupQueryAttention" and i in ROTARY_INPUTS)
                      or (op_type == "QGather" and i != QGATHER_IDS))
            (rows if by_row else other).add(name)
    return rows - other


def read_by_row(param: dict) -> bool:
    """Whether a step reads the TVM parameter (an entry of `{phase}.params.json`) by row: marked "rows", or in
    artifacts built before that mark, a quantized table (".table.tvm")."""
    return bool(param.get("rows")) or ".table.tvm" in param["name"]


def params_bytes(path: str | Path) -> GraphBytes:
    """Parameter bytes of a TVM phase from its `{phase}.params.json`, split as `graph_bytes` splits a graph's: the
    entries `read_by_row` are gathered."""
    import json

    streamed = gathered = 0
    for p in json.loads(Path(path).read_text())["params"]:
        if read_by_row(p):
            gathered += int(p["length"])
        else:
            streamed += int(p["length"])
    return GraphBytes(streamed, gathered)


def phase_bytes(root: str | Path, entry) -> GraphBytes:
    """`graph_bytes` of an artifact's phase (a manifest phase entry under `root`): its ONNX graph, or a TVM phase's
    parameter index."""
    if entry.params:
        return params_bytes(Path(root) / entry.params)
    return graph_bytes(Path(root) / entry.graph)


def graph_bytes(path: str | Path) -> GraphBytes:
    """Initializer bytes of the graph at `path`, split into streamed and gathered (module doc)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered_names = row_read_names((node.op_type, node.input) for node in model.graph.node)
    streamed = gathered = 0
    for init in model.graph.initializer:
        n = _nbytes(init)
        if init.name in gathered_names:
            gathered += n
        else:
            streamed += n
    return GraphBytes(streamed, gathered)


def kv_bytes_per_position(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of one position of one row, all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def matmul_macs(path: str | Path, exclude_n: int | None = None) -> int:
    """Multiply-adds per token of the graph's weight MatMuls (K * N each): MatMul with a 2-D initializer,
    MatMulNBits (its K and N), MatMulInteger / MatMulIntegerToFloat / DynamicQuantizeMatMul (their
    initializer B). `exclude_n` leaves out MatMuls of that width (the lm_head, which prefill runs on the
    last position only)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: tuple(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        kn = None
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            kn = (attrs.get("K", 0), attrs.get("N", 0))
        elif node.op_type in ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
            shape = dims.get(node.input[1]) if len(node.input) > 1 else None
            if shape is not None and len(shape) == 2:
                kn = shape
        if kn is not None and kn[1] != exclude_n:
            total += int(kn[0]) * int(kn[1])
    return total
