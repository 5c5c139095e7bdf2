"""Llama-shaped models with random weights, for measuring how speed scales with model size.

Speed does not depend on trained values (every weight is read and multiplied all the same), so a
random model of a real shape stands in for one that cannot be downloaded here. Their text is
meaningless: never use them for accuracy. They use SmolLM2's vocabulary size (49152) and carry no
tokenizer: benchmarks feed them token ids.

    materialize("random-llama-1b") -> Path of a Hugging Face model directory (cached)

The directory (config.json + model.safetensors, seed-deterministic, N(0, 0.02) like HF's init) is
written once under the cache dir; `resolve_source` treats these names like any HF directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from twophase.compiler.errors import UnknownSourceError

log = logging.getLogger(__name__)

VOCAB = 49152
SEED = 0

# name: (LlamaConfig kwargs, description)
SYNTHETIC: dict[str, tuple[dict, str]] = {
    "random-llama-0.5b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=4),
        "~0.48B parameters (28 layers, hidden 1024, GQA 16/4 heads), random weights",
    ),
    "random-llama-1b": (
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8),
        "~1.07B parameters (Llama-3.2-1B's shape with a 49152 vocabulary), random weights",
    ),
    # for tests: seconds to export
    "random-llama-tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2),
        "tiny (2 layers, hidden 64) for tests, random weights",
    ),
}


def is_synthetic(name: str) -> bool:
    return name in SYNTHETIC


def config(name: str):
    from transformers import LlamaConfig

    if name not in SYNTHETIC:
        raise UnknownSourceError(f"{name!r} is not a synthetic model; known: {sorted(SYNTHETIC)}")
    kwargs, _ = SYNTHETIC[name]
    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=100000.0,
        **kwargs,
    )


def parameter_count(name: str) -> int:
    cfg = config(name)
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * (2 * h + 2 * kv) + 3 * h * i + 2 * h
    return n * per_layer + VOCAB * h + h


def materialize(name: str, root: Path | None = None) -> Path:
    """The (cached) HF directory of synthetic model `name`."""
    import torch
    from transformers import LlamaForCausalLM

    from twophase.models.zoo import cache_dir

    cfg = config(name)
    out = (root or cache_dir() / "synthetic") / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    log.info("writing %s (%s) to %s", name, SYNTHETIC[name][1], out)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).eval()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out
