"""Lowering to Apache TVM: each phase graph -> a Relax VM executable (`{phase}.so`) + shared weights.

The phase graphs arrive from the TVM pipeline in standard ops plus two kinds of nodes TVM's ONNX
importer does not know, which this module converts itself:

    twophase.tvm.QMatMul / QGather   (FuseTVMKernelsPass) -> R.call_tir to the scheduled kernels of
                                      twophase/kernels/tir (dequantize inside the matmul, weights stay
                                      4- or 8-bit in memory); a QMatMul may carry a fused prologue
                                      (RMSNorm or SwiGLU of its input) and a residual add
                                      (FuseTVMElementwisePass, kernels/tir/fusion.py), and packed
                                      q/k/v or gate/up weights (PackProjectionsPass). Rank-3 inputs
                                      [batch, seq, K] call the kernel's rank-3 entry directly, so no
                                      reshape runs between the kernels of a step.
    twophase.tvm.QMatMulA8           (FuseTVMKernelsPass, W8A8) -> R.call_tir to the integer GEMM of
                                      kernels/tir/qmatmul_int8.py (quantizes the activation itself), in
                                      the variant the build target's SIMD features allow (vpdpbusd, vpmaddwd)
    com.microsoft.GroupQueryAttention (BindKVCachePass)    -> R.call_tir_inplace to the attention kernel,
                                      which writes the new K/V rows straight into the bound cache buffers
                                      (separate q/k/v or one packed QKV input)

Shapes stay symbolic (batch, sequence, cache capacity): the graphs have no shape arithmetic left once
attention is one node, so one executable serves every batch size and prompt length. Weights (every
initializer of at least SIZE_THRESHOLD bytes) become trailing function parameters instead of
constants, are written once to `weights.bin` (shared by the phases, content-addressed as for ORT)
and indexed per phase in `{phase}.params.json`; the .so holds code and small constants only, plus the
runtime's replay of a recorded decode step (runtime/native/step_replay.cc, see runtime/backend_tvm.py).

Relax pipeline (`relax_pipeline`): the CPU backend's library dispatch and legalization (LegalizeOps,
AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR: whatever elementwise work the kernels did not
absorb fuses into single loops), dataflow lowering and memory planning. With the fusions on, a decode
step of a Llama layer is four matmul calls and one attention call and nothing else. The kernels are marked
scheduled and opaque, so fusion leaves them whole.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import operator
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir

from twophase.compiler.errors import PassError, TwophaseError, UnsupportedModelError
from twophase.compiler.lower_ort import WEIGHTS_FILE, WeightsStats, tensor_spec, write_blob
from twophase.compiler.manifest import TensorSpec

log = logging.getLogger(__name__)

SIZE_THRESHOLD = 1024  # bytes: larger initializers are function parameters (weights.bin), smaller constants
PREFILL_GEMV_ROWS = 4  # the prefill library's int8 GEMV row limit (`gemv_rows_for`)
PREFETCH_ENV = "TWOPHASE_TVM_PREFETCH"  # "auto" (default: measured, `prefetch_entry`) or a distance in bytes (0: none)
# linked into every phase library: the runtime's native replay of a recorded decode step (runtime/backend_tvm.py)
STEP_REPLAY_SOURCE = Path(__file__).resolve().parent.parent / "runtime" / "native" / "step_replay.cc"


def require_tvm():
    try:
        import tvm
    except ImportError as e:
        raise UnsupportedModelError(
            "the TVM backend needs Apache TVM: pip install 'twophase[tvm]' "
            "(apache-tvm==0.27.0.post1 with apache-tvm-ffi==0.1.14.post1)"
        ) from e
    return tvm


# SIMD features the generated code may use; a library built where they exist needs them where it runs.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd",
              "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx_vnni")


def cpu_flags() -> list[str]:
    """This machine's SIMD flags (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [f for f in SIMD_FLAGS if f in have]


def host_target(device: str = "cpu") -> dict:
    """The manifest's target entry for this machine: {"tvm_target": LLVM for the host CPU, "cpu_flags": [...]}."""
    tvm = require_tvm()
    if device != "cpu":
        raise UnsupportedModelError(
            f"the TVM backend compiles for the CPU only in this build (device {device!r}); use --backend ort for CUDA"
        )
    return {"tvm_target": {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())},
            "cpu_flags": cpu_flags()}


