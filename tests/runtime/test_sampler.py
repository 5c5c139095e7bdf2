"""Sampler: greedy, seeded sampling, exact top-k / top-p masks, repetition penalty, parameter validation."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.compiler.errors import TwophaseError
from twophase.runtime.sampler import (
    Sampler,
    SamplingParams,
    SamplingParamsError,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    seen_mask,
    softmax,
)

# A hand-made distribution over 6 tokens: probabilities 0.4, 0.3, 0.15, 0.1, 0.05, 0.0 (shuffled ids).
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15, 1e-12])
LOGITS = np.log(PROBS).astype(np.float32)[None, :]  # (1, 6); token ranking: 1, 3, 4, 0, 2, 5


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 1000)).astype(np.float32)
    out = Sampler(SamplingParams()).sample(logits)
    assert out.dtype == np.int64 and out.shape == (4,)
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_seed_reproducible_and_seeds_differ():
    logits = np.zeros((3, 50), dtype=np.float32)
    p = SamplingParams(temperature=1.0, seed=123)
    a = np.stack([Sampler(p).sample(logits) for _ in range(2)])
    np.testing.assert_array_equal(a[0], a[1])
    s1, s2 = Sampler(p), Sampler(SamplingParams(temperature=1.0, seed=124))
    draws1 = np.concatenate([s1.sample(logits) for _ in range(10)])
    draws2 = np.concatenate([s2.sample(logits) for _ in range(10)])
    assert not np.array_equal(draws1, draws2)


def test_top_k_mask_exact():
    out = apply_top_k(LOGITS, 3)
    np.testing.assert_array_equal(np.isfinite(out[0]), [False, True, False, True, True, False])
    np.testing.assert_array_equal(out[0][np.isfinite(out[0])], LOGITS[0][[1, 3, 4]])
    assert apply_top_k(LOGITS, 0) is LOGITS and apply_top_k(LOGITS, 6) is LOGITS


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.isfinite(apply_top_k(logits, 2)[0]), [False, True, True, True, False])


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.35, [1]),  # the top token alone (0.4) reaches p
        (0.45, [1, 3]),
        (0.65, [1, 3]),  # 0.4 + 0.3
        (0.75, [1, 3, 4]),  # + 0.15
        (0.84, [1, 3, 4]),
        (0.9, [0, 1, 3, 4]),  # + 0.1
        (0.97, [0, 1, 2, 3, 4]),  # + 0.05
        (1.0, [0, 1, 2, 3, 4, 5]),  # off
    ],
)
def test_top_p_mask_exact(p, kept):
    out = apply_top_p(LOGITS, p)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(out[0])), kept)
    np.testing.assert_array_equal(out[0][kept], LOGITS[0][kept])


def test_top_p_matches_hf_semantics():
    """Same kept sets as transformers' TopPLogitsWarper on random rows."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopPLogitsWarper

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((8, 300)) * 3).astype(np.float32)
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = np.isfinite(apply_top_p(logits, p))
        theirs = torch.isfinite(TopPLogitsWarper(p)(None, torch.from_numpy(logits))).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_sampling_respects_masks():
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    draws = np.concatenate([s.sample(np.repeat(LOGITS, 64, axis=0)) for _ in range(4)])
    assert set(draws.tolist()) == {1, 3}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    draws = np.concatenate([s.sample(np.repeat(LOGITS, 64, axis=0)) for _ in range(8)])
    assert set(draws.tolist()) == {1, 3, 4}


def test_sampling_frequencies_follow_probs():
    s = Sampler(SamplingParams(temperature=1.0, seed=7))
    draws = s.sample(np.repeat(LOGITS, 20000, axis=0))
    freq = np.bincount(draws, minlength=6) / draws.size
    np.testing.assert_allclose(freq, PROBS, atol=0.015)


def test_temperature_sharpens():
    s = Sampler(SamplingParams(temperature=0.5))
    expected = softmax(LOGITS / 0.5)
    np.testing.assert_allclose(s.probs(LOGITS), expected, rtol=1e-6)
    assert expected[0, 1] > PROBS[1]


def test_repetition_penalty_hf_semantics():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], dtype=np.float32)
    seen = seen_mask(np.array([[0, 1]]), 4)
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0]])
    # Greedy flips once the penalty pushes the seen top token below the next one.
    s = Sampler(SamplingParams(repetition_penalty=3.0))
    assert s.sample(logits)[0] == 0  # no seen mask given: no penalty
    assert s.sample(logits, seen)[0] == 2


def test_repetition_penalty_matches_hf():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 40)).astype(np.float32)
    ids = rng.integers(0, 40, size=(3, 9))
    ours = apply_repetition_penalty(logits, seen_mask(ids, 40), 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_seen_mask_ignores_padding():
    m = seen_mask(np.array([[5, 5, 1], [0, 2, 3]]), 6, attention_mask=np.array([[1, 1, 1], [0, 1, 1]]))
    np.testing.assert_array_equal(np.flatnonzero(m[0]), [1, 5])
    np.testing.assert_array_equal(np.flatnonzero(m[1]), [2, 3])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(stop_token_ids=["x"]), "stop_token_ids"),
        (dict(seed="abc"), "seed"),
    ],
)
def test_invalid_params(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TwophaseError)


def test_params_normalized():
    p = SamplingParams(stop_token_ids=[3, np.int64(4)], top_k=np.int32(5))
    assert p.stop_token_ids == (3, 4) and type(p.top_k) is int and p.greedy and not p.uses_penalty
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
