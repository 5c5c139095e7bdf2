"""Named pass pipelines, one per target, assembled from per-phase pass lists.

A pipeline maps the canonical graph to one phase's graph. Each pass that runs is recorded with its
time and its graph diff (what it added and removed), which the artifact's report.json carries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import onnx_ir as ir

from twophase.compiler.errors import UnsupportedModelError
from twophase.compiler.graph_diff import diff_models
from twophase.compiler.options import CompileOptions, Phase, QuantScheme
from twophase.passes.cleanup import CleanupPass
from twophase.passes.split_phases import SplitPhasesPass

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassRecord:
    phase: str
    name: str
    modified: bool
    seconds: float
    diff: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _ort_phase_passes(phase: Phase, options: CompileOptions) -> list[ir.passes.PassBase]:
    scheme = options.phase(phase).scheme
    if scheme is not QuantScheme.FP32:
        raise UnsupportedModelError(f"scheme {scheme.value} is not implemented for the ORT target yet")
    return [SplitPhasesPass(phase), CleanupPass()]


# target name -> function (phase, options) -> the phase's passes, in order
PIPELINES: dict[str, Callable[[Phase, CompileOptions], list[ir.passes.PassBase]]] = {
    "ort-cpu": _ort_phase_passes,
    "ort-cuda": _ort_phase_passes,
}


def target_name(options: CompileOptions) -> str:
    return f"{options.backend.value}-{options.device.value}"


def phase_passes(phase: Phase, options: CompileOptions) -> list[ir.passes.PassBase]:
    name = target_name(options)
    if name not in PIPELINES:
        raise UnsupportedModelError(f"no pipeline for target {name!r} (have {sorted(PIPELINES)})")
    return PIPELINES[name](phase, options)


def run_phase_pipeline(
    canonical: ir.Model, phase: Phase, options: CompileOptions
) -> tuple[ir.Model, list[PassRecord]]:
    """Run the phase's passes on (a copy of) the canonical graph; the input is left unchanged."""
    model = canonical
    records: list[PassRecord] = []
    for p in phase_passes(phase, options):
        snapshot = model.clone()  # shares tensors: cheap, and in-place passes leave it intact
        start = time.perf_counter()
        result = p(model)
        seconds = time.perf_counter() - start
        diff = diff_models(snapshot, result.model)
        records.append(PassRecord(phase.value, type(p).__name__, result.modified, round(seconds, 3), diff.to_dict()))
        log.info("%s: %s %s in %.2fs", phase.value, type(p).__name__, "modified" if result.modified else "no-op", seconds)
        model = result.model
    return model, records