def prefetch_entry(tvm_target: dict) -> dict:
    """The target entry's software prefetch setting for the int8 GEMV and the attention kernels:
    {"prefetch_bytes": distance (0: none), "prefetch_speedup": the probe's measured speedup, or None where
    TWOPHASE_TVM_PREFETCH set the distance}. Whether prefetches pay differs between machines of one CPU vendor
    (qgemv_a8.PREFETCH_BYTES), so by default it is measured here, once per process (qgemv_a8.probe_prefetch)."""
    value = os.environ.get(PREFETCH_ENV, "auto").strip()
    if value == "auto":
        probe = _probe_prefetch(json.dumps(tvm_target, sort_keys=True))
        return {"prefetch_bytes": probe.prefetch_bytes, "prefetch_speedup": probe.speedup}
    try:
        distance = int(value)
    except ValueError:
        distance = -1
    if distance < 0:
        raise TwophaseError(f"{PREFETCH_ENV} must be 'auto' or a distance in bytes >= 0, got {value!r}")
    return {"prefetch_bytes": distance, "prefetch_speedup": None}


@functools.cache
def _probe_prefetch(tvm_target: str):
    from twophase.kernels.tir.qgemv_a8 import PREFETCH_BYTES, probe_prefetch
    from twophase.kernels.tir.qmatmul_int8 import isa_for_target

    target = json.loads(tvm_target)
    probe = probe_prefetch(target, isa_for_target(target))
    log.info("software prefetch probe: %.3fx with %d B ahead; building with %d B", probe.speedup, PREFETCH_BYTES,
             probe.prefetch_bytes)
    return probe


@dataclasses.dataclass(frozen=True)
class LoweredTVMPhase:
    library: str  # {phase}.so
    params: str  # {phase}.params.json
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compile_seconds: float


def lower_phases(
    models: dict[str, ir.Model], out_dir: Path, target_entry: dict
) -> tuple[dict[str, LoweredTVMPhase], WeightsStats]:
    """Build `{phase}.so` and `{phase}.params.json` for each model, and the shared weights.bin, in `out_dir`."""
    from twophase.bench.model_bytes import row_read_names  # the rule benchmarks count a step's bytes by

    tvm = require_tvm()
    target = target_entry["tvm_target"]
    out_dir = Path(out_dir)
    stats = WeightsStats()
    written: dict[bytes, tuple[int, int]] = {}
    lowered: dict[str, LoweredTVMPhase] = {}
    with open(out_dir / WEIGHTS_FILE, "wb") as weights:
        for phase, model in models.items():
            start = time.perf_counter()
            inputs = tuple(tensor_spec(v) for v in model.graph.inputs)
            outputs = tuple(tensor_spec(v) for v in model.graph.outputs)
            proto, params = graph_for_import(model)
            mod = import_relax(proto, target, gemv_rows=gemv_rows_for(phase),
                               prefetch=int(target_entry.get("prefetch_bytes", 0)))
            executable = tvm.compile(mod, target=tvm.target.Target(target), relax_pipeline=relax_pipeline(target))
            library = f"{phase}.so"
            executable.export_library(str(out_dir / library), addons=[str(STEP_REPLAY_SOURCE)])
            by_row = row_read_names((n.op_type, [v.name if v is not None else "" for v in n.inputs])
                                    for n in model.graph.all_nodes())
            index = [_write_param(name, array, weights, written, stats, name in by_row) for name, array in params]
            params_file = f"{phase}.params.json"
            (out_dir / params_file).write_text(json.dumps({"weights": WEIGHTS_FILE, "params": index}, indent=1))
            seconds = time.perf_counter() - start
            log.info("%s: TVM build in %.1fs (%d weight parameters)", phase, seconds, len(params))
            lowered[phase] = LoweredTVMPhase(library, params_file, inputs, outputs, round(seconds, 2))
    return lowered, stats


def graph_for_import(model: ir.Model) -> tuple[object, list[tuple[str, np.ndarray]]]:
    """The ONNX proto TVM imports: large initializers moved to trailing graph inputs (weights), in order."""
    model = model.clone()
    graph = model.graph
    params: list[tuple[str, np.ndarray]] = []
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes < SIZE_THRESHOLD:
            continue
        params.append((name, np.ascontiguousarray(tensor.numpy())))
        graph.initializers.pop(name)
        value.const_value = None
        value.shape = ir.Shape(tensor.shape)
        value.type = ir.TensorType(tensor.dtype)
        graph.inputs.append(value)
    return ir.to_proto(model), params


