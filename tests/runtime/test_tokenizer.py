"""Tokenizer wrapper: encode/decode parity, chat templates rendered as transformers renders them,
and the streaming detokenizer reproducing a full decode exactly (Metaspace, ByteLevel, byte fallback)."""

from __future__ import annotations

import pytest
from tiny import CHAT_TEMPLATE, tiny_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from twophase.runtime.tokenizer import REPLACEMENT_CHAR, ChatTemplateError, Tokenizer

TEXTS = [
    "Hello world, this is a test.",
    "  leading spaces and   runs of spaces ",
    "naïve café — déjà vu ✓",
    "数学 and 日本語のテキスト 🙂👍🏽 mixed",
    "emoji only: 🧪🧬🦀",
    "",
]

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.fixture(scope="module")
def hf_tiny():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(hf_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    hf_tiny.backend_tokenizer.save(str(d / "tokenizer.json"))
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return Tokenizer.from_file(d / "tokenizer.json", d / "chat_template.jinja", SPECIAL)


def bytelevel_tokenizer() -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on multilingual text: multi-byte chars split across tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(["hello world the quick brown fox", "数学 数学 日本", "café déjà"] * 20, trainer)
    return Tokenizer(tok, special_tokens={"eos_token": "<|endoftext|>"})


def bytefallback_tokenizer() -> Tokenizer:
    """A Llama/sentencepiece style tokenizer: Metaspace normalizer, <0xNN> byte fallback, Fuse, Strip."""
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    vocab += ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(",.!?") + ["he"]
    tok = HFTokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=[("h", "e")],
            unk_token="<unk>",
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return Tokenizer(tok)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_encode_decode_match_transformers(tiny, hf_tiny):
    for text in ("hello world", "Hi there, friend!", "x"):
        assert tiny.encode(text) == hf_tiny.encode(text)
        assert tiny.encode(text, add_special_tokens=False) == hf_tiny.encode(text, add_special_tokens=False)
        ids = tiny.encode(text)
        assert tiny.decode(ids) == hf_tiny.decode(ids, skip_special_tokens=True)
    assert tiny.vocab_size == 97
    assert tiny.token_to_id("</s>") == 2


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny, hf_tiny, add_generation_prompt):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    ours = tiny.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    ids = tiny.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == tiny.encode(ours, add_special_tokens=False)


RICH_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- bos_token }}
{%- endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    <|{{ m['role'] }}|>
    {% generation %}{{ m['content'] | tojson }}{% endgeneration %}
    {% if loop.last and m.get('name') is none %}[no name]{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>{{ eos_token if false else '' }}
{% endif %}
"""


def test_rich_template_matches_transformers(hf_tiny):
    """trim_blocks / lstrip_blocks whitespace, tojson without HTML escaping, bos_token, generation tags."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=hf_tiny.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    hf.chat_template = RICH_TEMPLATE
    ours = Tokenizer(hf_tiny.backend_tokenizer, RICH_TEMPLATE, SPECIAL)
    messages = [
        {"role": "system", "content": 'quotes " and <tags> & ünïcode'},
        {"role": "user", "content": "hi", "name": None},
    ]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert "<tags>" in expected and "ünïcode" in expected  # not escaped
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_chat_template(hf_tiny):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(hf_tiny.backend_tokenizer).apply_chat_template([{"role": "user", "content": "x"}])


def test_special_tokens_as_added_token_dicts(hf_tiny):
    t = Tokenizer(hf_tiny.backend_tokenizer, "{{ bos_token }}|{{ eos_token }}", {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "x": None})
    assert t.apply_chat_template([]) == "<s>|</s>"


@pytest.mark.parametrize("make", ["metaspace", "bytelevel", "bytefallback"])
def test_streaming_reproduces_full_decode(make, tiny):
    tok = {"metaspace": lambda: tiny, "bytelevel": bytelevel_tokenizer, "bytefallback": bytefallback_tokenizer}[make]()
    texts = TEXTS if make != "metaspace" else ["hello world", "  two  spaces", "Hi, X-ray 42!"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), (make, text, pieces)
        for p in pieces[:-1]:
            assert not p.endswith(REPLACEMENT_CHAR), (make, text, pieces)


def test_bytelevel_really_splits_characters():
    """The test above is only meaningful if some character spans several tokens: check that it does."""
    tok = bytelevel_tokenizer()
    ids = tok.encode("🧪🧬🦀", add_special_tokens=False)
    assert len(ids) > 3
    pieces = stream(tok, ids)
    assert "" in pieces  # a partial character was held back at least once
    assert "".join(pieces) == "🧪🧬🦀"


def test_bytefallback_splits_characters():
    tok = bytefallback_tokenizer()
    ids = tok.encode("a 数", add_special_tokens=False)
    assert len(ids) >= 5  # ▁ a ▁ + three <0xNN> bytes
    pieces = stream(tok, ids)
    assert "".join(pieces) == "a 数" and "" in pieces


def test_streaming_skips_special_tokens(tiny):
    ids = tiny.encode("hi there", add_special_tokens=False)
    eos = tiny.token_to_id("</s>")
    assert "".join(stream(tiny, [*ids, eos, *ids])) == tiny.decode([*ids, eos, *ids])


def test_invalid_bytes_flushed_at_end():
    """A sequence that never completes a character is emitted (as U+FFFD) by flush, like a full decode."""
    tok = bytelevel_tokenizer()
    full = tok.encode("数", add_special_tokens=False)
    if len(full) < 2:
        pytest.skip("character is a single token in this vocabulary")
    ids = full[:-1]
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and pieces[-1].endswith(REPLACEMENT_CHAR)


def test_bad_tokenizer_file(tmp_path):
    from twophase.compiler.errors import ArtifactError

    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        Tokenizer.from_file(p)
