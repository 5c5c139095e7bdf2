"""The per-phase default schemes, chosen by measurement (README, "Choosing schemes").

Measured on SmolLM2-135M, 2 threads (benchmarks/phases.py, benchmarks/accuracy.py):

- prefill (compute-bound): w8a8 with per-token dynamic int8 activations and SmoothQuant alpha 0.4
  (+1.4% perplexity, the fastest prefill); without SmoothQuant +4.1%. SmoothQuant needs calibration
  text, so a source without a tokenizer gets plain dynamic w8a8.
- decode (memory-bound): w4a16, block 32. A GGUF source keeps its own grid (exact: the artifact
  computes what the GGUF model computes); other sources round to nearest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from twophase.compiler.options import PhaseOptions, QuantScheme, WeightAlgorithm

log = logging.getLogger(__name__)

SMOOTHQUANT_ALPHA = 0.4  # dynamic (per-token) w8a8
# static w8a8: per-tensor calibrated scales with SmoothQuant 0.8, except the MLP down projections, which keep
# per-token scales with SmoothQuant 0.4 (+1.49% perplexity with 0.8, +3.07% with 0.9; all per-tensor with 0.5: +30.7%)
STATIC_SMOOTHQUANT_ALPHA = 0.8
PER_TOKEN_SMOOTHQUANT_ALPHA = 0.4


def _source_kind_and_tokenizer(source_spec: str) -> tuple[str, bool]:
    """("zoo" | "gguf" | "hf" | "onnx" | "unknown", whether the source brings a tokenizer)."""
    from twophase.models import zoo

    path = Path(source_spec).expanduser()
    if source_spec in zoo.ZOO and not path.exists():
        return "zoo", True
    if path.suffix == ".gguf":
        return "gguf", True
    if path.suffix == ".onnx":
        return "onnx", (path.parent / "tokenizer.json").is_file()
    if path.is_dir():
        return "hf", True
    return "unknown", False


def phase_defaults(source_spec: str) -> tuple[PhaseOptions, PhaseOptions]:
    """(prefill, decode) defaults for a source as the user named it."""
    kind, has_tokenizer = _source_kind_and_tokenizer(source_spec)
    if not has_tokenizer and kind != "unknown":
        log.warning("%s has no tokenizer: default prefill w8a8 runs without SmoothQuant calibration", source_spec)
    algorithm = WeightAlgorithm.GGUF if kind in ("zoo", "gguf") else WeightAlgorithm.RTN
    prefill = PhaseOptions(
        QuantScheme.W8A8, algorithm=algorithm, smoothquant_alpha=SMOOTHQUANT_ALPHA if has_tokenizer else None
    )
    return prefill, PhaseOptions(QuantScheme.W4A16, algorithm=algorithm)
