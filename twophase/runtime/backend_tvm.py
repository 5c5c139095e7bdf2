"""Apache TVM backend: one Relax VM per phase library (`{phase}.so`, built by compiler/lower_tvm.py).

`TvmPhase` has the ORT backend's surface for bound-KV artifacts (`run_bound`, `decode_step`, `run`):
the cache buffers are numpy arrays shared with TVM through DLPack (no copy; the attention kernel
writes the new positions straight into them), the weights are loaded once from weights.bin into one
huge-page arena (zeroed_arena) and shared by both phases, and a decode step's small inputs live in
preallocated arrays it overwrites.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twophase.compiler.errors import ArtifactError, TwophaseError
from twophase.compiler.manifest import PhaseEntry
from twophase.runtime.kv_cache import DLPACK_ALIGN, aligned_zeros

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20  # bytes: a transparent huge page (x86-64, aarch64 with 4 KiB base pages)


def _tvm(threads: int | None = None):
    try:
        import tvm
    except ImportError as e:
        raise ArtifactError(
            "this artifact was compiled for the TVM backend; install Apache TVM to run it: pip install 'twophase[tvm]'"
        ) from e
    if threads is not None:
        if threads <= 0:
            raise TwophaseError(f"threads must be a positive integer, got {threads!r}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return tvm


class TvmWeights:
    """weights.bin as TVM tensors, each loaded once however many phases (and parameters) read it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tensors: dict[tuple[str, int, str, tuple], Any] = {}

    def load(self, index_file: str) -> list:
        import tvm

        path = self.root / index_file
        try:
            index = json.loads(path.read_text())
            weights_file = self.root / index["weights"]
            entries = index["params"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{str(path)!r}: cannot read the TVM parameter index ({e}); recompile the artifact") from e
        size = weights_file.stat().st_size if weights_file.is_file() else -1
        mm = np.memmap(weights_file, dtype=np.uint8, mode="r") if size > 0 else None
        keys, new = [], {}
        for p in entries:
            shape, dtype, offset = tuple(p["shape"]), np.dtype(p["dtype"]), int(p["offset"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if mm is None or offset < 0 or offset + nbytes > size or nbytes != int(p["length"]):
                raise ArtifactError(f"{str(path)!r}: parameter {p['name']!r} lies outside {weights_file.name}; "
                                    "the artifact is corrupt, recompile it")
            key = (index["weights"], offset, dtype.str, shape)
            keys.append(key)
            if key not in self._tensors:
                new[key] = np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        # the weights this phase adds, copied into one huge-page arena and shared with TVM without a copy
        arena = zeroed_arena([a.shape for a in new.values()], [a.dtype for a in new.values()])
        for (key, array), dst in zip(new.items(), arena):
            dst[...] = array
            self._tensors[key] = tvm.runtime.from_dlpack(dst)
        return [self._tensors[key] for key in keys]


class TvmPhase:
    """A phase library loaded into a Relax VM (see module doc)."""

    def __init__(
        self, root: Path, entry: PhaseEntry, *, name: str = "phase", threads: int | None = None,
        weights: TvmWeights | None = None,
    ) -> None:
        tvm = _tvm(threads)
        from tvm import relax

        self.name = name
        self.entry = entry
        if entry.backend != "tvm" or entry.params is None:
            raise ArtifactError(f"phases.{name}: not a TVM phase (backend {entry.backend!r})")
        check_cpu(entry.target or {}, name)
        path = Path(root) / entry.graph
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        except Exception as e:  # TVM raises plain RuntimeError / TVMError subclasses
            raise ArtifactError(f"{str(path)!r}: TVM cannot load phase {name!r} ({e}); recompile the artifact") from e
        self.main = self.vm["main"]
        self.params = (weights or TvmWeights(Path(root))).load(entry.params)
        self.input_names = [t.name for t in entry.inputs]
        self.output_names = [t.name for t in entry.outputs]
        self._input_dtypes = {t.name: t.dtype for t in entry.inputs}
        logits = next((t for t in entry.outputs if t.name == "logits"), None)
        self.vocab_size = logits.shape[-1] if logits is not None and logits.shape else None
        self._views: dict[tuple, list] = {}  # (cache version, rows, row) -> DLPack views of the cache
        self.calls = 0

    def _args(self, feeds: dict[str, Any], cache_views: dict[str, Any]) -> list:
        import tvm

        args = []
        for name in self.input_names:
            if name in cache_views:
                args.append(cache_views[name])
                continue
            if name not in feeds:
                raise TwophaseError(f"phase {self.name}: missing input {name!r}")
            value = feeds[name]
            if isinstance(value, np.ndarray):
                if name == "input_ids":
                    self.check_ids(value)
                value = tvm.runtime.tensor(np.require(value, dtype=self._input_dtypes[name], requirements="C"))
            args.append(value)
        return args + self.params

    def check_ids(self, ids: Any) -> None:
        """Token ids index the embedding table inside the library: reject those outside the vocabulary."""
        ids = np.asarray(ids)
        if isinstance(self.vocab_size, int) and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TwophaseError(f"token ids must be in [0, {self.vocab_size}), got {int(ids.min())}..{int(ids.max())}")

    def cache_views(self, cache: Any, rows: int | None = None, row: int | None = None) -> dict[str, Any]:
        """{past input name: TVM tensor over the cache's memory} for all rows, the first `rows`, or one `row`."""
        import tvm

        key = (cache.version, rows, row)
        if key not in self._views:
            if len(self._views) > 64:
                self._views.clear()
            arrays = cache.arrays(rows=rows, row=row)
            self._views[key] = [tvm.runtime.from_dlpack(a) for a in arrays]
        return dict(zip(cache.past_names, self._views[key]))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with numpy feeds (the caches too: updated copies come back as present.*)."""
        self.calls += 1
        out = self.main(*self._args(feeds, {}))
        outs = [out[i] for i in range(len(self.output_names))] if len(self.output_names) > 1 else [out]
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}

    def run_bound(self, feeds: dict[str, np.ndarray], cache: Any, row: int | None = None) -> np.ndarray:
        """Run over the bound cache (all rows, or one `row`), updated in place; returns the logits."""
        self.calls += 1
        out = self.main(*self._args(feeds, self.cache_views(cache, row=row)))
        return out[0].numpy()

    def decode_step(self, cache: Any, vocab_size: int, rows: int | None = None) -> TvmDecodeStep:
        return TvmDecodeStep(self, cache, vocab_size, rows)


class TvmDecodeStep:
    """A decode step with its arguments built once: small inputs in aligned arrays shared with TVM."""

    def __init__(self, phase: TvmPhase, cache: Any, vocab_size: int, rows: int | None = None) -> None:
        import tvm

        B = rows or cache.batch_size
        self.rows = B
        self.phase = phase
        self.version = cache.version
        self.input_ids = aligned_zeros((B, 1), np.int64)
        self.seqlens_k = aligned_zeros((B,), np.int32)
        self.total = aligned_zeros((), np.int32)
        self.query_seqlens = aligned_zeros((B,), np.int32)
        small = {"input_ids": self.input_ids, "seqlens_k": self.seqlens_k,
                 "total_sequence_length": self.total, "query_seqlens": self.query_seqlens}
        feeds = {name: tvm.runtime.from_dlpack(a) for name, a in small.items()}
        views = phase.cache_views(cache, rows=None if B == cache.batch_size else B)
        self.args = phase._args(feeds, views)

    def run(self, tokens: np.ndarray, lengths_after: np.ndarray, query_lens: np.ndarray) -> np.ndarray:
        """One step: tokens (B,), each row's cache length after the step (B,), tokens added per row (B,)."""
        self.phase.calls += 1
        self.phase.check_ids(tokens)
        self.input_ids[:, 0] = tokens
        np.subtract(np.maximum(lengths_after, 1), 1, out=self.seqlens_k, casting="unsafe")
        self.total[...] = max(int(lengths_after.max()), 1)
        self.query_seqlens[:] = query_lens
        out = self.phase.main(*self.args)
        return out[0].numpy()[:, 0, :]


def zeroed_arena(shapes: Sequence[tuple[int, ...]], dtypes: Sequence) -> list[np.ndarray]:
    """Zeroed arrays carved from one anonymous mapping, each starting at a DLPACK_ALIGN-byte boundary.

    The mapping is aligned to and advised for transparent huge pages (madvise; THP "madvise" or "always"
    mode, Linux): a decode step streams every weight once, and with 4 KiB pages that is a TLB miss per
    4 KiB (measured on SmolLM2 w4a16: 1.02-1.09x decode tok/s, paired, 2 threads). Where the
    kernel declines, the pages are ordinary ones. Meant for memory that is written whole (weights): each
    first touch commits a 2 MiB page.
    """
    nbytes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for shape, dt in zip(shapes, dtypes)]
    offsets = np.cumsum([0] + [-(-n // DLPACK_ALIGN) * DLPACK_ALIGN for n in nbytes]).tolist()
    total = max(int(offsets[-1]), 1)
    huge = total >= HUGE_PAGE
    # private anonymous (mmap's default, MAP_SHARED, is shmem: no THP there): zero-filled, freed with its last view
    mm = mmap.mmap(-1, total + (HUGE_PAGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mm, dtype=np.uint8)
    start = -raw.ctypes.data % (HUGE_PAGE if huge else DLPACK_ALIGN)
    return [
        raw[start + off : start + off + n].view(dt).reshape(shape)
        for shape, dt, off, n in zip(shapes, dtypes, offsets, nbytes)
    ]


def check_cpu(target: dict, name: str) -> None:
    """The library's SIMD instructions exist on this CPU (flags recorded at compile time vs /proc/cpuinfo)."""
    from twophase.compiler.lower_tvm import cpu_flags

    needed = target.get("cpu_flags") or []
    have = set(cpu_flags())
    if have and (missing := [f for f in needed if f not in have]):
        raise ArtifactError(
            f"phases.{name} was compiled by TVM for {target.get('tvm_target', {}).get('mcpu', '?')} and uses CPU "
            f"features this machine lacks ({', '.join(missing)}); recompile the artifact on this machine"
        )
