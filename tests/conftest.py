"""Shared fixtures: tiny random decoders as HF directories, canonical ONNX exports and compiled
artifacts, each built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY_CONFIGS, save_tiny_hf_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Factory: config name -> (HF directory, the torch model). Cached per session."""
    cache: dict[str, tuple[Path, object]] = {}

    def make(name: str = "gqa"):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"hf-{name}")
            model = save_tiny_hf_dir(d, name)
            cache[name] = (d, model)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def canonical_onnx(tmp_path_factory, tiny_hf_dir):
    """Factory: config name -> path of the canonical ONNX export of that tiny model. Cached per session."""
    from twophase.models.export import export_canonical
    from twophase.models.hf import facts_from_config

    cache: dict[str, Path] = {}

    def make(name: str = "gqa") -> Path:
        if name not in cache:
            _, model = tiny_hf_dir(name)
            facts = facts_from_config(model.config, model.generation_config)
            path = tmp_path_factory.mktemp(f"onnx-{name}") / "model.onnx"
            export_canonical(model, facts, path)
            cache[name] = path
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_hf_dir):
    """Factory: config name -> compiled fp32 ORT artifact directory of that tiny model."""
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import CompileOptions

    cache: dict[str, Path] = {}

    def make(name: str = "gqa") -> Path:
        if name not in cache:
            hf_dir, _ = tiny_hf_dir(name)
            out = tmp_path_factory.mktemp(f"art-{name}") / "artifact"
            compile_model(str(hf_dir), out, CompileOptions())
            cache[name] = out
        return cache[name]

    return make


ALL_TINY = sorted(TINY_CONFIGS)
