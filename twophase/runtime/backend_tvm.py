"""Apache TVM backend: one Relax VM per phase library (`{phase}.so`, built by compiler/lower_tvm.py).

`TvmPhase` has the ORT backend's surface for bound-KV artifacts (`run_bound`, `decode_step`, `run`):
the cache buffers are numpy arrays shared with TVM through DLPack (no copy; the attention kernel
writes the new positions straight into them), the weights are loaded once from weights.bin into one
huge-page arena (zeroed_arena) and shared by both phases, and a decode step's small inputs live in
preallocated arrays it overwrites.

A decode step is then the same kernel calls on the same tensors every token (the context length is data,
not a shape), so `TvmDecodeStep` replays them in native code (`StepReplay`, runtime/native/step_replay.cc,
linked into the phase library by compiler/lower_tvm.py): the VM's bytecode and builtins (argument checks,
shape matching, tensor allocation: ~1,250 calls in a SmolLM2 step against 152 kernel calls) do not run per
token. The calls come from one VM run on a recording VM (`TvmPhase.replay_for`), kept as a template per
argument signature (rows, cache capacity) with the step's arguments as holes. A step replays only if that
run called no builtin but bookkeeping ones (REPLAY_SKIPPED: a shape that depends on data would need
others), no intermediate overlaps a step argument (reshaped views of one are rebuilt per step), and a
replay of the recorded step gave the VM's logits bit for bit; otherwise, and for libraries built without
the replay symbol, it runs on the VM.
"""

from __future__ import annotations

