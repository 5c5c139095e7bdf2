"""Runtime: load an artifact and generate text. Imports neither torch nor transformers (nor onnx)."""

from __future__ import annotations

from twophase.runtime.engine import Engine
from twophase.runtime.kv_cache import KVCache
from twophase.runtime.sampler import Sampler, SamplingParams

__all__ = ["Engine", "KVCache", "Sampler", "SamplingParams"]
