"""The evaluation corpus and its windows: the documented formulas, and calibration windows that
never share a token with an evaluation window."""

from __future__ import annotations

import numpy as np
import pytest

from twophase.compiler import corpus

# Token count of the default corpus under SmolLM2's tokenizer with CPython 3.11.7's pydoc_data
# (checked on the real tokenizer by tests/compiler/test_evaluate.py's slow test); here just a size.
SMOLLM2_TOKENS = 113_108


def _overlaps(a_starts, a_len, b_starts, b_len) -> bool:
    a = np.asarray(a_starts)[:, None]
    b = np.asarray(b_starts)[None, :]
    return bool(np.any((a < b + b_len) & (b < a + a_len)))


def test_corpus_text_is_the_joined_topics():
    from pydoc_data import topics

    text = corpus.corpus_text()
    assert text == "\n\n".join(topics.topics.values())
    assert len(text) > 100_000
    assert len(corpus.corpus_sha256()) == 64 and corpus.corpus_sha256() == corpus.corpus_sha256()


def test_eval_starts_formula():
    starts = corpus.eval_starts(SMOLLM2_TOKENS, 20, 512)
    assert starts.dtype == np.int64 and starts.shape == (20,)
    assert starts[0] == 0 and starts[-1] == SMOLLM2_TOKENS - 512
    np.testing.assert_array_equal(starts, np.linspace(0, SMOLLM2_TOKENS - 512, 20).astype(int))
    assert np.all(np.diff(starts) >= 512)  # the default windows do not overlap each other


def test_eval_windows_slices_ids():
    ids = np.arange(1000, dtype=np.int64)
    w = corpus.eval_windows(ids, 5, 100)
    assert w.shape == (5, 100) and w.dtype == np.int64
    for row, s in zip(w, corpus.eval_starts(1000, 5, 100)):
        np.testing.assert_array_equal(row, ids[s : s + 100])


@pytest.mark.parametrize(
    "num_tokens, n, length, eval_n, eval_length",
    [
        (SMOLLM2_TOKENS, 16, 512, 20, 512),  # the compiler's default
        (SMOLLM2_TOKENS, 1, 512, 20, 512),
        (SMOLLM2_TOKENS, 19, 512, 20, 512),  # one per gap
        (SMOLLM2_TOKENS, 128, 512, 20, 512),  # several per gap
        (SMOLLM2_TOKENS, 64, 2048, 20, 512),
        (SMOLLM2_TOKENS, 16, 512, 40, 1024),
        (5000, 7, 64, 6, 300),
    ],
)
def test_calibration_windows_disjoint_from_eval(num_tokens, n, length, eval_n, eval_length):
    ev = corpus.eval_starts(num_tokens, eval_n, eval_length)
    cal = corpus.calibration_starts(num_tokens, n, length, eval_n=eval_n, eval_length=eval_length)
    assert cal.shape == (n,) and cal.dtype == np.int64
    assert np.all(cal >= 0) and np.all(cal + length <= num_tokens)
    assert not _overlaps(cal, length, ev, eval_length)


def test_calibration_one_per_gap_sits_midway():
    ev = corpus.eval_starts(SMOLLM2_TOKENS, 20, 512)
    cal = corpus.calibration_starts(SMOLLM2_TOKENS, 19, 512)
    gap_start, gap_end = ev[:-1] + 512, ev[1:]
    centre = cal + 256
    assert np.all(np.abs(centre - (gap_start + gap_end) / 2) <= 1)


def test_default_calibration_windows_spread_and_do_not_overlap():
    cal = corpus.calibration_starts(SMOLLM2_TOKENS, 16, 512)
    assert np.all(np.diff(cal) >= 512)  # ascending, no two calibration windows overlap
    assert cal[0] < SMOLLM2_TOKENS / 10 and cal[-1] > SMOLLM2_TOKENS * 0.8  # spread over the whole text


def test_calibration_windows_slice_ids():
    ids = np.arange(5000, dtype=np.int64) * 3
    w = corpus.calibration_windows(ids, 4, 64, eval_n=6, eval_length=300)
    starts = corpus.calibration_starts(5000, 4, 64, eval_n=6, eval_length=300)
    for row, s in zip(w, starts):
        np.testing.assert_array_equal(row, ids[s : s + 64])


def test_window_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not fit a corpus"):
        corpus.eval_starts(100, 2, 512)
    with pytest.raises(ValueError, match="between evaluation windows"):
        corpus.calibration_starts(2000, 4, 512, eval_n=4, eval_length=512)
    with pytest.raises(ValueError, match="eval_n >= 2"):
        corpus.calibration_starts(2000, 1, 64, eval_n=1)
    with pytest.raises(ValueError, match="n >= 1"):
        corpus.eval_starts(2000, 0, 64)


def test_corpus_ids_with_a_tokenizer(tiny_hf_dir):
    hf_dir, _ = tiny_hf_dir("gqa")
    ids = corpus.corpus_ids(hf_dir / "tokenizer.json")
    assert ids.dtype == np.int64 and ids.ndim == 1 and ids.size > 100_000
    assert ids.min() >= 0 and ids.max() < 97
    # no special tokens added: the text does not start with <s> (id 1)
    assert ids[0] != 1
    win = corpus.default_calibration_windows(hf_dir / "tokenizer.json", n=3, length=64)
    assert win.shape == (3, 64)

