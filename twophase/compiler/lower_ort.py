"""Lowering to ONNX Runtime: phase graphs as .onnx files sharing one external weights file.

Every initializer of at least SIZE_THRESHOLD bytes is written once to `weights.bin`, keyed by its
content (dtype, shape, bytes), and both phase graphs reference it there as ONNX external data.
Large tensors start at page-aligned offsets so ONNX Runtime can memory-map them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from twophase.compiler.errors import PassError
from twophase.compiler.manifest import TensorSpec

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
SIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inside the graph file
PAGE = 4096
SMALL_ALIGN = 64


@dataclasses.dataclass(frozen=True)
class LoweredPhase:
    graph_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclasses.dataclass
class WeightsStats:
    tensors_written: int = 0
    tensors_shared: int = 0  # references that reused an already written tensor
    bytes_written: int = 0
    bytes_shared: int = 0


def tensor_spec(value: ir.Value) -> TensorSpec:
    dtype = value.dtype
    np_name = np.dtype(dtype.numpy()).name if dtype is not None else "unknown"
    shape: tuple[int | str | None, ...] = ()
    if value.shape is not None:
        shape = tuple(d if isinstance(d, int) else (d.value if d.value is not None else None) for d in value.shape)
    return TensorSpec(value.name, np_name, shape)


def write_phase_graphs(models: dict[str, ir.Model], out_dir: Path) -> tuple[dict[str, LoweredPhase], WeightsStats]:
    """Write `{phase}.onnx` for each model plus the shared weights file into `out_dir`.

    The models' large initializers are replaced (in place) by references into weights.bin.
    """
    out_dir = Path(out_dir)
    stats = WeightsStats()
    written: dict[bytes, tuple[int, int]] = {}  # content key -> (offset, length)
    lowered: dict[str, LoweredPhase] = {}
    with open(out_dir / WEIGHTS_FILE, "wb") as weights:
        for phase, model in models.items():
            for graph in model.graphs():
                for value in graph.initializers.values():
                    _externalize(value, weights, written, stats, out_dir)
            graph_file = f"{phase}.onnx"
            ir.save(model, out_dir / graph_file)
            weights.flush()
            _check(out_dir / graph_file, phase)
            lowered[phase] = LoweredPhase(
                graph_file,
                tuple(tensor_spec(v) for v in model.graph.inputs),
                tuple(tensor_spec(v) for v in model.graph.outputs),
            )
    log.info(
        "weights.bin: %d tensors, %.1f MB; %d references shared (%.1f MB not duplicated)",
        stats.tensors_written, stats.bytes_written / 1e6, stats.tensors_shared, stats.bytes_shared / 1e6,
    )
    return lowered, stats


def _check(path: Path, phase: str) -> None:
    """Full ONNX check (schema + strict shape inference) of a written graph, before any runtime sees it."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise PassError(
            f"the {phase} pipeline produced an invalid graph ({e}); this is a twophase bug, please report it "
            "with the source model's description"
        ) from e


def write_blob(key: str, data: bytes, weights, written: dict, stats: WeightsStats) -> tuple[int, int]:
    """(offset, length) of `data` in the open weights file: written once per distinct (key, content), large
    blobs page-aligned (memory-mappable), small ones SMALL_ALIGN-aligned; `written` maps content to place."""
    digest = hashlib.sha256(key.encode() + b"|" + data).digest()
    if digest in written:
        offset, length = written[digest]
        stats.tensors_shared += 1
        stats.bytes_shared += length
        return offset, length
    align = PAGE if len(data) >= 64 * 1024 else SMALL_ALIGN
    offset = -weights.tell() % align + weights.tell()
    weights.seek(offset)
    weights.write(data)
    written[digest] = (offset, len(data))
    stats.tensors_written += 1
    stats.bytes_written += len(data)
    return offset, len(data)


def _externalize(value: ir.Value, weights, written: dict, stats: WeightsStats, out_dir: Path) -> None:
    tensor = value.const_value
    if tensor is None or tensor.nbytes < SIZE_THRESHOLD:
        return
    offset, length = write_blob(f"{tensor.dtype}|{tuple(tensor.shape)}", tensor.tobytes(), weights, written, stats)
    value.const_value = ir.ExternalTensor(
        WEIGHTS_FILE,
        offset=offset,
        length=length,
        dtype=tensor.dtype,
        shape=tensor.shape,
        name=value.name,
        base_dir=str(out_dir),
    )
