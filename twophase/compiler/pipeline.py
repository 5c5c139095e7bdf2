"""Named pass pipelines, one per target, assembled from per-phase pass lists.

A pipeline maps the canonical graph to one phase's graph:

    SplitPhasesPass -> CleanupPass -> [quantization for the phase's scheme] -> [target fusion]
                    -> [BindKVCachePass (ORT, bound KV binding)]
                    -> [FuseSkipNormPass -> PackProjectionsPass (ORT fusions)] -> CleanupPass

    fp32   nothing more
    w8a16  QuantizeWeightsPass(int8, per channel)        -> FuseDequantMatMulPass (MatMulNBits 8-bit)
    w4a16  QuantizeWeightsPass(int4, blocked; RTN, GPTQ,   -> FuseDequantMatMulPass (MatMulNBits 4-bit)
                                or the GGUF grid)
    w8a8   QuantizeActivationsPass(dynamic | static,      -> FuseInt8MatMulPass (ORT integer GEMM)
                                   optional SmoothQuant)
           then the lm_head (one position in prefill) and the embedding in decode's weight-only format

The TVM target (lower_tvm.py) keeps the QDQ form until its last step:

    SplitPhasesPass -> CleanupPass -> [QuantizeActivationsPass (w8a8, prefill only)]
                    -> [QuantizeWeightsPass (w8a16, w4a16; for w8a8 the lm_head and embedding in decode's format)]
                    -> BindKVCachePass -> FuseTVMKernelsPass (twophase.tvm kernels)
                    -> [PackProjectionsPass -> FuseTVMElementwisePass (norms, SwiGLU, residual adds into the
                        kernels)] -> CleanupPass

Passes that need calibration statistics are built just before they run, from the graph at that point
(`Calibration` computes the statistics once per compile and shares them between phases: the weights
and activations they describe are the same). Each pass that runs is recorded with its time and its
graph diff, which the artifact's report.json carries.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from twophase.compiler.errors import UnsupportedModelError
from twophase.compiler.graph_diff import diff_models
from twophase.compiler.manifest import ModelFacts
from twophase.compiler.options import (
    ActivationMode,
    CompileOptions,
    KVBinding,
    KVDtype,
    Phase,
    PhaseOptions,
    QuantScheme,
    WeightAlgorithm,
)
from twophase.passes.cleanup import CleanupPass
from twophase.passes.split_phases import SplitPhasesPass

log = logging.getLogger(__name__)

WEIGHT_ONLY = (QuantScheme.W8A16, QuantScheme.W4A16)

# A pipeline step: a pass, or a function building one from the graph it will run on.
Step = ir.passes.PassBase | Callable[[ir.Model], ir.passes.PassBase]


@dataclasses.dataclass(frozen=True)
class PassRecord:
    phase: str
    name: str
    modified: bool
    seconds: float
    diff: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Calibration:
    """Calibration statistics of one compile, computed on first use (see compiler/calibration.py).

    They are collected on the canonical graph (full windows; the decode graph takes one token) and
    keyed by weight initializer name, which every phase graph shares with it.
    """

    def __init__(self, canonical: ir.Model, tokenizer_json: Path | None, options: CompileOptions) -> None:
        self.canonical = canonical
        self.tokenizer_json = tokenizer_json
        self.options = options
        self.needs_hessian = any(
            options.phase(p).algorithm is WeightAlgorithm.GPTQ and options.phase(p).scheme is QuantScheme.W4A16
            for p in Phase
        )
        self._stats = None
        self._kv_scales: dict | None = None
        self.seconds = 0.0
        self.codes: dict = {}  # (weight name, format) -> QuantizedWeight, shared by the phases

    def _windows(self) -> list:
        from twophase.compiler.corpus import default_calibration_windows

        if self.tokenizer_json is None:
            raise UnsupportedModelError(
                "calibration (static w8a8, SmoothQuant, GPTQ, int8 KV cache) needs the model's tokenizer to "
                "read the calibration text; this source has no tokenizer.json"
            )
        return default_calibration_windows(
            self.tokenizer_json, self.options.calibration_windows, self.options.calibration_tokens
        )

    def stats(self) -> dict:
        """{weight initializer name: MatMulStats}, from the canonical graph run on calibration text."""
        if self._stats is None:
            from twophase.compiler.calibration import collect_matmul_stats

            start = time.perf_counter()
            self._stats = collect_matmul_stats(self.canonical, self._windows(), hessian=self.needs_hessian)
            self.seconds += time.perf_counter() - start
            log.info("calibration statistics in %.1fs", self.seconds)
        return self._stats

    def kv_scales(self) -> dict:
        """{layer: (key scale, value scale)}, each [kv_heads, head_dim]: absmax / 127 of the float cache."""
        if self._kv_scales is None:
            from twophase.compiler.calibration import collect_kv_absmax

            start = time.perf_counter()
            absmax = collect_kv_absmax(self.canonical, self._windows())
            tiny = np.float32(1e-8)  # an all-zero channel still needs a positive scale
            self._kv_scales = {i: (np.maximum(k / 127, tiny), np.maximum(v / 127, tiny)) for i, (k, v) in absmax.items()}
            self.seconds += time.perf_counter() - start
        return self._kv_scales

    def activation_absmax(self, model: ir.Model) -> dict:
        """{name of each weighted MatMul's activation input in `model`: per-channel absmax [K]}."""
        from twophase.compiler.calibration import weighted_matmuls

        stats = self.stats()
        return {n.inputs[0].name: stats[n.inputs[1].name].absmax_K for n in weighted_matmuls(model.graph)
                if n.inputs[1].name in stats}


def _weight_quantizer(po: PhaseOptions, calibration: Calibration):
    if po.algorithm is WeightAlgorithm.GPTQ:
        from twophase.compiler.calibration import hessians
        from twophase.kernels.gptq import gptq_quantizer

        key = (po.scheme.weight_bits, po.block_size, po.symmetric)
        gptq = gptq_quantizer(
            hessians(calibration.stats()), bits=po.scheme.weight_bits, block_size=po.block_size,
            symmetric=po.symmetric,
        )

        def cached(name: str, W_KN):
            # GPTQ is deterministic and the phases share weights: quantize each weight once per compile
            if (name, key) not in calibration.codes:
                calibration.codes[(name, key)] = gptq(name, W_KN)
            return calibration.codes[(name, key)]

        return cached
    return None


def _activation_pass(po: PhaseOptions, calibration: Calibration, model: ir.Model) -> ir.passes.PassBase:
    """w8a8's activation quantization. Static mode keeps per-token scales for the MatMuls whose input is
    wider than the hidden size (the MLP down projections: their inputs have rare outliers up to ~1e4 times
    the mean, which no single per-tensor scale serves), with their own SmoothQuant alpha."""
    from twophase.compiler.calibration import weighted_matmuls
    from twophase.compiler.defaults import PER_TOKEN_SMOOTHQUANT_ALPHA
    from twophase.passes.quantize_activations import (
        QuantizeActivationsPass,
        input_wider_than,
        produces_graph_output,
    )

    static = po.activations is ActivationMode.STATIC
    needs_stats = static or po.smoothquant_alpha is not None
    kwargs = {}
    if static:
        hidden = ModelFacts.from_metadata(dict(model.metadata_props)).hidden_size
        if hidden is None:
            hidden = min(n.inputs[1].shape[0] for n in weighted_matmuls(model.graph))
        kwargs = {"per_token": input_wider_than(hidden)}
        if po.smoothquant_alpha is not None:
            kwargs["per_token_smoothquant_alpha"] = PER_TOKEN_SMOOTHQUANT_ALPHA
    return QuantizeActivationsPass(
        po.activations,
        calibration.activation_absmax(model) if needs_stats else None,
        po.smoothquant_alpha,
        skip=produces_graph_output,
        **kwargs,
    )


def _weight_only_options(po: PhaseOptions, options: CompileOptions) -> PhaseOptions | None:
    """The weight-only format of a phase: its own scheme, or, for the MatMuls w8a8 leaves in float (the
    lm_head, one position in prefill) and the embedding, the decode phase's, so both phases share those weights."""
    if po.scheme in WEIGHT_ONLY:
        return po
    if po.scheme is QuantScheme.W8A8 and options.decode.scheme in WEIGHT_ONLY:
        return options.decode
    return None


def _quantize_weights_step(weight_po: PhaseOptions, calibration: Calibration) -> Step:
    from twophase.passes.quantize_weights import QuantizeWeightsPass

    if weight_po.algorithm is WeightAlgorithm.GPTQ and weight_po.scheme is not QuantScheme.W4A16:
        raise UnsupportedModelError("gptq is implemented for w4a16; use rtn for w8a16")
    return lambda m: QuantizeWeightsPass.from_options(weight_po, _weight_quantizer(weight_po, calibration))


def _bind_kv_step(options: CompileOptions, calibration: Calibration) -> Step:
    """BindKVCachePass at options.max_len with options.kv_dtype; an int8 cache's scales are calibrated when the
    step runs (both targets bind the cache the same way)."""
    from twophase.passes.bind_kv_cache import BindKVCachePass

    if options.max_len is None:
        raise UnsupportedModelError("a bound KV cache needs max_len (the driver resolves it)")
    int8 = options.kv_dtype is KVDtype.INT8
    return lambda m: BindKVCachePass(
        options.max_len, kv_dtype=options.kv_dtype.value, kv_scales=calibration.kv_scales() if int8 else None
    )


def _ort_phase_passes(phase: Phase, options: CompileOptions, calibration: Calibration) -> list[Step]:
    po = options.phase(phase)
    steps: list[Step] = [SplitPhasesPass(phase), CleanupPass()]
    if po.scheme is QuantScheme.W8A8:
        from twophase.passes.fuse_int8_matmul import FuseInt8MatMulPass

        # The lm_head runs on one position in prefill (a GEMV): it is left to the weight-only step below.
        steps.append(lambda m: _activation_pass(po, calibration, m))
        steps.append(FuseInt8MatMulPass())
    weight_po = _weight_only_options(po, options)
    if weight_po is not None:
        from twophase.passes.fuse_dequant_matmul import FuseDequantMatMulPass

        steps += [_quantize_weights_step(weight_po, calibration), FuseDequantMatMulPass(weight_po.accuracy_level)]
    if options.kv_binding is KVBinding.BOUND:
        steps.append(_bind_kv_step(options, calibration))
    if options.fusions:
        from twophase.passes.fuse_skip_norm import FuseSkipNormPass
        from twophase.passes.pack_projections import PackProjectionsPass

        steps += [FuseSkipNormPass(), PackProjectionsPass()]
    if len(steps) > 2:
        steps.append(CleanupPass())
    return steps


def _tvm_phase_passes(phase: Phase, options: CompileOptions, calibration: Calibration) -> list[Step]:
    """The TVM target: weight-only QDQ, the bound KV cache, then twophase's own kernels (lower_tvm.py)."""
    from twophase.passes.fuse_tvm_kernels import FuseTVMKernelsPass

    po = options.phase(phase)
    if po.scheme is QuantScheme.W8A8 and phase is not Phase.PREFILL:
        raise UnsupportedModelError(
            f"the TVM backend runs w8a8 in the prefill phase only ({phase.value} scheme): its integer GEMM is for "
            "many rows, a decode step is a weight-streaming GEMV; use w8a16 or w4a16 for decode"
        )
    if options.kv_binding is not KVBinding.BOUND:
        raise UnsupportedModelError(
            "the TVM backend needs the bound KV cache (its attention kernel writes the preallocated buffers), "
            "and this model's attention does not match BindKVCachePass"
        )
    steps: list[Step] = [SplitPhasesPass(phase), CleanupPass()]
    if po.scheme is QuantScheme.W8A8:
        # as for ORT: the lm_head (one position in prefill) is left to the weight-only step below
        steps.append(lambda m: _activation_pass(po, calibration, m))
    weight_po = _weight_only_options(po, options)
    if weight_po is not None:
        steps.append(_quantize_weights_step(weight_po, calibration))
    # accuracy_level 4: int8-activation GEMV for few rows; from the weights' options, as the ORT target's
    # level (for w8a8 prefill: the decode phase's, which quantized the lm_head)
    level = weight_po.accuracy_level if weight_po is not None else 0
    steps += [_bind_kv_step(options, calibration), FuseTVMKernelsPass(level)]
    if options.fusions:
        from twophase.passes.fuse_tvm_elementwise import FuseTVMElementwisePass
        from twophase.passes.pack_projections import PackProjectionsPass

        steps += [PackProjectionsPass(), FuseTVMElementwisePass()]
    return steps + [CleanupPass()]


# target name -> function (phase, options, calibration) -> the phase's steps, in order
PIPELINES: dict[str, Callable[[Phase, CompileOptions, Calibration], list[Step]]] = {
    "ort-cpu": _ort_phase_passes,
    "ort-cuda": _ort_phase_passes,
    "tvm-cpu": _tvm_phase_passes,
}


def target_name(options: CompileOptions) -> str:
    return f"{options.backend.value}-{options.device.value}"


def phase_steps(phase: Phase, options: CompileOptions, calibration: Calibration) -> list[Step]:
    name = target_name(options)
    if name not in PIPELINES:
        raise UnsupportedModelError(f"no pipeline for target {name!r} (have {sorted(PIPELINES)})")
    return PIPELINES[name](phase, options, calibration)


def run_phase_pipeline(
    canonical: ir.Model, phase: Phase, options: CompileOptions, calibration: Calibration
) -> tuple[ir.Model, list[PassRecord]]:
    """Run the phase's passes on (a copy of) the canonical graph; the input is left unchanged."""
    model = canonical
    records: list[PassRecord] = []
    for step in phase_steps(phase, options, calibration):
        snapshot = model.clone()  # shares tensors: cheap, and in-place passes leave it intact
        start = time.perf_counter()
        p = step if isinstance(step, ir.passes.PassBase) else step(model)
        result = p(model)
        seconds = time.perf_counter() - start
        diff = diff_models(snapshot, result.model)
        records.append(PassRecord(phase.value, type(p).__name__, result.modified, round(seconds, 3), diff.to_dict()))
        log.info("%s: %s %s in %.2fs", phase.value, type(p).__name__, "modified" if result.modified else "no-op", seconds)
        model = result.model
    return model, records