def gemv_rows_for(phase: str) -> int:
    """Rows up to which the phase's int8-activation GEMV runs (accuracy level 4): a decode step of up to
    qgemv_a8.MAX_M (16) rows, so every row of a batch gets the arithmetic it gets alone; a prefill keeps the
    GEMM's float activations from PREFILL_GEMV_ROWS + 1 tokens on (where they have always started)."""
    from twophase.kernels.tir import qgemv_a8

    return qgemv_a8.MAX_M if phase == "decode" else PREFILL_GEMV_ROWS


def import_relax(proto, target: dict | None = None, gemv_rows: int | None = None, prefetch: int = 0) -> object:
    """TVM's ONNX importer with twophase's converters for the nodes it does not know; `target` (default:
    this machine's) picks the kernel variants that depend on SIMD features; `gemv_rows` (default
    qgemv_a8.MAX_M): rows up to which a QMatMul with int8 activations runs the GEMV (`gemv_rows_for`);
    `prefetch`: the int8 GEMV's and the attention's software prefetch distance (`prefetch_entry`; 0: none)."""
    from tvm.relax.frontend.onnx import from_onnx

    from twophase.kernels.tir.qmatmul_int8 import isa_for_target

    target = target if target is not None else host_target()["tvm_target"]
    isa = isa_for_target(target)
    with _converters(isa, gemv_rows, prefetch), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)  # dots -> underscores
        try:
            return from_onnx(proto, keep_params_in_input=False, sanitize_input_names=True)
        except TwophaseError:  # a twophase converter's own refusal names the problem already
            raise
        except Exception as e:  # the importer raises bare TVM / Python errors
            raise PassError(f"TVM's ONNX importer refused the phase graph ({type(e).__name__}: {str(e)[:500]})") from e


def relax_pipeline(target: dict):
    """The named Relax pipeline of the TVM target (module doc): the CPU backend's passes, in order."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    t = tvm.target.Target(target)

    @tvm.transform.module_pass(opt_level=0, name="twophase_tvm_cpu")
    def pipeline(mod, _ctx):
        with t:
            passes = (
                cpu_generic.library_dispatch_passes(t)
                + cpu_generic.legalize_passes(t)
                + [relax.transform.DeadCodeElimination()]
                + cpu_generic.dataflow_lower_passes(t)
                + cpu_generic.finalize_passes(t)
            )
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


# --- converters -------------------------------------------------------------------------------------


@contextmanager
def _converters(isa, gemv_rows: int | None = None, prefetch: int = 0) -> Iterator[None]:
    """Register QMatMul, QMatMulA8, QGather and GroupQueryAttention converters with the ONNX importer while
    it runs; `isa` (qmatmul_int8.Isa) is the integer kernels' variant, `gemv_rows` the int8 GEMV's row limit,
    `prefetch` the software prefetch distance of the int8 GEMV and the attention (`prefetch_entry`)."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    original = frontend._get_convert_map
    kernels: dict[tuple, object] = {}  # (kind, spec) -> GlobalVar, one PrimFunc per distinct kernel
    extra = {
        "QMatMul": _qmatmul_converter(frontend, kernels, isa, gemv_rows, prefetch),
        "QMatMulA8": _qmatmul_a8_converter(frontend, kernels, isa),
        "QGather": _qgather_converter(frontend, kernels),
        "GroupQueryAttention": _gqa_converter(frontend, kernels, prefetch),
    }

    def convert_map():
        return {**original(), **extra}

    frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        frontend._get_convert_map = original


def _kernel(bb, kernels: dict, key: tuple, name: str, build):
    """One PrimFunc per distinct kernel `key`; names stay unique (kernels that differ only in e.g. a norm's
    epsilon get a numbered suffix)."""
    if key not in kernels:
        taken = {gv.name_hint for gv in kernels.values()}
        unique, i = name, 1
        while unique in taken:
            unique, i = f"{name}_{i}", i + 1
        func = build().with_attr("global_symbol", unique)
        kernels[key] = bb.add_func(func, unique)
    return kernels[key]


def _flatten_rows(bb, x, last: int):
    """x [..., last] -> (x2 [M, last], leading dims)."""
    from tvm import relax

    x = bb.normalize(x)
    dims = list(x.ty.shape.values)
    lead = dims[:-1]
    M = functools.reduce(operator.mul, lead) if lead else 1
    x2 = bb.normalize(relax.op.reshape(x, relax.ShapeExpr([M, last])))
    return x2, lead, M