import contextlib
import ctypes
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
REPLAY_SYMBOL = "twophase_step_replay"  # runtime/native/step_replay.cc, in every phase library lower_tvm builds
# the VM builtins a replayed step leaves out: argument checks, shape bookkeeping, allocation and views (the replay
# holds the tensors they made); a step that calls any other builtin stays on the VM
REPLAY_SKIPPED = frozenset(f"vm.builtin.{name}" for name in (
    "check_tensor_info", "check_shape_info", "check_tuple_info", "check_prim_value_info", "match_shape",
    "match_prim_value", "make_shape", "make_prim_value", "null_value", "alloc_shape_heap", "alloc_storage",
    "alloc_tensor", "make_tuple", "tuple_getitem", "reshape",
))
MAX_REPLAY_TEMPLATES = 32  # per phase: one per (rows, cache capacity) seen; all dropped when more
_FFI_INT, _FFI_TENSOR = 1, 70  # TVM-FFI type indices (tvm/ffi/c_api.h): kTVMFFIInt, kTVMFFITensor


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
        from twophase.compiler.lower_tvm import usable_cores

        running = tvm.runtime.num_threads()
        if running < min(threads, usable_cores()):  # TVM sized its pool before this (config_threadpool cannot grow it)
            log.warning("TVM's thread pool in this process runs %d threads, not the %d asked for: TVM sizes it once "
                        "per process, from TVM_NUM_THREADS at its first use; load the artifact in a new process "
                        "(or set TVM_NUM_THREADS=%d before anything uses TVM)", running, threads, threads)
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
            self._module = tvm.runtime.load_module(str(path))
            self.vm = relax.VirtualMachine(self._module, tvm.cpu())
        except Exception as e:  # TVM raises plain RuntimeError / TVMError subclasses
            raise ArtifactError(f"{str(path)!r}: TVM cannot load phase {name!r} ({e}); recompile the artifact") from e
        self.main = self.vm["main"]
        self._replay_fn = replay_function(path) if replay_enabled() else None
        self._recorder: tuple[Any, list] | None = None  # (a second VM of the library, the calls it records)
        self._templates: dict[tuple, ReplayTemplate | None] = {}  # argument signature -> template (None: no replay)
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

    def replay_for(self, args: list) -> tuple[StepReplay | None, np.ndarray | None]:
        """A replay of main(*args) (a decode step's arguments), or None where it does not qualify (module doc).

        Templates are kept per argument signature (shapes, dtypes): a step like one seen before binds its
        arguments into that template at once. Otherwise this runs the step once on the recording VM, makes the
        template, and replays the step again over the same state: its logits must be the VM's, bit for bit.
        Returns (replay, that run's logits) then, and (replay or None, None) when nothing ran."""
        key = tuple(_arg_signature(a) for a in args)
        if key in self._templates:
            template = self._templates[key]
            return (template.bind(args) if template is not None else None), None
        if len(self._templates) >= MAX_REPLAY_TEMPLATES:
            self._templates.clear()
        calls, out = self.record(args)
        logits = out[0].numpy()[:, 0, :]
        template, replay, why = None, None, ""
        kernels, why = replay_plan(calls)
        if kernels is not None:
            try:
                template = ReplayTemplate(self._replay_fn, [(f, a) for _, f, a in kernels], args, out[0])
            except ValueError as e:
                why = str(e)
        if template is not None:
            replay = template.bind(args)
            output = replay.output
            output.copyfrom(np.full(output.shape, np.nan, dtype=output.dtype))  # the replay must write it
            try:
                replay.run()  # the same step again, in place: each kernel recomputes what it writes
                if not np.array_equal(output.numpy()[:, 0, :], logits):
                    why = "a replay did not give the VM's logits"
            except StepReplayError as e:
                why = str(e)
        if why:
            log.debug("phase %s: a decode step stays on the Relax VM (%s)", self.name, why)
            template = replay = None
        self._templates[key] = template
        return replay, logits

    def record(self, args: list) -> tuple[list[tuple[str, Any, list]], Any]:
        """Run main(*args) on a second VM of the library that records its calls: ([(name, function, args)], output).

        A VM of its own, so that the phase's VM never carries the recording hook, and so that the tensors it
        allocates for the recorded run are not handed out again by the phase's VM."""
        tvm = _tvm()
        from tvm import relax

        if self._recorder is None:
            vm = relax.VirtualMachine(self._module, tvm.cpu())
            calls: list = []

            def instrument(func, name, before_run, ret_value, *call_args):
                if before_run:
                    calls.append((str(name), func, list(call_args)))
                return 0

            vm.set_instrument(instrument)
            self._recorder = (vm, calls)
        vm, calls = self._recorder
        calls.clear()
        out = vm["main"](*args)
        recorded = list(calls)
        calls.clear()
        return recorded, out


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
        self.replay: StepReplay | None = None
        self._try_replay = phase._replay_fn is not None

    def run(self, tokens: np.ndarray, lengths_after: np.ndarray, query_lens: np.ndarray) -> np.ndarray:
        """One step: tokens (B,), each row's cache length after the step (B,), tokens added per row (B,)."""
        self.phase.calls += 1
        self.phase.check_ids(tokens)
        self.input_ids[:, 0] = tokens
        np.subtract(np.maximum(lengths_after, 1), 1, out=self.seqlens_k, casting="unsafe")
        self.total[...] = max(int(lengths_after.max()), 1)
        self.query_seqlens[:] = query_lens
        if self._try_replay:
            self._try_replay = False
            self.replay, logits = self.phase.replay_for(self.args)
            if logits is not None:  # this step ran while its replay was recorded
                return logits
        return self._execute()

    def run_one(self, token: int, length_after: int) -> np.ndarray | None:
        """`run` for a one-row step whose replay is recorded, from Python integers: the token and the row's cache
        length after the step. Right after a step, whose weights have evicted the interpreter's code and data from
        every cache level, each numpy call costs 10-40 us; this path makes none before the replay (SmolLM2, 2
        threads, paired: 1.02-1.05x decode tok/s). None where it does not apply (the caller then takes `run`)."""
        if self.rows != 1 or self.replay is None or length_after < 1:
            return None
        vocab = self.phase.vocab_size
        if isinstance(vocab, int) and not 0 <= token < vocab:
            raise TwophaseError(f"token ids must be in [0, {vocab}), got {token}..{token}")
        self.phase.calls += 1
        self.input_ids[0, 0] = token
        self.seqlens_k[0] = length_after - 1
        self.total[()] = length_after
        self.query_seqlens[0] = 1
        return self._execute()

    def _execute(self) -> np.ndarray:
        """The step over its filled inputs: replayed, or on the VM (no replay, or one whose kernel failed)."""
        if self.replay is not None:
            try:
                self.replay.run()
                return self.replay.logits[:, 0, :].copy()
            except StepReplayError as e:  # the VM runs the step again and raises what the kernel raised
                log.warning("%s; running this decode step on the Relax VM from now on", e)
                self.replay = None
        out = self.phase.main(*self.args)
        return out[0].numpy()[:, 0, :]


class StepReplayError(TwophaseError):
    """A kernel call of a replayed step failed."""


