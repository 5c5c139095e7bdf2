"""Tiny random-weight decoders built in-process, and their canonical ONNX exports (cached per session)."""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    # name: LlamaConfig kwargs
    "gqa": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2),
    "mha": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "odd": dict(hidden_size=42, intermediate_size=70, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1),
    # head_dim 16: ORT's GroupQueryAttention (the bound KV cache) needs a multiple of 16; the configs
    # above (head_dim 8 and 14) compile to the "grow" binding.
    "gqa16": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mha16": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
}


def tiny_llama(name: str = "gqa", vocab_size: int = 97, seed: int = 0, tie: bool = True, max_positions: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
        **TINY_CONFIGS[name],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; scale up so greedy tokens are well separated.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 97):
    """A character-level fast tokenizer (Metaspace, no merges) that fits a tiny model's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list("0123456789.,!?'-:")
    tokens = ["<unk>", "<s>", "</s>"] + chars
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    assert len(tokens) == vocab_size
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_hf_dir(path, name: str = "gqa", **kwargs):
    """A Hugging Face model directory (config, safetensors, tokenizer) of a tiny random Llama."""
    model = tiny_llama(name, **kwargs)
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return model
