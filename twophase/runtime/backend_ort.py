"""ONNX Runtime backend: one InferenceSession per phase graph.

`OrtPhase` loads a phase's graph (its external weights resolve next to it), checks the session's
inputs and outputs against the manifest's PhaseEntry, and runs a dict of numpy feeds.
Every backend exposes the same surface: `input_names`, `output_names`, `run(feeds) -> dict`.
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from twophase.compiler.errors import ArtifactError, TwophaseError
from twophase.compiler.manifest import PhaseEntry, TensorSpec

log = logging.getLogger(__name__)

# What InferenceSession raises when a graph cannot be loaded (these do not derive from RuntimeError).
_ORT_LOAD_ERRORS = (
    RuntimeError,
    _ort_state.Fail,
    _ort_state.InvalidGraph,
    _ort_state.NoSuchFile,
    _ort_state.InvalidProtobuf,
    _ort_state.InvalidArgument,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
)

# ORT's type strings -> numpy dtype names used in the manifest's TensorSpecs.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class GraphOptLevel(enum.Enum):
    DISABLE_ALL = "disable_all"
    ENABLE_BASIC = "basic"
    ENABLE_EXTENDED = "extended"
    ENABLE_ALL = "all"

    def to_ort(self) -> ort.GraphOptimizationLevel:
        return {
            GraphOptLevel.DISABLE_ALL: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            GraphOptLevel.ENABLE_BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            GraphOptLevel.ENABLE_EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            GraphOptLevel.ENABLE_ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self]


def providers_for(device: str) -> list[str]:
    """Execution providers for a device name ("cpu" or "cuda"); CUDA must be present in this onnxruntime."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise TwophaseError(
                f"device 'cuda' requested but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu or use device='cpu'"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise TwophaseError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def session_options(
    threads: int | None = None, opt_level: GraphOptLevel = GraphOptLevel.ENABLE_ALL, prepack: bool = True
) -> ort.SessionOptions:
    """Options for one phase session.

    `prepack=False` keeps ORT from repacking MatMul weights into per-session buffers: the sessions then
    memory-map weights.bin and share its pages (one copy in memory, near-instant load) at the price of
    slower GEMMs (SmolLM2-135M fp32, 2 threads: decode 37 vs 45 tok/s; RSS 0.55 vs 1.1 GB).
    """
    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:
        if threads <= 0:
            raise TwophaseError(f"threads must be a positive integer, got {threads!r}")
        so.intra_op_num_threads = threads
    so.graph_optimization_level = opt_level.to_ort()
    so.log_severity_level = 3  # errors only; ORT's warnings go to stderr otherwise
    return so


