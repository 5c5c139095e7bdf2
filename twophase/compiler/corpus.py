"""The evaluation and calibration corpus: fixed, documented token windows of real text.

Corpus. The text is CPython's own help-topic texts, `pydoc_data.topics.topics` (PSF license; the
module ships with every CPython), joined as

    text = "\\n\\n".join(pydoc_data.topics.topics.values())      # dict order, i.e. the file's order

and tokenized with the model's tokenizer.json without special tokens (no BOS is added). With
CPython 3.11.7 and SmolLM2's tokenizer that is 113,108 tokens. The joined topic texts (not the raw
topics.py source, whose Python quoting and escapes are not prose) are what the figure in DESIGN.md
was measured on: SmolLM2-135M fp32 gives PPL 13.8641 on the evaluation windows below. The
corpus changes between CPython releases, so every report records `corpus_sha256()`.

Evaluation windows (`eval_windows(ids, n=20, length=512)`): n windows of `length` tokens starting at

    starts = np.linspace(0, len(ids) - length, n).astype(int)

i.e. evenly spaced, the first at token 0 and the last ending at the last token. Perplexity is
exp(mean negative log-likelihood) over every predicted token of every window (length - 1 per
window, each window scored from its own first token with no earlier context).

Calibration windows (`calibration_windows(ids, n, length, eval_n=20, eval_length=512)`) come from
the G = eval_n - 1 gaps between consecutive evaluation windows, so they never share a token with
an evaluation window. Calibration window j (0 <= j < n) lies in gap g = floor(j * G / n); the m
windows of one gap (rank r = 0..m-1 inside it) start at

    gap_start + floor((gap_len - length) * (r + 1) / (m + 1))

(one window per gap sits midway between two evaluation windows). Windows in one gap overlap each
other only when m * length > gap_len. With the defaults (16 x 512 on 113,108 tokens) the gaps are
about 5,400 tokens long and every calibration window is centred in its own gap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CORPUS_NAME = "pydoc_data.topics"
TOPIC_SEPARATOR = "\n\n"

DEFAULT_EVAL_WINDOWS = 20
DEFAULT_EVAL_LENGTH = 512


@functools.cache
def corpus_text() -> str:
    """The default corpus: CPython's help-topic texts joined with blank lines (see module doc)."""
    from pydoc_data import topics

    return TOPIC_SEPARATOR.join(topics.topics.values())


def corpus_sha256() -> str:
    """sha256 of the corpus text (UTF-8): two reports are comparable only when it agrees."""
    return hashlib.sha256(corpus_text().encode("utf-8")).hexdigest()


def tokenize(text: str, tokenizer_json: str | Path) -> np.ndarray:
    """Token ids (int64, no special tokens) of `text` under the tokenizer in `tokenizer_json`."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def corpus_ids(tokenizer_json: str | Path) -> np.ndarray:
    """The default corpus tokenized with `tokenizer_json` (int64 [T])."""
    ids = tokenize(corpus_text(), tokenizer_json)
    log.debug("corpus %s: %d tokens with %s", CORPUS_NAME, ids.size, tokenizer_json)
    return ids


def _check(num_tokens: int, n: int, length: int, what: str) -> None:
    if n <= 0 or length <= 1:
        raise ValueError(f"{what}: need n >= 1 windows of length >= 2, got n={n}, length={length}")
    if length > num_tokens:
        raise ValueError(f"{what}: windows of {length} tokens do not fit a corpus of {num_tokens} tokens")


def eval_starts(num_tokens: int, n: int = DEFAULT_EVAL_WINDOWS, length: int = DEFAULT_EVAL_LENGTH) -> np.ndarray:
    """Start offsets (int64 [n]) of the evaluation windows: linspace(0, T - length, n) truncated."""
    _check(num_tokens, n, length, "eval windows")
    return np.linspace(0, num_tokens - length, n).astype(int).astype(np.int64)


def eval_windows(ids: np.ndarray, n: int = DEFAULT_EVAL_WINDOWS, length: int = DEFAULT_EVAL_LENGTH) -> np.ndarray:
    """The evaluation windows (int64 [n, length]) of a token sequence (see module doc)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = eval_starts(ids.size, n, length)
    return np.stack([ids[s : s + length] for s in starts])


def calibration_starts(
    num_tokens: int,
    n: int,
    length: int,
    *,
    eval_n: int = DEFAULT_EVAL_WINDOWS,
    eval_length: int = DEFAULT_EVAL_LENGTH,
) -> np.ndarray:
    """Start offsets (int64 [n]) of calibration windows disjoint from every evaluation window."""
    _check(num_tokens, n, length, "calibration windows")
    if eval_n < 2:
        raise ValueError(f"calibration windows live between evaluation windows: need eval_n >= 2, got {eval_n}")
    ev = eval_starts(num_tokens, eval_n, eval_length)
    gap_start = ev[:-1] + eval_length  # (G,) first token after eval window g
    gap_len = ev[1:] - gap_start  # (G,) tokens before eval window g + 1
    G = gap_len.size
    gap_of = (np.arange(n) * G) // n  # (n,) the gap of each calibration window
    starts = np.empty(n, dtype=np.int64)
    for g in np.unique(gap_of):
        members = np.flatnonzero(gap_of == g)
        m = members.size
        if gap_len[g] < length:
            raise ValueError(
                f"calibration windows of {length} tokens do not fit between evaluation windows "
                f"({eval_n} x {eval_length} on {num_tokens} tokens leave gaps of {int(gap_len.min())} tokens); "
                "use fewer or shorter evaluation or calibration windows, or a longer text"
            )
        free = int(gap_len[g]) - length
        for r, j in enumerate(members):
            starts[j] = gap_start[g] + (free * (r + 1)) // (m + 1)
    return starts


def calibration_windows(
    ids: np.ndarray,
    n: int,
    length: int,
    *,
    eval_n: int = DEFAULT_EVAL_WINDOWS,
    eval_length: int = DEFAULT_EVAL_LENGTH,
) -> np.ndarray:
    """Calibration windows (int64 [n, length]) that share no token with the evaluation windows."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = calibration_starts(ids.size, n, length, eval_n=eval_n, eval_length=eval_length)
    return np.stack([ids[s : s + length] for s in starts])


def default_calibration_windows(tokenizer_json: str | Path, n: int = 16, length: int = 512) -> np.ndarray:
    """`calibration_windows` of the default corpus under a model's tokenizer (the compiler's default)."""
    return calibration_windows(corpus_ids(tokenizer_json), n, length)
