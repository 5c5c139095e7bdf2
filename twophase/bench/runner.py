"""`twophase bench`: prefill and decode throughput of artifacts over batch sizes and context lengths.

    result = run_bench([fp32_dir, w4_dir, ...], BenchConfig(batches=(1, 4, 16), contexts=(128, 512, 2048)))
    result.rows            # one BenchRow per (artifact, phase, batch, context), with its speedup vs fp32

What is measured, per cell (batch B, context C):
    prefill   B prompts of C tokens (one batched, chunked prefill): B * C / seconds
    decode    `decode_steps` greedy steps of B rows whose caches hold C positions: B * steps / seconds
              (summed over the rows). The cache is filled directly, not by running the prompt: decode
              speed does not depend on the cached values, and a 16 x 2048 prefill per repetition
              would dominate the run.
Token ids are random (seeded) and the same for every artifact. Repetitions are interleaved (each
repetition runs every artifact on every cell) and the rows report medians with the min-max spread.

Speedups are against the baseline of the same model measured in the same run: the artifact whose
phases are both fp32 (else the first artifact of that model). With `roofline=True` the machine's
read bandwidth and fp32 / int8 GEMM peaks are measured too (twophase.bench.roofline) and each row
gets its bound: decode from the bytes a step streams (weights once + each row's K/V), prefill from
the multiply-adds per token and the GEMM peak of its scheme (int8 for w8a8, fp32 otherwise). A TVM
phase's bytes come from its parameter index; its prefill, a compiled library with no graph to count
multiply-adds from, gets no bound.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twophase.compiler.errors import TwophaseError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (128, 512, 2048)
    threads: int = 2
    reps: int = 3
    decode_steps: int = 32
    phases: tuple[str, ...] = ("prefill", "decode")
    roofline: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batches", "contexts"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise TwophaseError(f"bench {name} must be positive integers, got {values!r}")
        if self.threads < 1 or self.reps < 1 or self.decode_steps < 1:
            raise TwophaseError("bench threads, reps and decode_steps must be >= 1")
        if not self.phases or set(self.phases) - {"prefill", "decode"}:
            raise TwophaseError(f"bench phases must be prefill and/or decode, got {self.phases!r}")


@dataclasses.dataclass
class BenchRow:
    model: str
    artifact: str
    prefill_scheme: str
    decode_scheme: str
    kv_binding: str
    phase: str
    batch: int
    context: int
    tok_s: float  # median
    tok_s_min: float
    tok_s_max: float
    speedup: float | None = None  # vs the model's baseline, same phase / batch / context
    baseline: str | None = None
    bound_tok_s: float | None = None  # roofline bound (roofline=True)
    bytes_per_token: float | None = None  # decode
    macs_per_token: float | None = None  # prefill

    @property
    def roofline_fraction(self) -> float | None:
        return self.tok_s / self.bound_tok_s if self.bound_tok_s else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roofline_fraction"] = self.roofline_fraction
        return d


@dataclasses.dataclass
class BenchResult:
    config: BenchConfig
    rows: list[BenchRow]
    machine: dict[str, Any]
    synthetic_models: list[str]  # models with random weights (speed only)
    skipped: list[str]  # cells that do not fit an artifact's context


class _Subject:
    """One artifact under measurement."""

    def __init__(self, path: Path, threads: int) -> None:
        from twophase.runtime.engine import Engine

        self.path = path
        self.engine = Engine.load(path, threads=threads)
        m = self.engine.manifest
        self.model = str(m.source.get("name") or m.model.architecture)
        self.prefill_scheme = m.phases["prefill"].scheme
        self.decode_scheme = m.phases["decode"].scheme
        self.binding = m.kv_cache["binding"]
        self.label = path.name

    @property
    def is_fp32(self) -> bool:
        return self.prefill_scheme == self.decode_scheme == "fp32"

    def fits(self, context: int, steps: int) -> bool:
        return context + steps <= self.engine.max_len

    def time_prefill(self, ids: np.ndarray) -> float:
        e = self.engine
        t = time.perf_counter()
        e.prefill(ids, np.ones_like(ids))
        seconds = time.perf_counter() - t
        e.cache.reset()
        return seconds

    def time_decode(self, batch: int, context: int, steps: int, tokens: np.ndarray) -> float:
        e = self.engine
        fill_cache(e, batch, context, reserve=steps + 1)
        e.decode_one_token(tokens)  # first step after a (re)allocation builds the bound I/O
        t = time.perf_counter()
        for _ in range(steps - 1):
            e.decode_one_token(tokens)
        seconds = (time.perf_counter() - t) * steps / max(steps - 1, 1)
        e.cache.reset()
        return seconds


def fill_cache(engine, batch: int, context: int, reserve: int) -> None:
    """Put `context` cached positions (zeros) in every row, as a prefill of that length would (timing only)."""
    from twophase.runtime.kv_cache import BoundKVCache

    cache = engine.cache
    if isinstance(cache, BoundKVCache):
        cache.allocate(batch, context + reserve)
        cache.lengths[:] = context
        return
    shape = (batch, cache.num_kv_heads, context, cache.head_dim)
    cache.reset()
    cache.update([np.zeros(shape, dtype=cache.dtype) for _ in cache.present_names],
                 new_mask=np.ones((batch, context), dtype=np.int64))


def run_bench(
    artifacts: Sequence[str | Path], config: BenchConfig = BenchConfig(), progress: Callable[[str], None] | None = None
) -> BenchResult:
    """Measure every artifact on every (phase, batch, context) cell; see module doc."""
    from twophase.bench.roofline import machine_info

    if not artifacts:
        raise TwophaseError("bench needs at least one artifact directory")
    step = progress or (lambda msg: None)
    subjects = [_Subject(Path(a), config.threads) for a in artifacts]
    vocab = {s.engine.facts.vocab_size for s in subjects}
    rng = np.random.default_rng(config.seed)
    ids = rng.integers(3, min(vocab), size=(max(config.batches), max(config.contexts)), dtype=np.int64)
    tokens = {b: ids[:b, 0].copy() for b in config.batches}

    cells = [(p, b, c) for p in config.phases for b in config.batches for c in config.contexts]
    samples: dict[tuple[int, str, int, int], list[float]] = {}
    skipped = []
    for rep in range(config.reps):
        for phase, b, c in cells:
            step(f"rep {rep + 1}/{config.reps}: {phase} batch {b} context {c}")
            for i, s in enumerate(subjects):
                if not s.fits(c, config.decode_steps if phase == "decode" else 0):
                    if rep == 0:
                        skipped.append(f"{s.label}: {phase} batch {b} context {c} exceeds max_len {s.engine.max_len}")
                    continue
                if phase == "prefill":
                    rate = b * c / s.time_prefill(ids[:b, :c])
                else:
                    rate = b * config.decode_steps / s.time_decode(b, c, config.decode_steps, tokens[b])
                samples.setdefault((i, phase, b, c), []).append(rate)

    rows = []
    for (i, phase, b, c), rates in samples.items():
        s = subjects[i]
        rows.append(BenchRow(s.model, s.label, s.prefill_scheme, s.decode_scheme, s.binding, phase, b, c,
                             statistics.median(rates), min(rates), max(rates)))
    _speedups(rows, subjects)
    machine = machine_info()
    machine["threads"] = config.threads
    if config.roofline:
        step("roofline: bandwidth and GEMM peaks")
        machine.update(_roofline(rows, subjects, config))
    synthetic = sorted({s.model for s in subjects if s.model.startswith("random-")})
    return BenchResult(config, rows, machine, synthetic, skipped)


def _speedups(rows: list[BenchRow], subjects: list[_Subject]) -> None:
    baselines: dict[str, _Subject] = {}
    for s in subjects:
        if s.model not in baselines or (s.is_fp32 and not baselines[s.model].is_fp32):
            baselines[s.model] = s
    by_key = {(r.artifact, r.phase, r.batch, r.context): r for r in rows}
    for r in rows:
        base = baselines[r.model]
        ref = by_key.get((base.label, r.phase, r.batch, r.context))
        if ref is not None:
            r.speedup, r.baseline = r.tok_s / ref.tok_s, base.label


def _roofline(rows: list[BenchRow], subjects: list[_Subject], config: BenchConfig) -> dict[str, Any]:
    from twophase.bench.model_bytes import kv_bytes_per_position, matmul_macs, phase_bytes
    from twophase.bench.roofline import StreamKernel, measure_bandwidth, measure_gemm_peak

    bw = measure_bandwidth(config.threads)
    read = bw.kernel(StreamKernel.READ).median_gbs
    gemm = measure_gemm_peak(config.threads)
    peaks = {"fp32": gemm.fp32.median_gops, "int8": gemm.int8.median_gops}
    info = {}
    for s in subjects:
        e, f = s.engine, s.engine.facts
        info[s.label] = {
            "decode_weight_bytes": phase_bytes(e.root, e.manifest.phases["decode"]).streamed,
            # a TVM phase is a compiled library: no graph to count its MACs from (its prefill rows get no bound)
            "prefill_macs": (None if e.manifest.phases["prefill"].params else
                             matmul_macs(e.prefill_phase.graph_path, exclude_n=f.vocab_size)),
            "kv_bytes": kv_bytes_per_position(f.num_layers, f.num_kv_heads, f.head_dim,
                                              np.dtype(e.manifest.kv_cache["dtype"]).itemsize),
            "attn_dim": f.num_layers * (f.num_heads or f.num_kv_heads) * f.head_dim,
        }
    for r in rows:
        i = info[r.artifact]
        if r.phase == "decode":
            r.bytes_per_token = (i["decode_weight_bytes"] + r.batch * r.context * i["kv_bytes"]) / r.batch
            r.bound_tok_s = read * 1e9 / r.bytes_per_token
        elif i["prefill_macs"] is not None:
            # projections + attention (QK^T and PV over a causal context: C/2 keys on average)
            r.macs_per_token = i["prefill_macs"] + 2 * i["attn_dim"] * r.context / 2
            peak = peaks["int8" if r.prefill_scheme == "w8a8" else "fp32"]
            r.bound_tok_s = peak * 1e9 / (2 * r.macs_per_token)
    return {"read_bandwidth_gbs": read, "gemm_peak_gops": peaks, "bandwidth": bw.to_dict(), "gemm": gemm.to_dict()}
