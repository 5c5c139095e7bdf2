"""The KV cache: K/V state per layer, in one of two bindings (the manifest's kv_cache.binding).

Dimension letters: B batch, H kv heads, T cached positions, C capacity, D head dim, L layers. Layout BHTD.

`KVCache` is the "grow" binding (graphs without BindKVCachePass): the decode graph takes past
(B, H, T, D) plus an attention mask and returns present (B, H, T+1, D); the cache keeps the step's
outputs (the graph's Concat is the inherent per-token copy of this binding) and the per-row mask of
left-padded batches:
    reset()                      forget everything (batch size back to 0)
    update(present, new_mask)    take a step's `present.{i}.key|value` outputs; `new_mask` [B, n] marks
                                 which of the step's n new positions are real (0 = left padding)
    feeds()                      {past_key_values.{i}.key|value: array} for the next decode step
    next_attention_mask()        [B, T+1] mask for the next single-token step
    next_position_ids()          [B, 1] positions of the next token (= real tokens so far per row)
    length, batch_size, max_len, attention_mask

`BoundKVCache` is the "bound" binding (BindKVCachePass): preallocated (B, H, C, D) buffers that the
graph reads and writes in place (ORT I/O binding: each buffer is bound as both past and present), each
row stored compactly from position 0 with its own length, so nothing per token scales with context:
    allocate(batch, capacity)    zeroed buffers for a new batch
    reserve(n)                   make room for n more positions per row (amortized doubling, <= max_len)
    step_inputs(query_lens)      {seqlens_k, total_sequence_length, query_seqlens} for a step that adds
                                 query_lens[b] tokens to row b (0 = row idle)
    advance(query_lens)          record that the step ran
    bind(io_binding, rows=None)  bind every buffer (or its first rows) as past and present
    bind_row(io_binding, row)    bind one row's slices (a prefill into that row while others wait)
    lengths, batch_size, capacity, max_len
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.compiler.manifest import ModelFacts

DLPACK_ALIGN = 64  # bytes: the alignment TVM requires of memory it shares (see aligned_zeros)

PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"


class CacheLayout(abc.ABC):
    """What every binding shares: the sizes, the dtype and the graph's past/present tensor names."""

    binding: ClassVar[str]

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: str = "float32") -> None:
        if min(num_layers, num_kv_heads, head_dim, max_len) <= 0:
            raise TwophaseError("KV cache sizes must be positive")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.past_names = [f"{PAST_PREFIX}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        self.present_names = [f"{PRESENT_PREFIX}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        self.reset()

    @classmethod
    def for_model(cls, facts: ModelFacts, max_len: int, dtype: str = "float32"):
        return cls(facts.num_layers, facts.num_kv_heads, facts.head_dim, max_len, dtype)

    @abc.abstractmethod
    def reset(self) -> None: ...


class KVCacheBase(CacheLayout):
    """The grow binding's state: the per-row mask and the positions of left-padded batches."""

    def reset(self) -> None:
        self.batch_size = 0
        self.length = 0  # cached positions per row, padding included (T)
        self._mask = np.zeros((0, self.max_len), dtype=np.int64)  # (B, max_len); columns >= length unused
        self._positions = np.zeros((0,), dtype=np.int64)  # (B,) real tokens so far per row

    @property
    def attention_mask(self) -> np.ndarray:
        """(B, T) int64: 1 where a cached position is a real token, 0 where it is left padding."""
        return self._mask[:, : self.length]

    def next_attention_mask(self) -> np.ndarray:
        """(B, T+1) int64 mask for a single-token step: the cached positions plus the new one."""
        self._check_room(1)
        self._mask[:, self.length] = 1
        return np.ascontiguousarray(self._mask[:, : self.length + 1])  # no copy when B == 1

    def next_position_ids(self) -> np.ndarray:
        """(B, 1) int64 position of the next token in each row: clip(cumsum(mask) - 1, 0) at the new column."""
        return self._positions[:, None].copy()

    def _advance(self, new_mask: np.ndarray | None, n: int, batch: int) -> None:
        if self.batch_size == 0:
            self.batch_size = batch
            self._mask = np.zeros((batch, self.max_len), dtype=np.int64)
            self._positions = np.zeros((batch,), dtype=np.int64)
        self._check_room(n)
        cols = self._mask[:, self.length : self.length + n]
        if new_mask is None:
            cols[...] = 1
            self._positions += n
        else:
            new_mask = np.asarray(new_mask)
            if new_mask.shape != (batch, n):
                raise TwophaseError(f"new_mask has shape {new_mask.shape}, expected {(batch, n)}")
            cols[...] = new_mask
            self._positions += new_mask.sum(axis=1, dtype=np.int64)
        self.length += n

    def _check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ContextLengthError(
                f"KV cache holds {self.length} positions and cannot take {n} more: max_len is {self.max_len}"
            )

    def _as_list(self, present: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if isinstance(present, Mapping):
            try:
                return [present[n] for n in self.present_names]
            except KeyError as e:
                raise ArtifactError(f"step outputs lack {e.args[0]!r}; the graph does not match its manifest") from e
        present = list(present)
        if len(present) != 2 * self.num_layers:
            raise TwophaseError(f"expected {2 * self.num_layers} present tensors, got {len(present)}")
        return present

    @abc.abstractmethod
    def update(
        self, present: Sequence[np.ndarray] | Mapping[str, np.ndarray], new_mask: np.ndarray | None = None
    ) -> None: ...

    @abc.abstractmethod
    def feeds(self) -> dict[str, np.ndarray]: ...


class KVCache(KVCacheBase):
    """"grow" binding: past in, present out; the cache holds the latest present tensors."""

    binding = "grow"

    def reset(self) -> None:
        super().reset()
        self._kv: list[np.ndarray] = []  # 2L arrays (B, H, T, D): layer 0 key, layer 0 value, layer 1 key, ...

    def update(
        self, present: Sequence[np.ndarray] | Mapping[str, np.ndarray], new_mask: np.ndarray | None = None
    ) -> None:
        """Keep a step's present K/V (B, H, T+n, D); `new_mask` (B, n) marks the real new positions (default all)."""
        kv = self._as_list(present)
        b, h, t, d = kv[0].shape
        n = t - self.length
        if self.batch_size and b != self.batch_size:
            raise TwophaseError(f"present has batch {b}, cache holds batch {self.batch_size}")
        if n <= 0:
            raise ArtifactError(
                f"{self.present_names[0]} has {t} positions, which does not extend the {self.length} cached ones"
            )
        expected = (b, self.num_kv_heads, t, self.head_dim)
        # Every layer is checked once, on the prefill that fills the cache; a decode step checks layer 0
        # only (the session's signature was checked at load), so no per-token Python loop over layers.
        for name, a in zip(self.present_names, kv if self.length == 0 else kv[:1]):
            if a.shape != expected:
                raise ArtifactError(
                    f"{name} has shape {a.shape}, expected {expected}; the graph does not match its manifest"
                )
        self._advance(new_mask, n, b)
        self._kv = kv

    def feeds(self) -> dict[str, np.ndarray]:
        """{past_key_values.{i}.key|value: (B, H, T, D)} for the next decode step."""
        if not self._kv:
            raise TwophaseError("KV cache is empty: run prefill first")
        return dict(zip(self.past_names, self._kv))

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(key, value) of layer i, each (B, H, T, D)."""
        return self._kv[2 * i], self._kv[2 * i + 1]


class BoundKVCache(CacheLayout):
    """"bound" binding: preallocated (B, H, C, D) buffers updated in place by the graph (module doc)."""

    binding = "bound"
    MIN_CAPACITY = 64  # positions; capacities are multiples of it

    def reset(self) -> None:
        self.batch_size = 0
        self.capacity = 0
        self.lengths = np.zeros((0,), dtype=np.int64)  # (B,) cached positions per row
        self._buffers: list[np.ndarray] = []  # 2L arrays (B, H, C, D)
        self._ortvalues: list = []
        self.version = getattr(self, "version", 0) + 1  # bumped whenever the buffers change

    @property
    def length(self) -> int:
        """The longest row's cached positions."""
        return int(self.lengths.max()) if self.batch_size else 0

    def allocate(self, batch: int, capacity: int) -> None:
        """Zeroed buffers for `batch` empty rows with room for `capacity` positions each."""
        if batch <= 0:
            raise TwophaseError(f"batch size must be positive, got {batch}")
        self.reset()
        self.batch_size = batch
        self.lengths = np.zeros((batch,), dtype=np.int64)
        self._resize(self._round(capacity))

    def reserve(self, n: int) -> None:
        """Room for `n` more positions in every row; grows by at least doubling (copying once), up to max_len."""
        if self.length + n > self.max_len:
            raise ContextLengthError(
                f"KV cache holds {self.length} positions and cannot take {n} more: max_len is {self.max_len}"
            )
        self.ensure_capacity(self.length + n)

    def ensure_capacity(self, positions: int) -> None:
        """Room for `positions` positions per row (<= max_len), growing by at least doubling."""
        if positions > self.max_len:
            raise ContextLengthError(f"{positions} positions exceed the KV cache's max_len {self.max_len}")
        if positions > self.capacity:
            self._resize(self._round(max(positions, 2 * self.capacity)))

    def _round(self, capacity: int) -> int:
        m = self.MIN_CAPACITY
        return min(self.max_len, max(m, -(-capacity // m) * m))

    def _resize(self, capacity: int) -> None:
        import onnxruntime as ort

        shape = (self.batch_size, self.num_kv_heads, capacity, self.head_dim)
        old, keep = self._buffers, min(self.capacity, capacity)
        self._buffers = [aligned_zeros(shape, self.dtype) for _ in self.past_names]
        for new, prev in zip(self._buffers, old):
            new[:, :, :keep] = prev[:, :, :keep]
        # CPU OrtValues over the numpy memory: the graph writes straight into self._buffers
        self._ortvalues = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._buffers]
        self.capacity = capacity
        self.version += 1

    def step_inputs(self, query_lens: np.ndarray) -> dict[str, np.ndarray]:
        """The bound graph's length inputs for a step that adds query_lens[b] tokens to row b."""
        q = np.asarray(query_lens, dtype=np.int64)
        if q.shape != (self.batch_size,):
            raise TwophaseError(f"query lengths have shape {q.shape}, the cache holds batch {self.batch_size}")
        total = self.lengths + q
        if int(total.max()) > self.capacity:
            raise ContextLengthError(
                f"a step of {int(q.max())} tokens needs {int(total.max())} cache positions; capacity is "
                f"{self.capacity} (reserve() first; max_len is {self.max_len})"
            )
        return {
            "seqlens_k": (np.maximum(total, 1) - 1).astype(np.int32),
            "total_sequence_length": np.array(max(int(total.max()), 1), dtype=np.int32),
            "query_seqlens": q.astype(np.int32),
        }

    def advance(self, query_lens: np.ndarray) -> None:
        self.lengths += np.asarray(query_lens, dtype=np.int64)

    def bind(self, io_binding, rows: int | None = None) -> None:
        """Bind every buffer as both its past input and its present output; `rows`: only the first rows
        (a contiguous view), so a step over a partly idle batch does not compute the idle tail."""
        import onnxruntime as ort

        if not self._ortvalues:
            raise TwophaseError("KV cache is not allocated: run prefill first")
        if rows is None or rows == self.batch_size:
            values = self._ortvalues
        else:
            values = [ort.OrtValue.ortvalue_from_numpy(b[:rows]) for b in self._buffers]
        for past, present, value in zip(self.past_names, self.present_names, values):
            io_binding.bind_ortvalue_input(past, value)
            io_binding.bind_ortvalue_output(present, value)

    def arrays(self, rows: int | None = None, row: int | None = None) -> list[np.ndarray]:
        """The buffers in past_names order: all rows, the first `rows`, or one `row` (contiguous views)."""
        if not self._buffers:
            raise TwophaseError("KV cache is not allocated: run prefill first")
        if row is not None:
            if not 0 <= row < self.batch_size:
                raise TwophaseError(f"row {row} is outside the cache's batch of {self.batch_size}")
            return [b[row : row + 1] for b in self._buffers]
        return [b if rows is None else b[:rows] for b in self._buffers]

    def bind_row(self, io_binding, row: int) -> None:
        """Bind one row's slices of the buffers (batch 1) as past and present: a prefill into that row only."""
        import onnxruntime as ort

        if not 0 <= row < self.batch_size:
            raise TwophaseError(f"row {row} is outside the cache's batch of {self.batch_size}")
        for past, present, buf in zip(self.past_names, self.present_names, self._buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buf[row : row + 1])  # a contiguous view: no copy
            io_binding.bind_ortvalue_input(past, value)
            io_binding.bind_ortvalue_output(present, value)

    def layer(self, i: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(key, value) of layer i for one row, each (H, T_row, D): views into the buffers."""
        n = int(self.lengths[row])
        return self._buffers[2 * i][row, :, :n], self._buffers[2 * i + 1][row, :, :n]


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros whose data starts at a DLPACK_ALIGN-byte boundary (TVM shares such memory without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + DLPACK_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DLPACK_ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def make_kv_cache(binding: str, facts: ModelFacts, max_len: int, dtype: str = "float32") -> CacheLayout:
    """The cache class for a manifest's kv_cache.binding."""
    classes: dict[str, type] = {KVCache.binding: KVCache, BoundKVCache.binding: BoundKVCache}
    if binding not in classes:
        raise ArtifactError(f"kv_cache.binding {binding!r} is not supported by this runtime (supports {list(classes)})")
    return classes[binding].for_model(facts, max_len, dtype)
