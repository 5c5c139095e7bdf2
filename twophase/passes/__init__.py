"""Graph-to-graph rewrites on onnx_ir, one pass per file (see each file's docstring).

    CleanupPass        cleanup.py        fold constants, drop dead code, infer shapes, sort
    SplitPhasesPass    split_phases.py   canonical graph -> prefill graph | decode graph

Names are imported lazily so that importing one pass does not import every other.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CleanupPass": "twophase.passes.cleanup",
    "SplitPhasesPass": "twophase.passes.split_phases",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
