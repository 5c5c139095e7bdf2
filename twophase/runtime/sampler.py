"""Token sampling: SamplingParams (validated, frozen) and a Sampler that owns the randomness.

Order of operations follows Hugging Face's logits processors and warpers:
    repetition penalty -> (temperature == 0: argmax) | temperature -> top-k -> top-p -> sample.
Everything works on (B, V) float32 logits with whole-array numpy ops; no Python loop over the vocab.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from twophase.compiler.errors import TwophaseError


class SamplingParamsError(TwophaseError, ValueError):
    """A sampling parameter outside its valid range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (HF semantics)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not _is_real(t) or t < 0:
            raise SamplingParamsError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise SamplingParamsError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not _is_real(p) or not 0 < p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _is_real(r) or r <= 0:
            raise SamplingParamsError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        try:
            stop = tuple(int(s) for s in self.stop_token_ids)
        except (TypeError, ValueError) as e:
            raise SamplingParamsError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}") from e
        if any(s < 0 for s in stop):
            raise SamplingParamsError(f"stop_token_ids must be >= 0, got {stop}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise SamplingParamsError(f"seed must be an integer or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", stop)
        object.__setattr__(self, "top_k", int(k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


# --- pure logits transforms: (B, V) in, (B, V) out ------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Logits of seen tokens (bool mask (B, V)) divided by `penalty` where positive, multiplied where not."""
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits).astype(logits.dtype, copy=False)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits per row (and any tied with the k-th), -inf elsewhere. k = 0: unchanged."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k, axis=-1)[:, vocab - k, None]  # (B, 1)
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to at least p, -inf elsewhere."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")  # (B, V) most likely first
    probs = np.take_along_axis(softmax(logits), order, axis=-1)
    mass_before = np.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the top token always stays (mass_before == 0 < p)
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits).astype(logits.dtype, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (masked -inf entries get probability 0)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def seen_mask(token_ids: np.ndarray, vocab_size: int, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """(B, V) bool: which tokens occur in each row of (B, T) `token_ids` (padding excluded when a mask is given)."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    b = token_ids.shape[0]
    mask = np.zeros((b, vocab_size), dtype=bool)
    rows = np.broadcast_to(np.arange(b)[:, None], token_ids.shape)
    keep = (token_ids >= 0) & (token_ids < vocab_size)
    if attention_mask is not None:
        keep &= np.asarray(attention_mask).astype(bool)
    mask[rows[keep], token_ids[keep]] = True
    return mask


class Sampler:
    """Picks next tokens from logits according to SamplingParams; owns a seeded numpy Generator."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params or SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def reseed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def process(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """The (B, V) logits actually sampled from: penalty, temperature, top-k and top-p applied."""
        p = self.params
        x = np.asarray(logits)
        if x.ndim != 2:
            raise TwophaseError(f"Sampler expects (batch, vocab) logits, got shape {x.shape}")
        if seen is not None and p.uses_penalty:
            x = apply_repetition_penalty(x, seen, p.repetition_penalty)
        if p.greedy:
            return x
        x = x / np.float32(p.temperature)
        x = apply_top_k(x, p.top_k)
        return apply_top_p(x, p.top_p)

    def probs(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """(B, V) float64 distribution the next token is drawn from (one-hot at the argmax when greedy)."""
        x = self.process(logits, seen)
        if self.params.greedy:
            out = np.zeros(x.shape, dtype=np.float64)
            out[np.arange(x.shape[0]), np.argmax(x, axis=-1)] = 1.0
            return out
        return softmax(x)

    def sample(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """(B,) int64 next tokens for (B, V) logits; `seen` is the (B, V) bool mask the penalty reads."""
        x = self.process(logits, seen)
        if self.params.greedy:
            return np.argmax(x, axis=-1).astype(np.int64)
        cdf = np.cumsum(softmax(x), axis=-1)  # (B, V)
        u = self.rng.random((x.shape[0], 1)) * cdf[:, -1:]
        # First index whose cdf exceeds u: never lands on a masked (probability 0) token.
        idx = (cdf <= u).sum(axis=-1)
        overflow = idx >= x.shape[-1]  # u rounded up to the total mass: take the likeliest token
        if overflow.any():
            idx = np.where(overflow, np.argmax(x, axis=-1), idx)
        return idx.astype(np.int64)
