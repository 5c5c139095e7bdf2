"""Shared by the pass tests: save a rewritten graph, fully check it, and open it in ONNX Runtime as the
numerical reference (ORT_ENABLE_BASIC, so ORT does not rewrite the graph itself)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort


def checked_session(model: ir.Model, path: Path) -> ort.InferenceSession:
    ir.save(model, path, external_data=path.name + ".data")
    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
