"""Export a Hugging Face causal LM to the canonical ONNX decoder graph (see DESIGN.md).

A thin wrapper takes and returns flat K/V tensors, so no Cache object reaches the exporter:

    forward(input_ids[B,S], attention_mask[B,P+S], position_ids[B,S], *past[2L x (B,Hkv,P,D)])
        -> logits[B,S,V], *present[2L x (B,Hkv,P+S,D)]

`torch.onnx.export(dynamo=True)` at opset 23 yields standard RMSNormalization, RotaryEmbedding and
Attention ops. A tied lm_head is untied (copied) before export so the graph carries it as its own
initializer instead of Transpose(embedding).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from twophase.compiler.manifest import ModelFacts

log = logging.getLogger(__name__)

CANONICAL_OPSET = 23


class FlatKVDecoder(torch.nn.Module):
    """Wraps a causal LM so that its past/present K/V are plain positional tensors."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give the lm_head its own parameter so the exporter writes it as a real initializer."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)


def example_inputs(facts: ModelFacts, batch: int = 2, seq: int = 7, past: int = 5) -> tuple[torch.Tensor, ...]:
    """Sample inputs with every dynamic dim >= 2 (0/1 would be specialized by torch.export)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, facts.vocab_size, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    position_ids = torch.arange(past, past + seq, dtype=torch.int64)[None].expand(batch, seq).contiguous()
    kv = [
        torch.randn(batch, facts.num_kv_heads, past, facts.head_dim, generator=g)
        for _ in range(2 * facts.num_layers)
    ]
    return (input_ids, attention_mask, position_ids, *kv)


def export_canonical(model: torch.nn.Module, facts: ModelFacts, path: str | Path) -> Path:
    """Export `model` (an eval-mode fp32 HF causal LM) to the canonical graph at `path`.

    Weights go to an external data file beside it (`<name>.data`). Returns `path`.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise ValueError(f"export_canonical expects an fp32 model; parameter {name} is {param.dtype}")
    untie_lm_head(model)
    wrapper = FlatKVDecoder(model, facts.num_layers).eval()

    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    past = torch.export.Dim("past")
    total = torch.export.Dim("total")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * facts.num_layers)),
    }
    input_names = ["input_ids", "attention_mask", "position_ids", *facts.kv_names("past_key_values")]
    output_names = ["logits", *facts.kv_names("present")]
    log.info("exporting %s (%d layers) with torch.onnx dynamo, opset %d", facts.architecture, facts.num_layers, CANONICAL_OPSET)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            example_inputs(facts),
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=CANONICAL_OPSET,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in facts.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return path
