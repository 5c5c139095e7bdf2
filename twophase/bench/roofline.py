"""Machine roofline measurements: memory bandwidth, GEMM peak, and the memory-bound decode model.

- `measure_bandwidth`: STREAM-style copy / triad (plus a read-only sum) over float64 numpy arrays, one
  contiguous slice per Python thread, all threads released together (ufuncs drop the GIL).
- `measure_bandwidth_ort`: the same kind of number from ONNX Runtime ops (Mul by a scalar, Add,
  ReduceSum over rows) on float32 tensors at `intra_op_num_threads=threads`.
- `TvmRead`: the read as compiled code streams it, on TVM's thread pool (Apache TVM
  installed): XOR of 64-byte vectors, with and without software prefetches. numpy's sum leaves the streaming
  to the hardware prefetcher, which stops at every 4 KiB page; on the Intel Xeon VM this was measured on,
  compiled code reads ~1.1-1.2x as fast, and a decode roofline from numpy's read alone is no ceiling there.
- `ReadProbe`: that read alone over a preallocated array, quick enough to bracket each decode run (the
  bandwidth of a shared VM moves within a second).
- `measure_gemm_peak`: achieved rate of a constant-weight ORT MatMul (fp32) and MatMulInteger (u8 x s8).
- `decode_bytes_per_token`, `roofline_tokens_per_s`: the bytes one decode token must stream, and the
  tokens per second a given bandwidth allows.

Units: sizes in MiB (2**20 bytes); bandwidth in GB/s (1e9 bytes/s); rates in GFLOP/s / GOP/s (1e9/s).
Bytes are counted as STREAM counts them: each array read or written once per element (`StreamKernel.arrays`);
the read of the destination that an ordinary (write-allocate) store causes is not counted. All kernels
here use ordinary stores (numpy copies go in L2-sized pieces, below glibc's switch to streaming stores),
so copy really moves 3/2 and triad 4/3 of the bytes counted; `read` moves exactly what it counts, and is
the access pattern of decode's weight reads.

Timings are noisy on a shared machine: each result carries the median and the best (STREAM reports the
best) over `reps` timed repetitions after one untimed warm-up, and `cpu_share`, which tells whether the
threads had their cores to themselves while timed.

`python -m twophase.bench.roofline [THREADS ...]` prints all measurements as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

MIB = 1 << 20
MIN_DEFAULT_ARRAY_MIB = 256  # floor of the automatic array size
_CHUNK = 1 << 16  # elements per piece of the chunked numpy kernels: 512 KiB of float64, three fit in L2
_READ_ROWS = 256  # rows of the ORT ReduceSum input: ORT parallelises a reduction over its output rows
_OPSET = 21

K = TypeVar("K")
T = TypeVar("T")


class StreamKernel(Enum):
    """A memory-bound kernel; `arrays` is how many arrays STREAM counts per element."""

    COPY = "copy"  # a = c
    SCALE = "scale"  # b = s * c
    ADD = "add"  # c = a + b
    TRIAD = "triad"  # a = b + s * c
    READ = "read"  # sum(a): not a STREAM kernel; the access pattern of decode's weight reads
    READ_PREFETCH = "read_prefetch"  # compiled read with software prefetches (TvmRead)

    @property
    def arrays(self) -> int:
        return _KERNEL_ARRAYS[self]


_KERNEL_ARRAYS = {
    StreamKernel.COPY: 2,
    StreamKernel.SCALE: 2,
    StreamKernel.ADD: 3,
    StreamKernel.TRIAD: 3,
    StreamKernel.READ: 1,
    StreamKernel.READ_PREFETCH: 1,
}


class BandwidthSource(Enum):
    """What did the streaming: numpy ufuncs on Python threads, or ORT ops on its intra-op pool."""

    NUMPY = "numpy"
    ONNXRUNTIME = "onnxruntime"
    TVM = "tvm"


def stream_bytes(kernel: StreamKernel, elements: int, itemsize: int) -> int:
    """Bytes one pass of `kernel` over `elements` elements moves, as STREAM counts them."""
    return kernel.arrays * elements * itemsize


def gemm_ops(m: int, n: int, k: int) -> int:
    """Multiply-adds counted as two operations: the ops of one (m, k) x (k, n) product."""
    return 2 * m * n * k


@dataclasses.dataclass(frozen=True)
class KernelBandwidth:
    """Bandwidth of one kernel: `bytes_per_rep` (STREAM counting) over the median and the best time."""

    kernel: StreamKernel
    bytes_per_rep: int
    median_gbs: float
    best_gbs: float

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_per_rep": self.bytes_per_rep, "median_gbs": self.median_gbs, "best_gbs": self.best_gbs}


@dataclasses.dataclass(frozen=True)
class BandwidthResult:
    """Memory bandwidth at `threads` threads over `array_mib` MiB arrays of `dtype`.

    numpy measures copy, triad and read; ORT measures scale (Mul), add (Add) and read (ReduceSum).
    For a decode roofline use `kernel(StreamKernel.READ)`: decode reads weights and KV, it barely writes.
    """

    source: BandwidthSource
    threads: int
    array_mib: int
    dtype: str
    reps: int
    kernels: tuple[KernelBandwidth, ...]
    cpu_share: float  # see `_cpu_share`: well below 1 means another process held a core, so the numbers read low

    def kernel(self, kernel: StreamKernel) -> KernelBandwidth:
        for k in self.kernels:
            if k.kernel is kernel:
                return k
        have = ", ".join(k.kernel.value for k in self.kernels)
        raise KeyError(f"{self.source.value} bandwidth has no {kernel.value!r} kernel; it has {have}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.value,
            "threads": self.threads,
            "array_mib": self.array_mib,
            "dtype": self.dtype,
            "reps": self.reps,
            "cpu_share": self.cpu_share,
            "kernels": {k.kernel.value: k.to_dict() for k in self.kernels},
        }


@dataclasses.dataclass(frozen=True)
class GemmRate:
    """Achieved rate of one ORT GEMM op; `weight_gbs` is weight bytes over the median time, the number
    that matters when m is small (m = 1 is a decode GEMV)."""

    op: str  # the ONNX op type
    dtype: str  # activation x weight element types
    median_gops: float
    best_gops: float
    weight_gbs: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class GemmResult:
    """(m, k) x (k, n) products with a constant (k, n) weight at `threads` intra-op threads."""

    threads: int
    m: int
    n: int
    k: int
    reps: int
    fp32: GemmRate  # MatMul, float32 x float32: GFLOP/s
    int8: GemmRate  # MatMulInteger, uint8 x int8 -> int32: GOP/s
    cpu_share: float

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["fp32"] = self.fp32.to_dict()
        d["int8"] = self.int8.to_dict()
        return d


# ---------------------------------------------------------------------------------------------- roofline model


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_position: int, context: int, batch: int = 1) -> float:
    """Bytes one generated token costs in a memory-bound decode step.

    Model: a step over `batch` rows reads every weight once (the rows share it) and, for each row, the K
    and V of `context` positions (`kv_bytes_per_position` = all layers' K and V of one position of one row,
    e.g. 2 * layers * kv_heads * head_dim * itemsize). Per token: (weights + batch * context * kv) / batch.
    Activations, the new KV row written and logits are left out: they are small next to these reads.
    """
    if weight_bytes < 0 or kv_bytes_per_position < 0:
        raise ValueError(
            f"byte counts must be >= 0, got weight_bytes={weight_bytes}, kv_bytes_per_position={kv_bytes_per_position}"
        )
    if context < 0:
        raise ValueError(f"context must be >= 0 positions, got {context}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1 rows, got {batch}")
    return (weight_bytes + batch * context * kv_bytes_per_position) / batch


def roofline_tokens_per_s(bytes_per_token: float, bandwidth_gbs: float) -> float:
    """Upper bound on tokens/s (all rows of a batch together) when each token must stream
    `bytes_per_token` bytes at `bandwidth_gbs` GB/s and compute is free."""
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be > 0 GB/s, got {bandwidth_gbs}")
    return bandwidth_gbs * 1e9 / bytes_per_token


# ---------------------------------------------------------------------------------------------- machine facts


def last_level_cache_bytes() -> int | None:
    """Size of the largest data/unified cache cpu0 reports in sysfs, or None where sysfs does not say.

    In a VM this is often the host's cache, larger than what the guest can use."""
    best: tuple[int, int] | None = None  # (level, bytes)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_cache_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _parse_cache_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_array_mib() -> int:
    """Per-array size for the bandwidth kernels: twice the last-level cache (three arrays then exceed it
    six times), at least `MIN_DEFAULT_ARRAY_MIB`, and the three arrays at most half the available memory."""
    llc = last_level_cache_bytes()
    mib = max(MIN_DEFAULT_ARRAY_MIB, math.ceil(2 * llc / MIB) if llc else 0)
    avail = _available_memory_bytes()
    if avail is not None and 3 * mib * MIB > avail // 2:
        capped = max(64, avail // 2 // 3 // MIB)
        logger.warning("bandwidth arrays capped at %d MiB (wanted %d) by available memory", capped, mib)
        mib = capped
    return mib


def machine_info() -> dict[str, Any]:
    """CPU, cache, memory and library versions, to file next to the measurements."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "available_memory_bytes": _available_memory_bytes(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }


def _cpu_share(threads: int, measure: Callable[[], T]) -> tuple[T, float]:
    """Run `measure`; return its result and the CPU seconds this process used per wall second per thread.

    Near 1 when each of the `threads` threads had a core to itself all along; on a shared machine a share
    of 0.5 at two threads says one core was busy with another process."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = measure()
    return result, (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * threads)


# ---------------------------------------------------------------------------------------------- bandwidth


def measure_bandwidth(threads: int = 2, size_mb: int | None = None, reps: int = 5) -> BandwidthResult:
    """STREAM-style bandwidth of numpy on `threads` Python threads, float64 (8 B per element).

    Three arrays of `size_mb` MiB each (None: `default_array_mib()`); thread i owns the i-th contiguous
    slice of every array, touches it first and streams it in every kernel. Kernels: copy (a = c),
    triad (a = b + s*c, through an L2-sized scratch piece so each array is streamed once) and read (sum(a)).
    """
    threads, array_mib, reps = _check_bandwidth_args(threads, size_mb, reps)
    n = array_mib * MIB // 8
    a, b, c = (np.empty(n, dtype=np.float64) for _ in range(3))
    bounds = _split(n, threads)
    scratch = [np.empty(_CHUNK, dtype=np.float64) for _ in range(threads)]
    scalar = 3.0

    def touch(i: int) -> None:
        lo, hi = bounds[i]
        a[lo:hi] = 1.0
        b[lo:hi] = 2.0
        c[lo:hi] = 0.5

    def copy(i: int) -> None:
        lo, hi = bounds[i]
        for j in range(lo, hi, _CHUNK):
            e = min(j + _CHUNK, hi)
            np.copyto(a[j:e], c[j:e])  # pieces, not one memcpy: glibc switches large copies to streaming stores

    def triad(i: int) -> None:
        lo, hi = bounds[i]
        t = scratch[i]
        for j in range(lo, hi, _CHUNK):
            e = min(j + _CHUNK, hi)
            piece = t[: e - j]
            np.multiply(c[j:e], scalar, out=piece)
            np.add(b[j:e], piece, out=a[j:e])

    def read(i: int) -> None:
        lo, hi = bounds[i]
        np.add.reduce(a[lo:hi])

    _timed_parallel(threads, touch)
    kernels = {StreamKernel.COPY: copy, StreamKernel.TRIAD: triad, StreamKernel.READ: read}
    runs = {kernel: (lambda fn=fn: _timed_parallel(threads, fn)) for kernel, fn in kernels.items()}
    times, share = _cpu_share(threads, lambda: _interleaved_times(runs, reps))
    return BandwidthResult(
        source=BandwidthSource.NUMPY,
        threads=threads,
        array_mib=array_mib,
        dtype="float64",
        reps=reps,
        kernels=tuple(_kernel_bandwidth(k, stream_bytes(k, n, 8), ts) for k, ts in times.items()),
        cpu_share=share,
    )


def measure_bandwidth_ort(threads: int = 2, size_mb: int | None = None, reps: int = 5) -> BandwidthResult:
    """Bandwidth ONNX Runtime itself streams at `intra_op_num_threads=threads`, float32 (4 B per element).

    One single-op session per kernel over `size_mb` MiB tensors (None: `default_array_mib()`), inputs and
    outputs bound to preallocated numpy buffers: scale (Y = X * s), add (Z = X + Y) and read
    (ReduceSum over the rows of X viewed as (256, -1), so ORT splits it across threads).
    """
    threads, array_mib, reps = _check_bandwidth_args(threads, size_mb, reps)
    from onnx import TensorProto, helper, numpy_helper

    n = array_mib * MIB // 4
    rows = _READ_ROWS
    x, y, z = (np.empty(n, dtype=np.float32) for _ in range(3))
    bounds = _split(n, threads)

    def touch(i: int) -> None:
        lo, hi = bounds[i]
        x[lo:hi] = 1.0
        y[lo:hi] = 2.0
        z[lo:hi] = 0.0

    _timed_parallel(threads, touch)
    f32 = TensorProto.FLOAT

    def vec(name: str, shape: Sequence[int] = (n,)) -> Any:
        return helper.make_tensor_value_info(name, f32, list(shape))

    scale_model = _onnx_model(
        [helper.make_node("Mul", ["X", "s"], ["Y"])], [vec("X")], [vec("Y")],
        [numpy_helper.from_array(np.array(3.0, dtype=np.float32), "s")],
    )  # fmt: skip
    add_model = _onnx_model([helper.make_node("Add", ["X", "Y"], ["Z"])], [vec("X"), vec("Y")], [vec("Z")])
    read_model = _onnx_model(
        [helper.make_node("ReduceSum", ["X", "axes"], ["S"], keepdims=0)], [vec("X", (rows, n // rows))],
        [vec("S", (rows,))], [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )  # fmt: skip
    sums = np.empty(rows, dtype=np.float32)
    runs = {
        StreamKernel.SCALE: _bound_run(scale_model, threads, {"X": x}, {"Y": y}),
        StreamKernel.ADD: _bound_run(add_model, threads, {"X": x, "Y": y}, {"Z": z}),
        StreamKernel.READ: _bound_run(read_model, threads, {"X": x.reshape(rows, n // rows)}, {"S": sums}),
    }
    times, share = _cpu_share(threads, lambda: _interleaved_times(runs, reps))
    return BandwidthResult(
        source=BandwidthSource.ONNXRUNTIME,
        threads=threads,
        array_mib=array_mib,
        dtype="float32",
        reps=reps,
        kernels=tuple(_kernel_bandwidth(k, stream_bytes(k, n, 4), ts) for k, ts in times.items()),
        cpu_share=share,
    )


class ReadProbe:
    """`measure_bandwidth`'s read (numpy's sum over one contiguous slice per thread) as a quick probe, to bracket a
    short measurement with the bandwidth of the moments around it: on a shared VM the read can move between levels
    within a second, so a read taken seconds before a decode run says little about the bandwidth that run had.

    One float64 array of `size_mb` MiB (None: `default_array_mib()`), touched by its threads once here; `gbs(passes)`
    is the median GB/s of `passes` reads in a row (each a few tens of milliseconds at the default size)."""

    def __init__(self, threads: int = 2, size_mb: int | None = None) -> None:
        threads, array_mib, _ = _check_bandwidth_args(threads, size_mb, 1)
        self.threads = threads
        self.array_mib = array_mib
        self._a = np.empty(array_mib * MIB // 8, dtype=np.float64)
        self._bounds = _split(self._a.size, threads)
        _timed_parallel(threads, self._touch)

    def _touch(self, i: int) -> None:
        lo, hi = self._bounds[i]
        self._a[lo:hi] = 1.0

    def _read(self, i: int) -> None:
        lo, hi = self._bounds[i]
        np.add.reduce(self._a[lo:hi])

    def gbs(self, passes: int = 3) -> float:
        _check_positive(passes=passes)
        seconds = sorted(_timed_parallel(self.threads, self._read) for _ in range(passes))
        return self._a.nbytes / seconds[len(seconds) // 2] / 1e9


READ_CHUNK_MIB = 1  # the compiled read's parallel item: each thread streams a contiguous range of these
READ_SUBSTREAMS = 4  # interleaved streams per item (one thread keeps several prefetcher streams in flight)
READ_PREFETCH_BYTES = 4096  # distance of the prefetching read's software prefetches in each sub-stream


class TvmRead:
    """Read bandwidth of compiled code on TVM's thread pool at `threads` threads over one `size_mb` MiB array
    (None: `default_array_mib()`): kernels `read` (XOR of 64-byte vectors, the hardware prefetcher alone) and
    `read_prefetch` (the same with software prefetches READ_PREFETCH_BYTES ahead), each parallel item a 1 MiB
    chunk read as READ_SUBSTREAMS interleaved streams. Built once (two small compiles, the array); `measure`
    as often as needed. `cache_ok`: an array that fits the last-level cache is what is wanted (a read of a decode
    step's own footprint, cycled), so no warning that it measures cache. Needs Apache TVM (twophase[tvm]) whose
    thread pool runs `threads` threads: TVM sizes it once, from TVM_NUM_THREADS (else half the CPUs), and
    runtime.config_threadpool does not resize it."""

    def __init__(self, threads: int = 2, size_mb: int | None = None, cache_ok: bool = False) -> None:
        threads, array_mib, _ = _check_bandwidth_args(threads, size_mb, 1, warn_cache=not cache_ok)
        try:
            import tvm
        except ImportError as e:
            raise RuntimeError("the compiled read needs Apache TVM: pip install 'twophase[tvm]'") from e
        pool = tvm.runtime.num_threads()
        if pool != threads:
            raise RuntimeError(f"TVM's thread pool runs {pool} threads, not threads={threads}: set "
                               f"TVM_NUM_THREADS={threads} before TVM starts its pool")
        self.threads = threads
        self.chunks = max(threads, array_mib // READ_CHUNK_MIB)
        lines = READ_CHUNK_MIB * MIB // 64 // READ_SUBSTREAMS
        target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
        self._data = tvm.runtime.tensor(np.ones((self.chunks, READ_SUBSTREAMS, lines, 64), np.uint8))
        self._sink = tvm.runtime.tensor(np.zeros((self.chunks, 64), np.uint8))
        kernels = ((StreamKernel.READ, 0), (StreamKernel.READ_PREFETCH, READ_PREFETCH_BYTES))
        self._fns = {kernel: tvm.compile(_read_kernel(self.chunks, lines, distance), target=target)["read"]
                     for kernel, distance in kernels}

    def _timed(self, fn) -> float:
        t0 = time.perf_counter()
        fn(self._data, self._sink)
        return time.perf_counter() - t0

    def measure(self, reps: int = 5) -> BandwidthResult:
        _check_positive(reps=reps)
        runs = {kernel: (lambda fn=fn: self._timed(fn)) for kernel, fn in self._fns.items()}
        times, share = _cpu_share(self.threads, lambda: _interleaved_times(runs, reps))
        nbytes = self.chunks * READ_CHUNK_MIB * MIB
        return BandwidthResult(
            source=BandwidthSource.TVM,
            threads=self.threads,
            array_mib=self.chunks * READ_CHUNK_MIB,
            dtype="uint8",
            reps=reps,
            kernels=tuple(_kernel_bandwidth(k, nbytes, ts) for k, ts in times.items()),
            cpu_share=share,
        )


def _read_kernel(chunks: int, lines: int, prefetch_bytes: int):
    """TIR: O[c] = XOR of chunk c's 64-byte lines, its READ_SUBSTREAMS streams in lockstep, each prefetched
    `prefetch_bytes` ahead (0: no prefetch)."""
    from tvm.script import tirx as T

    S, ahead = READ_SUBSTREAMS, prefetch_bytes // 64

    @T.prim_func
    def read(A: T.Buffer((chunks, S, lines, 64), "uint8"), O: T.Buffer((chunks, 64), "uint8")):
        for c in T.parallel(chunks):
            acc = T.alloc_buffer((64,), "uint8", scope="local")
            for j in T.vectorized(64):
                acc[j] = T.uint8(0)
            for i in range(lines):
                for s in T.unroll(S):
                    if ahead > 0:  # a hint: an address past the end of A is harmless
                        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(A[c, s, i + ahead, 0]),
                                                      0, 3, 1))
                    for j in T.vectorized(64):
                        acc[j] = acc[j] ^ A[c, s, i, j]
            for j in T.vectorized(64):
                O[c, j] = acc[j]

    return read


def _check_bandwidth_args(threads: int, size_mb: int | None, reps: int,
                          warn_cache: bool = True) -> tuple[int, int, int]:
    _check_positive(threads=threads, reps=reps)
    if size_mb is None:
        return threads, default_array_mib(), reps
    if size_mb < threads:
        raise ValueError(
            f"size_mb={size_mb} is too small for threads={threads}: each thread needs at least 1 MiB of each "
            f"array, so pass size_mb >= {threads} (and well above the last-level cache to measure memory, "
            f"not cache; None picks {default_array_mib()} MiB here)"
        )
    llc = last_level_cache_bytes()
    if warn_cache and llc and 3 * size_mb * MIB < 2 * llc:
        logger.warning("bandwidth arrays of %d MiB fit in the %d MiB cache: this measures cache", size_mb, llc // MIB)
    return threads, int(size_mb), reps


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of `parts` contiguous slices of n elements, sizes differing by one at most."""
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _timed_parallel(threads: int, work: Callable[[int], object]) -> float:
    """Run work(0), ..., work(threads - 1) on their own threads, released together by a barrier;
    return the seconds from the release to the last one's end."""
    start = [0.0]
    ends = [0.0] * threads
    errors: list[Exception] = []
    barrier = threading.Barrier(threads, action=lambda: start.__setitem__(0, time.perf_counter()))

    def body(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 — re-raised below, in the caller's thread
            errors.append(e)
        ends[i] = time.perf_counter()

    workers = [threading.Thread(target=body, args=(i,), name=f"roofline-{i}", daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return max(ends) - start[0]


def _interleaved_times(runs: dict[K, Callable[[], float]], reps: int) -> dict[K, list[float]]:
    """Seconds of `reps` timed repetitions of every run, kernels interleaved within a repetition as STREAM
    does (so a burst of load hits all of them alike), after one untimed warm-up repetition."""
    times: dict[K, list[float]] = {k: [] for k in runs}
    for rep in range(reps + 1):
        for kernel, run in runs.items():
            seconds = run()
            if rep:
                times[kernel].append(seconds)
    return times


def _back_to_back_times(run: Callable[[], float], reps: int) -> list[float]:
    """Seconds of `reps` runs in a row after an untimed one: a short kernel's peak needs its packed
    weights still in cache, which interleaving with another kernel would evict."""
    run()
    return [run() for _ in range(reps)]


def _kernel_bandwidth(kernel: StreamKernel, nbytes: int, times: list[float]) -> KernelBandwidth:
    return KernelBandwidth(
        kernel=kernel,
        bytes_per_rep=nbytes,
        median_gbs=nbytes / float(np.median(times)) / 1e9,
        best_gbs=nbytes / min(times) / 1e9,
    )


# ---------------------------------------------------------------------------------------------- ORT helpers


def _onnx_model(nodes: list, inputs: list, outputs: list, initializers: Sequence = ()) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "roofline", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=10)
    return model.SerializeToString()


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no spinning between runs: sessions are timed in turn, and one's idle pool must not steal the other's cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _bound_run(
    model: bytes, threads: int, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
) -> Callable[[], float]:
    """A callable that runs `model` once on numpy buffers bound in place and returns the seconds it took."""
    session = _session(model, threads)
    binding = session.io_binding()
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    for name, array in outputs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))

    def run() -> float:
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        return time.perf_counter() - t0

    return run


# ---------------------------------------------------------------------------------------------- GEMM


def measure_gemm_peak(
    threads: int = 2, m: int = 1024, n: int = 1024, k: int = 1024, reps: int = 10, seed: int = 0
) -> GemmResult:
    """Achieved GFLOP/s of ORT MatMul (float32) and GOP/s of MatMulInteger (uint8 x int8 -> int32) for an
    (m, k) activation times a constant (k, n) weight, which ORT prepacks as it does a model's weights.
    Each op runs `reps` times back to back after a warm-up run."""
    _check_positive(threads=threads, m=m, n=n, k=k, reps=reps)
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    cases = [
        ("MatMul", "float32 x float32", TensorProto.FLOAT, TensorProto.FLOAT,
         rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32), np.float32),
        ("MatMulInteger", "uint8 x int8", TensorProto.UINT8, TensorProto.INT32,
         rng.integers(0, 256, (m, k), dtype=np.uint8), rng.integers(-128, 128, (k, n), dtype=np.int8), np.int32),
    ]  # fmt: skip
    runs: dict[str, Callable[[], float]] = {}
    labels: dict[str, tuple[str, int]] = {}
    for op, dtype, in_type, out_type, activation, weight, out_dtype in cases:
        model = _onnx_model(
            [helper.make_node(op, ["A", "W"], ["Y"])],
            [helper.make_tensor_value_info("A", in_type, [m, k])],
            [helper.make_tensor_value_info("Y", out_type, [m, n])],
            [numpy_helper.from_array(weight, "W")],
        )
        output = np.empty((m, n), dtype=out_dtype)
        labels[op] = (dtype, weight.nbytes)
        runs[op] = _bound_run(model, threads, {"A": activation}, {"Y": output})
    times, share = _cpu_share(threads, lambda: {op: _back_to_back_times(run, reps) for op, run in runs.items()})
    ops = gemm_ops(m, n, k)

    def rate(op: str) -> GemmRate:
        dtype, weight_bytes = labels[op]
        median = float(np.median(times[op]))
        return GemmRate(op, dtype, ops / median / 1e9, ops / min(times[op]) / 1e9, weight_bytes / median / 1e9)

    return GemmResult(threads, m, n, k, reps, rate("MatMul"), rate("MatMulInteger"), share)


# ---------------------------------------------------------------------------------------------- script


def measure_all(threads: int) -> dict[str, Any]:
    """Every measurement at `threads` threads with default sizes, as a JSON-ready dict."""
    return {
        "threads": threads,
        "bandwidth_numpy": measure_bandwidth(threads).to_dict(),
        "bandwidth_ort": measure_bandwidth_ort(threads).to_dict(),
        "gemm": measure_gemm_peak(threads).to_dict(),
    }


def main(argv: Sequence[str]) -> int:
    """`python -m twophase.bench.roofline [THREADS ...]`: JSON of all measurements for each thread count
    (default: 1 and every CPU)."""
    try:
        counts = [int(a) for a in argv] or sorted({1, os.cpu_count() or 1})
    except ValueError:
        print("usage: python -m twophase.bench.roofline [THREADS ...]", file=sys.stderr)
        return 2
    report = {"machine": machine_info(), "runs": [measure_all(t) for t in counts]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
