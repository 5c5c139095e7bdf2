"""KVCache ("grow" binding): ownership of present tensors, mask and position bookkeeping, errors."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.compiler.manifest import ModelFacts
from twophase.runtime.kv_cache import BoundKVCache, KVCache, make_kv_cache

L, H, D = 2, 3, 4


def present(b: int, t: int, fill: float = 0.0) -> dict[str, np.ndarray]:
    return {
        f"present.{i}.{kv}": np.full((b, H, t, D), fill + i + (0.5 if kv == "value" else 0), dtype=np.float32)
        for i in range(L)
        for kv in ("key", "value")
    }


def test_prefill_then_decode_steps():
    cache = KVCache(L, H, D, max_len=16)
    assert cache.batch_size == 0 and cache.length == 0
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    step = present(2, 5)
    cache.update(step, new_mask=mask)
    assert cache.batch_size == 2 and cache.length == 5
    np.testing.assert_array_equal(cache.attention_mask, mask)
    feeds = cache.feeds()
    assert list(feeds) == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert feeds["past_key_values.1.value"] is step["present.1.value"]  # no copy
    # The next token's position per row = real tokens so far.
    np.testing.assert_array_equal(cache.next_position_ids(), [[3], [5]])
    np.testing.assert_array_equal(cache.next_attention_mask(), np.concatenate([mask, np.ones((2, 1), int)], axis=1))
    cache.update(present(2, 6, fill=10.0))
    assert cache.length == 6
    np.testing.assert_array_equal(cache.next_position_ids(), [[4], [6]])
    k, v = cache.layer(1)
    assert k.shape == (2, H, 6, D) and k[0, 0, 0, 0] == 11.0 and v[0, 0, 0, 0] == 11.5


def test_position_ids_match_cumsum_rule():
    """Positions fed step by step equal clip(cumsum(mask) - 1, 0) over the whole sequence."""
    cache = KVCache(L, H, D, max_len=16)
    mask = np.array([[0, 0, 0, 1], [0, 1, 1, 1]])
    cache.update(present(2, 4), new_mask=mask)
    positions = []
    for t in range(5, 8):
        positions.append(cache.next_position_ids()[:, 0])
        full_mask = cache.next_attention_mask()
        cache.update(present(2, t))
    expected = np.clip(np.cumsum(full_mask, axis=1) - 1, 0, None)[:, 4:]
    np.testing.assert_array_equal(np.stack(positions, axis=1), expected)


def test_list_input_and_reset():
    cache = KVCache(L, H, D, max_len=8)
    cache.update(list(present(1, 3).values()))
    assert cache.length == 3 and cache.batch_size == 1
    np.testing.assert_array_equal(cache.attention_mask, [[1, 1, 1]])
    cache.reset()
    assert cache.length == 0 and cache.batch_size == 0
    with pytest.raises(TwophaseError, match="prefill first"):
        cache.feeds()
    cache.update(present(3, 2))  # a new batch size after reset
    assert cache.batch_size == 3


def test_max_len_enforced():
    cache = KVCache(L, H, D, max_len=4)
    cache.update(present(1, 4))
    with pytest.raises(ContextLengthError, match="max_len is 4"):
        cache.next_attention_mask()
    with pytest.raises(ContextLengthError):
        cache.update(present(1, 5))


def test_shape_errors():
    cache = KVCache(L, H, D, max_len=8)
    bad = present(1, 3)
    bad["present.1.key"] = np.zeros((1, H + 1, 3, D), np.float32)
    with pytest.raises(ArtifactError, match="present.1.key"):
        cache.update(bad)
    with pytest.raises(ArtifactError, match="present.0.value"):
        cache.update({"present.0.key": np.zeros((1, H, 3, D), np.float32)})
    cache.update(present(1, 3))
    with pytest.raises(ArtifactError, match="does not extend"):
        cache.update(present(1, 3))  # no new positions
    with pytest.raises(TwophaseError, match="batch"):
        cache.update(present(2, 4))
    with pytest.raises(TwophaseError, match="new_mask"):
        KVCache(L, H, D, max_len=8).update(present(1, 2), new_mask=np.ones((1, 3)))


def test_make_kv_cache_from_facts():
    facts = ModelFacts("llama", num_layers=L, num_kv_heads=H, head_dim=D, vocab_size=10, max_position_embeddings=32)
    cache = make_kv_cache("grow", facts, max_len=32)
    assert isinstance(cache, KVCache) and cache.max_len == 32 and cache.num_layers == L
    assert isinstance(make_kv_cache("bound", facts, max_len=32), BoundKVCache)
    with pytest.raises(ArtifactError, match="paged"):
        make_kv_cache("paged", facts, max_len=32)
