"""Bytes a decode step reads: the weights of an ONNX graph, counted from its initializers.

Every initializer counts once (a decode step reads each weight once, whatever the batch), except
tables read by row (the embedding through a Gather, GroupQueryAttention's rotary cos/sin caches). External data counts
by its stored length, so the numbers are those of the file the runtime maps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

GATHER_OPS = frozenset({"Gather", "GatherBlockQuantized", "GatherND", "GatherElements"})
ROTARY_INPUTS = (7, 8)  # GroupQueryAttention's cos/sin caches: one row per position is read


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


def graph_bytes(path: str | Path) -> GraphBytes:
    """Initializer bytes of the graph at `path`, split into streamed and gathered (module doc)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    gathered_names: set[str] = set()
    other_readers: set[str] = set()
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if (node.op_type in GATHER_OPS and i == 0) or (node.op_type == "GroupQueryAttention" and i in ROTARY_INPUTS):
                gathered_names.add(name)
            else:
                other_readers.add(name)
    streamed = gathered = 0
    for init in model.graph.initializer:
        n = _nbytes(init)
        if init.name in gathered_names and init.name not in other_readers:
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
