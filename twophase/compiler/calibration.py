"""Calibration statistics of MatMul activations, collected by running a float graph on real text.

    windows = corpus.default_calibration_windows(tokenizer_json, n=16, length=512)
    stats = collect_matmul_stats(model, windows, hessian=True)       # {weight name: MatMulStats}
    act_absmax(stats)      # {activation value name: absmax [K]}  (static W8A8 scales, SmoothQuant)
    hessians(stats)        # {weight name: H [K, K]}              (GPTQ)

For every MatMul whose B input is an initializer W[K, N] (keyed by that initializer's name) and
whose A input x[..., K] is float, over all calibration tokens (rows of x flattened to [T, K]):

    absmax_K[k]   = max_t |x[t, k]|          float32   (per input channel)
    abs_sum_K[k]  = sum_t |x[t, k]|          float64   (mean |x| = abs_sum / tokens, for AWQ-style scaling)
    hessian_KK    = sum_t x[t]^T x[t]        float64   (optional; GPTQ's H up to a factor 2 / tokens)

How: a clone of the graph (sharing its weights) gets every such A input as an extra graph output;
ORT (basic graph optimizations, so no MatMul is fused away from its input) runs the windows one at a
time, and the statistics are accumulated in NumPy; MatMuls that read the same activation (q/k/v,
gate/up) share one accumulator. Any graph with the canonical inputs works: the canonical graph
itself (past length 0: empty past tensors are fed) or a prefill phase graph, whose value names are
the ones the prefill quantization passes see. In a prefill graph the lm_head reads the last
position only, so its statistics come from one token per window; the canonical graph gives all.

Statistics are those of the float model (one pass, not GPTQ's layer-by-layer re-collection on the
already quantized prefix).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from twophase.compiler.errors import TwophaseError
from twophase.compiler.manifest import FACTS_METADATA_KEY, ModelFacts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MatMulStats:
    """Accumulated statistics of one MatMul's activation input x[..., K] (see module doc)."""

    weight: str  # the B initializer's name
    activation: str  # the A input value's name
    absmax_K: np.ndarray  # float32 [K]
    abs_sum_K: np.ndarray  # float64 [K]
    tokens: int = 0
    hessian_KK: np.ndarray | None = None  # float64 [K, K]

    @property
    def mean_abs_K(self) -> np.ndarray:
        return self.abs_sum_K / max(self.tokens, 1)


@dataclasses.dataclass
class _Accumulator:
    absmax: np.ndarray
    abs_sum: np.ndarray
    hessian: np.ndarray | None
    tokens: int = 0

    def add(self, x: np.ndarray) -> None:
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # (T, K)
        a = np.abs(x2)
        np.maximum(self.absmax, a.max(axis=0), out=self.absmax)
        self.abs_sum += a.sum(axis=0, dtype=np.float64)
        if self.hessian is not None:
            self.hessian += x2.T @ x2  # float32 products over one window, accumulated in float64
        self.tokens += x2.shape[0]