class OrtPhase:
    """A phase graph loaded into an ONNX Runtime session."""

    def __init__(
        self,
        graph_path: str | Path,
        entry: PhaseEntry,
        *,
        name: str = "phase",
        threads: int | None = None,
        device: str = "cpu",
        opt_level: GraphOptLevel = GraphOptLevel.ENABLE_ALL,
        prepack: bool = True,
    ) -> None:
        self.name = name
        self.entry = entry
        self.graph_path = Path(graph_path)
        if entry.backend != "ort":
            raise ArtifactError(f"phases.{name}.backend is {entry.backend!r}; this backend runs 'ort' graphs only")
        try:
            self.session = ort.InferenceSession(
                str(self.graph_path), sess_options=session_options(threads, opt_level, prepack), providers=providers_for(device)
            )
        except _ORT_LOAD_ERRORS as e:
            raise ArtifactError(f"{str(self.graph_path)!r}: onnxruntime cannot load phase {name!r} ({e})") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        check_signature(self.session, entry, name=f"{self.graph_path.name} (phase {name})")
        self.calls = 0  # runs so far; tests use it to check that nothing ran
        log.debug("loaded %s with %s", self.graph_path, self.session.get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; returns {output name: array}."""
        self.calls += 1
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))

    def run_bound(self, feeds: dict[str, np.ndarray], cache: Any, row: int | None = None) -> np.ndarray:
        """Run a bound-KV graph: `cache`'s buffers (or one row of them) are bound as past and present and
        updated in place, the small `feeds` are bound as CPU inputs; returns the logits."""
        self.calls += 1
        io = self.session.io_binding()
        for name, array in feeds.items():
            io.bind_cpu_input(name, array)
        io.bind_output("logits")
        if row is None:
            cache.bind(io)
        else:
            cache.bind_row(io, row)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def decode_step(self, cache: Any, vocab_size: int, rows: int | None = None) -> BoundDecodeStep:
        """A decode step over `cache` (its first `rows`) with every input and output bound once."""
        return BoundDecodeStep(self, cache, vocab_size, rows)


class BoundDecodeStep:
    """A decode step over a bound KV cache with every input and output bound once (ORT I/O binding).

    The small inputs live in numpy arrays that the step overwrites in place and the logits land in a
    preallocated buffer, so a step makes no allocation and no binding call: it writes B token ids and
    lengths, runs, and copies the (B, V) logits out. Valid for one cache allocation (`cache.version`);
    `rows` binds only the cache's first rows (a batch whose tail is idle).
    """

    def __init__(self, phase: OrtPhase, cache: Any, vocab_size: int, rows: int | None = None) -> None:
        B = rows or cache.batch_size  # the first B rows of the cache
        self.rows = B
        self.phase = phase
        self.version = cache.version
        self.input_ids = np.zeros((B, 1), dtype=np.int64)
        self.seqlens_k = np.zeros((B,), dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.query_seqlens = np.ones((B,), dtype=np.int32)
        self.logits = np.zeros((B, 1, vocab_size), dtype=np.float32)
        self.io = phase.session.io_binding()
        self._values = []  # keep the OrtValues (and through them the arrays) alive
        for name, array in (("input_ids", self.input_ids), ("seqlens_k", self.seqlens_k),
                            ("total_sequence_length", self.total), ("query_seqlens", self.query_seqlens)):
            value = ort.OrtValue.ortvalue_from_numpy(array)
            self._values.append(value)
            self.io.bind_ortvalue_input(name, value)
        value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self._values.append(value)
        self.io.bind_ortvalue_output("logits", value)
        cache.bind(self.io, rows=B)

    def run(self, tokens: np.ndarray, lengths_after: np.ndarray, query_lens: np.ndarray) -> np.ndarray:
        """One step: tokens (B,), each row's cache length after the step (B,), tokens added per row (B,)."""
        self.phase.calls += 1
        self.input_ids[:, 0] = tokens
        np.subtract(np.maximum(lengths_after, 1), 1, out=self.seqlens_k, casting="unsafe")
        self.total[...] = max(int(lengths_after.max()), 1)
        self.query_seqlens[:] = query_lens
        self.phase.session.run_with_iobinding(self.io)
        return self.logits[:, 0, :].copy()


def check_signature(session: ort.InferenceSession, entry: PhaseEntry, name: str) -> None:
    """The session's inputs and outputs match the manifest's (names, dtypes, ranks, static dims)."""
    problems: list[str] = []
    for kind, actual, expected in (
        ("input", session.get_inputs(), entry.inputs),
        ("output", session.get_outputs(), entry.outputs),
    ):
        got = {a.name: a for a in actual}
        want = {t.name: t for t in expected}
        if missing := [n for n in want if n not in got]:
            problems.append(f"{kind}s {missing} in the manifest are not in the graph")
        if extra := [n for n in got if n not in want]:
            problems.append(f"graph {kind}s {extra} are not in the manifest")
        for n in want.keys() & got.keys():
            problems += _compare(kind, got[n], want[n])
    if problems:
        raise ArtifactError(f"{name}: graph does not match the manifest: {'; '.join(problems)}; recompile the artifact")


def _compare(kind: str, arg: Any, spec: TensorSpec) -> list[str]:
    out = []
    dtype = _ORT_DTYPES.get(arg.type, arg.type)
    if dtype != spec.dtype:
        out.append(f"{kind} {spec.name!r} has dtype {dtype}, manifest says {spec.dtype}")
    shape = list(arg.shape) if arg.shape is not None else None
    if shape is not None and spec.shape and len(shape) != len(spec.shape):
        out.append(f"{kind} {spec.name!r} has rank {len(shape)}, manifest says {len(spec.shape)}")
    elif shape is not None:
        for i, (a, s) in enumerate(zip(shape, spec.shape)):
            if isinstance(a, int) and isinstance(s, int) and a != s:
                out.append(f"{kind} {spec.name!r} dim {i} is {a}, manifest says {s}")
    return out
