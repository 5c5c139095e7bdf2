"""Stand-in for "another tool": export an HF causal LM with the legacy TorchScript ONNX exporter.

The graph has Hugging Face / Optimum names and layout (opset 17 by default, dynamic axes by name,
weights in `<name>_data` beside it as Optimum writes them, config.json + generation_config.json in the
same directory), so `twophase.models.importer.import_onnx` sees what a third-party export looks like.
Flags produce the shapes of export that the importer must refuse (no KV cache, no position_ids).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class _LegacyDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask[, position_ids][, *past]) -> logits[, *present]."""

    def __init__(self, model: torch.nn.Module, num_layers: int, with_past: bool, position_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.with_past = with_past
        self.position_ids = position_ids

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids = rest[0] if self.position_ids else None
        past = rest[1:] if self.position_ids else rest
        kwargs = {}
        if self.with_past:
            cache = DynamicCache(config=self.model.config)
            for i in range(self.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            kwargs["cache"] = cache
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=self.with_past, **kwargs,
        )
        if not self.with_past:
            return out.logits
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of an HF causal LM config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def sample_inputs(
    model: torch.nn.Module, batch: int, past: int, seq: int, *, seed: int = 0, pad_row: int | None = None
) -> dict[str, torch.Tensor]:
    """Inputs by graph name; `pad_row` gets two left-padding positions (positions = cumsum(mask) - 1)."""
    num_layers, kv_heads, head_dim = kv_shape(model)
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if pad_row is not None:
        mask[pad_row, :2] = 0
    feeds = {
        "input_ids": torch.randint(0, model.config.vocab_size, (batch, seq), generator=g),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)[:, past:].contiguous(),
    }
    for i in range(num_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = torch.randn(batch, kv_heads, past, head_dim, generator=g)
    return feeds


def export_legacy(
    model: torch.nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    with_past: bool = True,
    position_ids: bool = True,
    external_data: bool = True,
    write_config: bool = True,
) -> Path:
    """Export `model` (an eval-mode fp32 HF causal LM) at `path` the way a third-party tool would.

    Traced at batch 2, past 5, seq 7 with one left-padded row, so no size 0/1 and no all-ones mask
    gets baked into the trace. Returns `path`.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    num_layers = kv_shape(model)[0]
    feeds = sample_inputs(model, batch=2, past=5 if with_past else 0, seq=7, pad_row=1)
    names_in = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    if with_past:
        names_in += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    names_out = ["logits"]
    if with_past:
        names_out += [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    tokens = {0: "batch_size", 1: "sequence_length"}
    total = "past_sequence_length + sequence_length" if with_past else "sequence_length"
    axes = {"input_ids": tokens, "position_ids": tokens, "logits": tokens}
    axes["attention_mask"] = {0: "batch_size", 1: total}
    for name in names_in[2:]:
        if name.startswith("past_key_values."):
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names_out[1:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    axes = {k: v for k, v in axes.items() if k in names_in or k in names_out}

    wrapper = _LegacyDecoder(model, num_layers, with_past, position_ids)
    log.info("legacy TorchScript export of %s to %s (opset %d)", type(model).__name__, path, opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            wrapper, tuple(feeds[n] for n in names_in), str(path), input_names=names_in, output_names=names_out,
            dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    if external_data:
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    if write_config:
        model.config.save_pretrained(path.parent)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(path.parent)
    return path