def weighted_matmuls(graph: ir.Graph) -> list[ir.Node]:
    """MatMuls whose B input is a 2-D initializer and whose A input is a float (or untyped) value."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or not b.is_initializer() or b.const_value is None:
            continue
        if b.shape is not None and len(b.shape) != 2:
            continue
        if a.dtype not in (ir.DataType.FLOAT, None):
            continue
        found.append(node)
    return found


def _external_dir(model: ir.Model) -> Path | None:
    """The directory every external initializer of `model` resolves in (None if none is external)."""
    dirs = {
        str(v.const_value.base_dir)
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(dirs) > 1:
        raise TwophaseError(f"the graph's external weights live in several directories {sorted(dirs)}; save it first")
    return Path(dirs.pop()) if dirs else None


def _session(model: ir.Model, threads: int | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
    weights_dir = _external_dir(model)
    if weights_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])


def _empty_past_dims(value: ir.Value, facts: ModelFacts | None) -> tuple[int, int]:
    shape = value.shape
    heads = shape[1] if shape is not None and len(shape) == 4 else None
    head_dim = shape[3] if shape is not None and len(shape) == 4 else None
    if not isinstance(heads, int) and facts is not None:
        heads = facts.num_kv_heads
    if not isinstance(head_dim, int) and facts is not None:
        head_dim = facts.head_dim
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise TwophaseError(f"input {value.name!r} has shape {shape}: its heads and head_dim must be static")
    return heads, head_dim


def _feeds(graph: ir.Graph, window: np.ndarray, facts: ModelFacts | None) -> dict[str, np.ndarray]:
    """Feeds for one window (batch 1, past length 0) for the canonical or a prefill graph."""
    ids = np.asarray(window, dtype=np.int64).reshape(1, -1)  # (1, S)
    S = ids.shape[1]
    feeds: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        name = v.name or ""
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((1, S), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(S, dtype=np.int64)[None]
        elif name.startswith("past_key_values."):
            heads, head_dim = _empty_past_dims(v, facts)
            dtype = v.dtype.numpy() if v.dtype is not None else np.float32
            feeds[name] = np.zeros((1, heads, 0, head_dim), dtype=dtype)  # (B, H, 0, D)
        else:
            raise TwophaseError(
                f"calibration does not know how to feed graph input {name!r}; it runs the canonical or a "
                "prefill graph (input_ids, attention_mask, position_ids, past_key_values.*)"
            )
    return feeds


def collect_matmul_stats(
    model: ir.Model,
    windows: Sequence[np.ndarray] | np.ndarray,
    *,
    hessian: bool = False,
    threads: int | None = 2,
) -> dict[str, MatMulStats]:
    """Run `windows` (token id rows) through `model` and return {weight initializer name: MatMulStats}.

    The model is not modified. Memory: one window's activations plus the accumulators
    (with `hessian`, K*K float64 per distinct activation: ~0.8 GB for SmolLM2-135M).
    """
    if len(windows) == 0:
        raise TwophaseError("calibration needs at least one window of token ids")
    t0 = time.perf_counter()
    facts = ModelFacts.from_metadata(dict(model.metadata_props)) if FACTS_METADATA_KEY in model.metadata_props else None
    probe = model.clone()  # shares the weight tensors
    graph = probe.graph
    matmuls = weighted_matmuls(graph)
    if not matmuls:
        raise TwophaseError("the graph has no MatMul with an initializer weight to calibrate")
    by_act: dict[str, list[ir.Node]] = {}
    act_values: dict[str, ir.Value] = {}
    for node in matmuls:
        a = node.inputs[0]
        assert a is not None
        if not a.name:
            raise TwophaseError(f"MatMul {node.name!r} reads an unnamed value; run the name-fixing cleanup first")
        by_act.setdefault(a.name, []).append(node)
        act_values[a.name] = a
    graph_inputs = {v.name for v in graph.inputs}
    existing_outputs = {v.name for v in graph.outputs}
    for name, value in act_values.items():
        if name not in graph_inputs and name not in existing_outputs:
            graph.outputs.append(value)
    sess = _session(probe, threads)
    fetch = [n for n in act_values if n not in graph_inputs]

    acc: dict[str, _Accumulator] = {}
    for i, window in enumerate(windows):
        feeds = _feeds(graph, window, facts)
        outs = dict(zip(fetch, sess.run(fetch, feeds)))
        for name in act_values:
            x = outs[name] if name in outs else feeds[name]
            if name not in acc:
                K = x.shape[-1]
                acc[name] = _Accumulator(
                    np.zeros(K, np.float32), np.zeros(K, np.float64), np.zeros((K, K), np.float64) if hessian else None
                )
            acc[name].add(x)
        del outs
        log.debug("calibration window %d/%d", i + 1, len(windows))

    stats: dict[str, MatMulStats] = {}
    for name, nodes in by_act.items():
        a = acc[name]
        for node in nodes:
            w = node.inputs[1]
            assert w is not None and w.name is not None
            if w.name in stats:  # one weight read by two MatMuls: keep the first, say so
                log.warning(
                    "weight %s is read by several MatMuls; using the statistics of %s", w.name, stats[w.name].activation
                )
                continue
            stats[w.name] = MatMulStats(w.name, name, a.absmax, a.abs_sum, a.tokens, a.hessian)
    log.info(
        "calibration: %d MatMuls (%d distinct activations) over %d windows in %.1f s",
        len(stats), len(acc), len(windows), time.perf_counter() - t0,
    )
    return stats


def act_absmax(stats: Mapping[str, MatMulStats]) -> dict[str, np.ndarray]:
    """{activation value name: per-input-channel absmax float32 [K]}: the W8A8 passes' ActivationStats."""
    return {s.activation: s.absmax_K for s in stats.values()}


def hessians(stats: Mapping[str, MatMulStats]) -> dict[str, np.ndarray]:
    """{weight initializer name: H = sum x^T x, float64 [K, K]} for GPTQ (stats collected with hessian=True)."""
    missing = [k for k, s in stats.items() if s.hessian_KK is None]
    if missing:
        raise TwophaseError(
            f"no Hessians collected (for {missing[:3]}...): call collect_matmul_stats(..., hessian=True)"
        )
    return {k: s.hessian_KK for k, s in stats.items()}  # type: ignore[misc]


def collect_kv_absmax(
    model: ir.Model, windows: Sequence[np.ndarray] | np.ndarray, *, threads: int | None = 2
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (key absmax, value absmax)}, each float32 [kv_heads, head_dim], of the `present.{i}.key|value`
    outputs (keys after the rotary embedding) of `model` run on `windows`: the int8 KV cache's scales."""
    if len(windows) == 0:
        raise TwophaseError("calibration needs at least one window of token ids")
    facts = ModelFacts.from_metadata(dict(model.metadata_props)) if FACTS_METADATA_KEY in model.metadata_props else None
    names = [v.name for v in model.graph.outputs if v.name and v.name.startswith("present.")]
    if not names:
        raise TwophaseError("the graph has no present.{i}.key|value outputs to calibrate a KV cache on")
    sess = _session(model, threads)
    absmax: dict[str, np.ndarray] = {}
    for window in windows:
        for name, x in zip(names, sess.run(names, _feeds(model.graph, window, facts))):
            m = np.abs(x).max(axis=(0, 2))  # (B, H, T, D) -> (H, D)
            absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
    layers = sorted({int(n.split(".")[1]) for n in names})
    return {i: (absmax[f"present.{i}.key"], absmax[f"present.{i}.value"]) for i in layers}