class ReplayTemplate:
    """The kernel calls of one recorded VM run of a step, with the step's arguments as holes (module doc).

    `calls`: [(function, args)] as recorded (tensors or ints); `inputs`: the step's arguments of that run.
    Every call argument is one of `inputs` (a hole, filled per step), a view inside one of them (a reshape:
    made anew over each step's input), or a tensor the VM allocated for the run (an intermediate, or
    `output`, where the logits land): those are held here and shared by the steps made from this template,
    which run one at a time. Raises ValueError when a tensor overlaps an input without lying inside it."""

    def __init__(self, replay_fn: Any, calls: list[tuple[Any, list]], inputs: list, output: Any) -> None:
        self.replay_fn = replay_fn
        self.output = output
        self._keep = calls  # the native arrays borrow these functions and tensors
        self.calls = len(calls)
        self.offsets = np.cumsum([0] + [len(args) for _, args in calls]).astype(np.int32)
        self.funcs = np.array([f.__chandle__() for f, _ in calls], dtype=np.uint64)
        index = {a.__chandle__(): i for i, a in enumerate(inputs)}
        spans = [(a.data_ptr(), a.data_ptr() + _nbytes(a)) for a in inputs]
        flat = [a for _, args in calls for a in args]
        self.args = np.zeros(len(flat), dtype=[("type_index", "<i4"), ("zero_padding", "<u4"), ("v_int64", "<i8")])
        holes, fills = [], []
        self.views: list[tuple[int, int, tuple, str, int]] = []  # (slot, input, shape, dtype, byte offset)
        for slot, arg in enumerate(flat):
            if isinstance(arg, int):
                self.args[slot] = (_FFI_INT, 0, arg)
                continue
            self.args[slot] = (_FFI_TENSOR, 0, arg.__chandle__())
            if (i := index.get(arg.__chandle__())) is not None:
                holes.append(slot)
                fills.append(i)
                continue
            start, end = arg.data_ptr(), arg.data_ptr() + _nbytes(arg)
            for i, (lo, hi) in enumerate(spans):
                if lo <= start and end <= hi:  # a view of input i (a reshape): made anew over each step's input
                    self.views.append((slot, i, tuple(arg.shape), str(arg.dtype), start - lo))
                    break
                if lo < end and start < hi:
                    raise ValueError("a kernel argument overlaps a step input without lying inside it")
        self.holes = np.array(holes, dtype=np.int64)
        self.fills = np.array(fills, dtype=np.int64)

    def bind(self, inputs: list) -> StepReplay:
        return StepReplay(self, inputs)


class StepReplay:
    """A template's calls with one step's arguments in its holes, run by `twophase_step_replay`."""

    def __init__(self, template: ReplayTemplate, inputs: list) -> None:
        self.template = template
        self.output = template.output
        self.calls = template.calls
        self._inputs = inputs  # the native array borrows them
        args = template.args.copy()
        handles = np.array([a.__chandle__() for a in inputs], dtype=np.int64)
        args["v_int64"][template.holes] = handles[template.fills]
        # the logits as numpy over the output tensor's memory; a step returns a copy. Tensor.numpy() took about
        # 95 us per SmolLM2 step (49,152 logits) where this copy takes 25: 1.045x decode tok/s, paired
        self.logits = np.from_dlpack(template.output)
        self._views = [inputs[i]._create_view(shape, dtype, offset) for _, i, shape, dtype, offset in template.views]
        for (slot, *_), view in zip(template.views, self._views):
            args["v_int64"][slot] = view.__chandle__()
        self._args = args
        self._fn = template.replay_fn
        self._call = (ctypes.c_int32(template.calls), template.funcs.ctypes.data, template.offsets.ctypes.data,
                      args.ctypes.data)

    def run(self) -> None:
        failed = self._fn(*self._call)
        if failed:
            _drop_raised_error()
            raise StepReplayError(f"call {failed - 1} of {self.calls} of a replayed decode step failed")


def replay_function(library: Path) -> Any | None:
    """The library's twophase_step_replay (ctypes), or None (a library built before it existed)."""
    try:
        fn = getattr(ctypes.CDLL(str(library)), REPLAY_SYMBOL)  # TVM loaded it already: the same handle
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


def replay_enabled() -> bool:
    """TWOPHASE_TVM_REPLAY=0 when a phase loads keeps its decode steps on the Relax VM (for comparisons)."""
    return os.environ.get("TWOPHASE_TVM_REPLAY", "1") != "0"


def replay_plan(calls: list[tuple[str, Any, list]]) -> tuple[list | None, str]:
    """The calls a replay runs (the library's functions; REPLAY_SKIPPED builtins left out), or None and why not."""
    import tvm_ffi

    kernels = []
    for name, func, args in calls:
        if name in REPLAY_SKIPPED:
            continue
        if name.startswith("vm.builtin.") or not isinstance(func, tvm_ffi.Function):
            return None, f"it calls {name}"
        for a in args:
            if not (isinstance(a, int) and not isinstance(a, bool)) and not isinstance(a, tvm_ffi.Tensor):
                return None, f"{name} takes a {type(a).__name__}"
        kernels.append((name, func, args))
    if not kernels:
        return None, "it calls no kernel"
    return kernels, ""


def _arg_signature(arg: Any) -> tuple:
    return ("int", arg) if isinstance(arg, int) else (tuple(arg.shape), str(arg.dtype))


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel()) * np.dtype(str(tensor.dtype)).itemsize


def _drop_raised_error() -> None:
    """Take the failed kernel's error out of TVM-FFI's thread-local slot (the VM's rerun raises it anew)."""
    with contextlib.suppress(OSError, AttributeError):
        move = ctypes.CDLL(None).TVMFFIErrorMoveFromRaised
        handle = ctypes.c_void_p()
        move(ctypes.byref(handle))
        if handle.value:
            ctypes.CDLL(None).TVMFFIObjectDecRef(handle)


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