def _qmatmul_converter(frontend, kernels: dict, isa, gemv_rows: int | None = None, gemv_prefetch: int = 0):
    from tvm import relax

    from twophase.kernels.tir import qgemv_a8, qmatmul
    from twophase.kernels.tir.fusion import Fusion, Prologue
    from twophase.kernels.tir.qmatmul import QMatMulSpec

    class QMatMul(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            spec = QMatMulSpec(
                int(attr["bits"]), int(attr["K"]), int(attr["N"]), int(attr.get("block_size", 0)) or None,
                bool(attr.get("has_offset", 0)), int(attr.get("zero", 0)),
            )
            fusion = Fusion.from_attrs(attr)
            n = len(qmatmul.param_specs(spec))
            x, packed, rest = inputs[0], list(inputs[1 : 1 + n]), list(inputs[1 + n :])
            gamma = [bb.normalize(rest.pop(0))] if fusion.prologue is Prologue.RMS_NORM else []
            x = bb.normalize(x)
            dims = list(x.ty.shape.values)
            rank = 3 if len(dims) == 3 else 2  # [B, T, K] as it comes (no reshapes in the VM), else rows
            if int(attr.get("act_int8", 0)):  # accuracy_level 4: int8 activations up to `rows` rows
                a8 = qgemv_a8.QGemvA8Spec.of(spec)
                rows = gemv_rows or qgemv_a8.MAX_M
                gv = _kernel(bb, kernels, ("qgemv_a8", spec, isa, fusion, rank, rows, gemv_prefetch),
                             qgemv_a8.default_name(a8, isa, fusion) + f"_r{rank}",
                             lambda: qgemv_a8.prim_func(a8, isa=isa, fusion=fusion, rank=rank, max_rows=rows,
                                                        prefetch_bytes=gemv_prefetch))
            else:
                gv = _kernel(bb, kernels, ("qmatmul", spec, fusion, rank), qmatmul.default_name(spec, fusion) + f"_r{rank}",
                             lambda: qmatmul.prim_func(spec, fusion=fusion, rank=rank))
            if rank == 3:
                residual = [bb.normalize(rest.pop(0))] if fusion.residual else []
                return relax.call_tir(gv, [x, *gamma, *packed, *residual],
                                      out_ty=relax.TensorType([*dims[:2], spec.N], "float32"))
            x2, lead, M = _flatten_rows(bb, x, fusion.x_width(spec.K))
            residual = [_flatten_rows(bb, rest.pop(0), spec.N)[0]] if fusion.residual else []
            y = bb.emit(relax.call_tir(gv, [x2, *gamma, *packed, *residual],
                                       out_ty=relax.TensorType([M, spec.N], "float32")))
            return relax.op.reshape(y, relax.ShapeExpr([*lead, spec.N]))

    return QMatMul


def _text(value) -> str:
    """A string attribute as the ONNX importer hands it over (str or bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _qmatmul_a8_converter(frontend, kernels: dict, isa):
    from tvm import relax

    from twophase.kernels.tir.qmatmul_int8 import ActQuant, QMatMulA8Spec, default_name, prim_func

    class QMatMulA8(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            act = _text(attr["act"])
            spec = QMatMulA8Spec(int(attr["K"]), int(attr["N"]), ActQuant(act))
            x, codes, scale = inputs[0], inputs[1], inputs[2]
            extra = []
            if spec.act is ActQuant.STATIC:  # the scalar scale constant as float32 [1]
                extra = [bb.normalize(relax.op.reshape(bb.normalize(inputs[3]), relax.ShapeExpr([1])))]
            gv = _kernel(bb, kernels, ("qmatmul_a8", spec, isa), default_name(spec, isa),
                         lambda: prim_func(spec, isa=isa))
            x2, lead, M = _flatten_rows(bb, x, spec.K)
            y = bb.emit(relax.call_tir(gv, [x2, codes, scale, *extra], out_ty=relax.TensorType([M, spec.N], "float32")))
            return relax.op.reshape(y, relax.ShapeExpr([*lead, spec.N]))

    return QMatMulA8


def _qgather_converter(frontend, kernels: dict):
    from tvm import relax

    from twophase.kernels.tir.gather import gather_prim_func

    class QGather(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            table, ids, *rest = (bb.normalize(v) for v in inputs if v is not None)
            bits, D, has_offset = int(attr["bits"]), int(attr["D"]), bool(attr.get("has_offset", 0))
            V = int(table.ty.shape.values[0])
            G = int(rest[0].ty.shape.values[1])
            name = f"qgather_b{bits}_v{V}_d{D}_g{G}_o{int(has_offset)}"
            gv = _kernel(bb, kernels, ("qgather", bits, V, D, G, has_offset), name,
                         lambda: gather_prim_func(bits, V, D, G, has_offset))
            dims = list(ids.ty.shape.values)
            n = functools.reduce(operator.mul, dims) if dims else 1
            flat = bb.normalize(relax.op.reshape(ids, relax.ShapeExpr([n])))
            if flat.ty.dtype != "int64":
                flat = bb.normalize(relax.op.astype(flat, "int64"))
            out = bb.emit(relax.call_tir(gv, [table, flat, *rest], out_ty=relax.TensorType([n, D], "float32")))
            return relax.op.reshape(out, relax.ShapeExpr([*dims, D]))

    return QGather


def attention_split_tasks() -> int:
    """The attention kernel's split_tasks: two tasks per core this process may run on (the library is built
    for the host CPU; kernels/tir/attention.py explains the choice)."""
    return 2 * usable_cores()


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _gqa_converter(frontend, kernels: dict, prefetch: int = 0):
    from tvm import relax

    from twophase.kernels.tir.attention import gqa_prim_func

    class GroupQueryAttention(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            quant = {_text(attr.get(f"{kv}_quant_type", "NONE")) for kv in ("k", "v")}
            int8 = quant == {"PER_CHANNEL"} and int(attr.get("kv_cache_bit_width", 8)) == 8
            if quant != {"NONE"} and not int8:
                raise UnsupportedModelError(
                    f"the TVM attention kernel takes a float32 cache or an int8 one with per-channel scales "
                    f"(BindKVCachePass's), not k/v quant types {sorted(quant)} at "
                    f"{attr.get('kv_cache_bit_width')} bits"
                )
            if not attr.get("do_rotary", 0):
                raise UnsupportedModelError("the TVM attention kernel expects the rotary embedding inside (do_rotary=1)")
            inputs = [None if v is None else bb.normalize(v) for v in inputs]
            q, k, v, past_k, past_v, seqlens_k, _total, cos, sin = inputs[:9]
            query_seqlens = inputs[16] if len(inputs) > 16 else None
            scales = [inputs[12], inputs[13]] if int8 else []
            if int8 and (any(x is None for x in scales) or past_k.ty.dtype != "int8"):
                raise UnsupportedModelError("an int8 KV cache needs int8 cache buffers and k_scale / v_scale inputs")
            packed = k is None and v is None  # packed QKV (PackProjectionsPass)
            if (k is None) != (v is None) or query_seqlens is None:
                raise UnsupportedModelError(
                    "the TVM attention kernel needs q, k, v (separate or packed) and query_seqlens (BindKVCachePass's form)"
                )
            heads, kv_heads = int(attr["num_heads"]), int(attr["kv_num_heads"])
            head_dim = int(past_k.ty.shape.values[3])
            scale = attr.get("scale")
            scale = None if not scale else float(scale)
            softcap = float(attr.get("softcap", 0.0) or 0.0)
            interleaved = bool(attr.get("rotary_interleaved", 0))
            split = attention_split_tasks()
            kv_dtype = "int8" if int8 else "float32"
            key = ("gqa", heads, kv_heads, head_dim, scale, softcap, interleaved, packed, split, kv_dtype, prefetch)
            name = f"gqa_h{heads}_kv{kv_heads}_d{head_dim}" + ("_il" if interleaved else "") + ("_qkv" if packed else "")
            name += "_kv8" if int8 else ""
            gv = _kernel(bb, kernels, key, name, lambda: gqa_prim_func(
                heads, kv_heads, head_dim, scale=scale, softcap=softcap, interleaved=interleaved, packed=packed,
                split_tasks=split, kv_dtype=kv_dtype, prefetch_bytes=prefetch))
            B, S = q.ty.shape.values[:2]
            out_sinfo = [relax.TensorType([B, S, heads * head_dim], "float32"), past_k.ty, past_v.ty]
            qkv = [q] if packed else [q, k, v]
            caches = len(qkv)
            return bb.emit(relax.call_tir_inplace(
                gv, [*qkv, past_k, past_v, seqlens_k, cos, sin, *scales, query_seqlens], [-1, caches, caches + 1],
                out_sinfo
            ))

    return GroupQueryAttention


# --- weights ----------------------------------------------------------------------------------------


def _write_param(name: str, array: np.ndarray, weights, written: dict, stats: WeightsStats, rows: bool) -> dict:
    """The parameter's index entry; `rows`: a step reads it by row (an embedding table, rotary tables), not whole."""
    offset, length = write_blob(f"{array.dtype}|{array.shape}", array.tobytes(), weights, written, stats)
    entry = {"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset, "length": length}
    return entry | {"rows": True} if rows else entry
