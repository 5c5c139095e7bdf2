"""The Engine on bound-KV artifacts (BindKVCachePass + I/O binding): same tokens and logits as the grow
binding, batches of different lengths row by row, chunked prefill, capacity growth, the context limit,
and no memory growth per decode step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twophase.compiler.driver import compile_model
from twophase.compiler.errors import ContextLengthError
from twophase.compiler.options import CompileOptions, KVBinding
from twophase.runtime.engine import Engine
from twophase.runtime.kv_cache import BoundKVCache, KVCache

PROMPTS = [[1, 5, 9, 12, 40, 7, 3, 22], [1, 30], [1, 8, 8, 60, 2 + 40]]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """config -> (bound artifact, grow artifact) of a tiny model with a 600-token context."""
    from tiny import save_tiny_hf_dir

    cache = {}

    def make(name="gqa16"):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"bound-{name}")
            save_tiny_hf_dir(root / "hf", name, max_positions=600)
            bound = compile_model(str(root / "hf"), root / "bound", CompileOptions())
            grow = compile_model(str(root / "hf"), root / "grow", CompileOptions(kv_binding=KVBinding.GROW))
            cache[name] = (bound, grow)
        return cache[name]

    return make


@pytest.mark.parametrize("name", ["gqa16", "mha16"])
def test_bound_artifact_generates_what_grow_generates(artifacts, name):
    bound_dir, grow_dir = artifacts(name)
    manifest = json.loads((bound_dir / "manifest.json").read_text())
    assert manifest["kv_cache"]["binding"] == "bound" and manifest["kv_cache"]["max_len"] == 600
    assert json.loads((grow_dir / "manifest.json").read_text())["kv_cache"]["binding"] == "grow"
    bound, grow = Engine.load(bound_dir), Engine.load(grow_dir)
    assert isinstance(bound.cache, BoundKVCache) and isinstance(grow.cache, KVCache)
    for p in PROMPTS:
        assert list(bound.generate_ids(p, max_new_tokens=12)) == list(grow.generate_ids(p, max_new_tokens=12))


def test_batch_logits_match_grow_left_padded(artifacts):
    bound, grow = (Engine.load(d) for d in artifacts("gqa16"))
    S = max(len(p) for p in PROMPTS)
    ids = np.zeros((len(PROMPTS), S), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, S - len(p):], mask[b, S - len(p):] = p, 1
    a, g = bound.prefill(ids, mask), grow.prefill(ids, mask)
    np.testing.assert_allclose(a, g, atol=1e-4, rtol=1e-4)
    for step in range(3):
        tokens = g.argmax(-1)
        a, g = bound.decode_one_token(tokens), grow.decode_one_token(tokens)
        np.testing.assert_allclose(a, g, atol=1e-4, rtol=1e-4)
    assert bound.cache.lengths.tolist() == [len(p) + 3 for p in PROMPTS]


@pytest.mark.parametrize("binding", ["bound", "grow"])
def test_batch_rows_give_their_tokens_alone(artifacts, binding):
    engine = Engine.load(artifacts("gqa16")[0 if binding == "bound" else 1])
    alone = [list(engine.generate_ids(p, max_new_tokens=10)) for p in PROMPTS]
    assert engine.generate_batch_ids(PROMPTS, max_new_tokens=10) == alone
    # sampling: each row has its own sampler with the seed, so rows match too
    alone = [list(engine.generate_ids(p, max_new_tokens=6, temperature=0.8, seed=3)) for p in PROMPTS]
    assert engine.generate_batch_ids(PROMPTS, max_new_tokens=6, temperature=0.8, seed=3) == alone


def test_stopped_rows_stay_idle(artifacts):
    engine = Engine.load(artifacts("gqa16")[0])
    first = list(engine.generate_ids(PROMPTS[0], max_new_tokens=8))
    stop = first[2]
    out = engine.generate_batch_ids(PROMPTS[:2], max_new_tokens=8, stop_token_ids=[stop])
    assert out[0] == first[: first.index(stop) + 1]
    assert engine.cache.lengths[0] == len(PROMPTS[0]) + len(out[0]) - 1  # no step after its stop


def test_chunked_prefill_matches_one_step(artifacts):
    engine = Engine.load(artifacts("gqa16")[0])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, (2, 50))
    mask = np.ones_like(ids)
    mask[1, :13] = 0
    whole = engine.prefill(ids, mask)
    engine.prefill_chunk = 7
    calls = engine.prefill_phase.calls
    chunked = engine.prefill(ids, mask)
    assert engine.prefill_phase.calls - calls == 8  # ceil(50 / 7) steps
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(engine.decode_one_token(whole.argmax(-1)),
                               Engine.load(artifacts("gqa16")[1]).prefill(
                                   np.concatenate([ids, whole.argmax(-1)[:, None]], 1),
                                   np.concatenate([mask, np.ones((2, 1), np.int64)], 1)),
                               atol=1e-4, rtol=1e-4)


def test_capacity_grows_by_doubling_and_keeps_the_cache(artifacts):
    bound, grow = (Engine.load(d) for d in artifacts("gqa16"))
    prompt = np.array([PROMPTS[0]])
    a, g = bound.prefill(prompt), grow.prefill(prompt)  # no reserve: capacity is the minimum
    assert bound.cache.capacity == BoundKVCache.MIN_CAPACITY
    versions = {bound.cache.version}
    for _ in range(150):
        tokens = g.argmax(-1)
        a, g = bound.decode_one_token(tokens), grow.decode_one_token(tokens)
        versions.add(bound.cache.version)
    np.testing.assert_allclose(a, g, atol=1e-4, rtol=1e-4)
    assert bound.cache.capacity == 4 * BoundKVCache.MIN_CAPACITY and len(versions) == 3  # 64 -> 128 -> 256


def test_context_limit_is_checked_before_any_work(artifacts):
    engine = Engine.load(artifacts("gqa16")[0])
    calls = engine.prefill_phase.calls
    with pytest.raises(ContextLengthError, match="600"):
        engine.generate_ids(list(range(3, 90)) * 6, max_new_tokens=80)
    with pytest.raises(ContextLengthError):
        engine.generate_batch_ids([[1, 2], list(range(3, 90)) * 7], max_new_tokens=1)
    assert engine.prefill_phase.calls == calls
    engine.prefill(np.array([list(range(3, 63)) * 10]))  # 600 tokens: the cache is full
    with pytest.raises(ContextLengthError, match="max_len is 600"):
        engine.decode_one_token(np.array([5]))


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_no_memory_growth_over_500_decode_steps(artifacts):
    engine = Engine.load(artifacts("gqa16")[0])
    logits = engine.prefill(np.array([PROMPTS[0]]), reserve=510)
    token = logits.argmax(-1)
    version = engine.cache.version
    for _ in range(50):
        token = engine.decode_one_token(token).argmax(-1)
    before = _rss_bytes()
    for _ in range(450):
        token = engine.decode_one_token(token).argmax(-1)
    growth = _rss_bytes() - before
    assert engine.cache.version == version  # the buffers were never reallocated
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 450 decode steps"


def test_slots_join_and_leave_between_decode_steps(artifacts):
    """Continuous batching: a prompt prefilled into a free slot while another row is mid-generation gives
    exactly the tokens it gives alone, and the running row is not disturbed."""
    engine = Engine.load(artifacts("gqa16")[0])
    alone = [list(engine.generate_ids(p, max_new_tokens=8)) for p in PROMPTS[:2]]
    engine.start_slots(batch=3, capacity=16)
    out = {0: [], 1: []}
    tok = np.zeros(3, np.int64)
    tok[0] = int(engine.prefill_slot(0, PROMPTS[0], reserve=8).argmax())
    out[0].append(int(tok[0]))
    active = np.array([True, False, False])
    for step in range(7):
        if step == 3:  # row 1 joins while row 0 runs
            tok[1] = int(engine.prefill_slot(1, PROMPTS[1], reserve=8).argmax())
            out[1].append(int(tok[1]))
            active[1] = True
        logits = engine.decode_one_token(tok, active=active)
        for b in np.flatnonzero(active):
            tok[b] = int(logits[b].argmax())
            out[b].append(int(tok[b]))
    while len(out[1]) < 8:  # row 0 is done: it idles while row 1 finishes
        active[0] = False
        tok[1] = int(engine.decode_one_token(tok, active=active)[1].argmax())
        out[1].append(int(tok[1]))
    assert out[0] == alone[0] and out[1] == alone[1]
    assert engine.cache.lengths.tolist() == [len(PROMPTS[0]) + 7, len(PROMPTS[1]) + 7, 0]
    with pytest.raises(Exception, match="slot 5"):
        engine.prefill_slot(5, [1, 2])


def test_idle_tail_rows_are_not_computed(artifacts):
    """A step runs only up to the last active row (the cache is batch-major: a contiguous view)."""
    engine = Engine.load(artifacts("gqa16")[0])
    engine.start_slots(batch=4, capacity=16)
    first = engine.prefill_slot(0, PROMPTS[0], reserve=4)
    tok = np.array([int(first.argmax()), 0, 0, 0])
    logits = engine.decode_one_token(tok, active=np.array([True, False, False, False]))
    assert sorted(engine._decode_steps) == [(1, False)] and engine._decode_steps[(1, False)].rows == 1
    assert not logits[1:].any()  # rows past the last active one were not run
    alone = Engine.load(artifacts("gqa16")[0])
    ref = alone.decode_one_token(np.array([int(alone.prefill(np.array([PROMPTS[0]])).argmax())]))
    np.testing.assert_allclose(logits[0], ref[0], atol=1e-4, rtol=1e-4)
    assert engine.cache.lengths.tolist() == [len(PROMPTS[0]) + 1, 0, 0, 0]


def test_large_batches_can_decode_with_the_prefill_graph(artifacts):
    """Opt-in: steps with many active rows run the prefill graph over the same bound cache (same logits here:
    this tiny artifact's two phases are both fp32)."""
    engine = Engine.load(artifacts("gqa16")[0])
    alone = [list(engine.generate_ids(p, max_new_tokens=6)) for p in PROMPTS]
    engine.prefill_graph_from_rows = 2
    calls = engine.prefill_phase.calls
    assert engine.generate_batch_ids(PROMPTS, max_new_tokens=6) == alone
    assert engine.prefill_phase.calls - calls >= 1 + 5  # the prompt, then every decode step
    assert any(uses_prefill for _, uses_prefill in engine._decode_steps)
