"""Load Hugging Face checkpoints (a model directory or a GGUF file) as fp32 torch models.

Also extracts ModelFacts from a transformers config and writes the tokenizer files an artifact ships.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from twophase.compiler.errors import UnsupportedModelError
from twophase.compiler.manifest import ModelFacts

log = logging.getLogger(__name__)

# Architectures whose HF modeling code exports through FlatKVDecoder into the canonical graph
# (rotary decoder blocks with GQA and a DynamicCache); each is covered by a parity test.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, (list, tuple)):
        return tuple(int(t) for t in x)
    return (int(x),)


def facts_from_config(config: Any, generation_config: Any = None) -> ModelFacts:
    """ModelFacts from a transformers PretrainedConfig; refuses unsupported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; twophase exports {list(SUPPORTED_MODEL_TYPES)}. "
            "Export the model to ONNX with Hugging Face names yourself and compile the .onnx file."
        )
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    eos = _as_tuple(getattr(generation_config, "eos_token_id", None)) or _as_tuple(config.eos_token_id)
    bos = getattr(generation_config, "bos_token_id", None)
    if bos is None:
        bos = config.bos_token_id
    return ModelFacts(
        architecture=model_type,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        num_heads=num_heads,
        hidden_size=config.hidden_size,
        rope_theta=float(rope_theta) if rope_theta is not None else None,
        bos_token_id=bos,
        eos_token_ids=eos,
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def load_causal_lm(path: str | Path, gguf_file: str | None = None):
    """Load an fp32 causal LM and its tokenizer (None for a directory without one) from an HF directory
    (or a GGUF file inside `path`).

    A GGUF checkpoint is dequantized to fp32 by transformers; its GGUF quantizer is detached so the
    model behaves like any fp32 model afterwards.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    path = str(path)
    config = AutoConfig.from_pretrained(path, **kwargs)
    facts_from_config(config)  # refuse unsupported architectures before loading weights
    log.info("loading %s%s", path, f" ({gguf_file})" if gguf_file else "")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    has_tokenizer = gguf_file or any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs) if has_tokenizer else None  # None: token ids only
    model.eval()
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tokenizer


def save_tokenizer_files(tokenizer: Any, out_dir: str | Path) -> dict[str, Any]:
    """Write tokenizer.json (+ chat_template.jinja) and return the manifest's `tokenizer` entry."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"tokenizer {type(tokenizer).__name__} has no tokenizer.json (fast tokenizer); "
            "twophase's runtime needs one"
        )
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    entry: dict[str, Any] = {"file": "tokenizer.json", "chat_template_file": None}
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        (out_dir / "chat_template.jinja").write_text(template)
        entry["chat_template_file"] = "chat_template.jinja"
    entry["special_tokens"] = {
        k: v for k, v in {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
        }.items() if isinstance(v, str)
    }
    return entry
