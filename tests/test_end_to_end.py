"""Source -> compile -> Engine, checked against the PyTorch model the source came from.

Tiny random-weight decoders (several shapes: GQA, MHA, odd sizes; Llama, Qwen2, Mistral), and a
Llama exported by another tool (the legacy TorchScript exporter) with Hugging Face names.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY_CONFIGS, save_tiny_hf_dir, tiny_tokenizer

from twophase.compiler.driver import compile_model
from twophase.compiler.options import CompileOptions
from twophase.runtime.engine import Engine

EOS = 2
PROMPTS = [[1, 5, 9, 33, 12], [1, 40, 41, 42], [1, 70, 3, 8, 8, 8, 60, 20, 11]]


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new  # the engine yields eos last, then stops


def left_padded_batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_tokens_equal_torch(name, tiny_hf_dir, tiny_artifact):
    _, model = tiny_hf_dir(name)
    engine = Engine.load(tiny_artifact(name))
    for ids in PROMPTS:
        ours = list(engine.generate_ids(ids, max_new_tokens=20))
        assert ours == torch_greedy(model, ids, 20)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_batched_left_padded_logits_match_torch(name, tiny_hf_dir, tiny_artifact):
    _, model = tiny_hf_dir(name)
    engine = Engine.load(tiny_artifact(name))
    ids, mask = left_padded_batch(PROMPTS)
    ours = engine.prefill(ids, mask)  # [B, vocab], last position
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos), use_cache=True)
    np.testing.assert_allclose(ours, out.logits[:, -1].numpy(), atol=1e-3, rtol=1e-3)

    cache, next_ids = out.cache, out.logits[:, -1].argmax(-1)
    for _ in range(3):  # decode steps continue every row from its own length
        ours = engine.decode_one_token(next_ids.numpy())
        mask = np.concatenate([mask, np.ones((len(PROMPTS), 1), np.int64)], axis=1)
        pos = mask.sum(-1, keepdims=True) - 1
        with torch.no_grad():
            out = model(next_ids[:, None], attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                        cache=cache, use_cache=True)
        np.testing.assert_allclose(ours, out.logits[:, -1].numpy(), atol=1e-3, rtol=1e-3)
        cache, next_ids = out.cache, out.logits[:, -1].argmax(-1)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_supported_architectures(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        arch, vocab_size=97, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, **TINY_CONFIGS["gqa"],
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    engine = Engine.load(compile_model(str(tmp_path / "hf"), tmp_path / "art", CompileOptions()))
    assert engine.facts.architecture == arch
    for ids in PROMPTS[:2]:
        ours = list(engine.generate_ids(ids, max_new_tokens=16))
        assert ours == torch_greedy(model, ids, 16)


def test_onnx_from_another_tool_compiles_and_matches_its_torch_source(tmp_path):
    from models.legacy_export import export_legacy

    src = tmp_path / "optimum-like"
    model = save_tiny_hf_dir(src, "gqa", seed=3)  # config.json, tokenizer.json, chat template
    for f in src.glob("*.safetensors"):
        f.unlink()  # only the ONNX graph carries the weights now
    onnx_path = export_legacy(model, src / "model.onnx", opset=17)
    engine = Engine.load(compile_model(str(onnx_path), tmp_path / "art", CompileOptions()))
    assert engine.manifest.source["kind"] == "onnx"
    assert engine.tokenizer is not None
    for ids in PROMPTS:
        ours = list(engine.generate_ids(ids, max_new_tokens=20))
        assert ours == torch_greedy(model, ids, 20)
    text = engine.generate("hi there", chat=True, max_new_tokens=8, stream=False)
    assert isinstance(text, str)
