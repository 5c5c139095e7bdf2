"""Compile options: enums and frozen dataclasses, parsed once at the CLI boundary."""

from __future__ import annotations

import dataclasses
import enum


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class QuantScheme(enum.Enum):
    """Numerical format of a phase's MatMul weights (and activations, for w8a8)."""

    FP32 = "fp32"
    W8A16 = "w8a16"  # int8 weights, per output channel; float activations
    W4A16 = "w4a16"  # int4 weights, blocked along the reduction axis; float activations
    W8A8 = "w8a8"  # int8 weights and int8 activations

    @property
    def weight_bits(self) -> int | None:
        return {QuantScheme.W8A16: 8, QuantScheme.W4A16: 4, QuantScheme.W8A8: 8}.get(self)


class WeightAlgorithm(enum.Enum):
    """How quantized weight codes are chosen."""

    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # error-compensating rounding with calibration Hessians
    GGUF = "gguf"  # keep a GGUF source's own grid exactly (Q4_0, Q4_1, Q8_0); RTN where there is none


class ActivationMode(enum.Enum):
    """How w8a8 activation scales are found."""

    DYNAMIC = "dynamic"  # computed per call, per token
    STATIC = "static"  # calibrated on text at compile time


class KVBinding(enum.Enum):
    """How the decode graph holds the KV cache (see passes/bind_kv_cache.py)."""

    AUTO = "auto"  # bound where every layer's attention matches BindKVCachePass, else grow (logged)
    BOUND = "bound"  # preallocated buffers updated in place (ORT GroupQueryAttention + I/O binding)
    GROW = "grow"  # past in, present out (plain ONNX attention; any runtime)


class KVDtype(enum.Enum):
    FLOAT32 = "float32"
    INT8 = "int8"  # bound cache only: per (kv head, channel) scales calibrated on text


class Backend(enum.Enum):
    ORT = "ort"  # ONNX Runtime sessions over the phase graphs
    TVM = "tvm"  # Apache TVM Relax executables with twophase's own kernels (compiler/lower_tvm.py)


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True)
class PhaseOptions:
    scheme: QuantScheme = QuantScheme.FP32
    algorithm: WeightAlgorithm = WeightAlgorithm.RTN
    block_size: int = 32  # int4 block along K (16..256, power of two)
    symmetric: bool = True  # int4: signed codes, no zero point; False: uint4 codes with zero points
    activations: ActivationMode = ActivationMode.DYNAMIC  # w8a8 only
    smoothquant_alpha: float | None = None  # w8a8: migrate activation outliers into weights
    # ORT MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (blockwise)
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size > 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two in 16..256, got {self.block_size}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.value,
            "algorithm": self.algorithm.value,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "activations": self.activations.value,
            "smoothquant_alpha": self.smoothquant_alpha,
            "accuracy_level": self.accuracy_level,
        }


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    backend: Backend = Backend.ORT
    device: Device = Device.CPU
    prefill: PhaseOptions = PhaseOptions()
    decode: PhaseOptions = PhaseOptions()
    # Longest sequence (prompt + generated) the artifact accepts; None = the model's own limit.
    max_len: int | None = None
    kv_binding: KVBinding = KVBinding.AUTO
    kv_dtype: KVDtype = KVDtype.FLOAT32
    # Bound cache: a prompt runs in steps of at most this many tokens (bounds activation memory).
    prefill_chunk: int = 512
    # Fusions: q/k/v and gate/up packed; ORT: residual Add + RMSNorm -> SkipSimplifiedLayerNormalization;
    # TVM: norms, SwiGLU and residual adds folded into the matmul kernels.
    fusions: bool = True
    # Calibration text for static activation scales, SmoothQuant, GPTQ and AWQ: windows x tokens.
    calibration_windows: int = 16
    calibration_tokens: int = 512

    def phase(self, phase: Phase) -> PhaseOptions:
        return self.prefill if phase is Phase.PREFILL else self.decode

    def to_dict(self) -> dict:
        return {
            "backend": self.backend.value,
            "device": self.device.value,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
            "max_len": self.max_len,
            "kv_binding": self.kv_binding.value,
            "kv_dtype": self.kv_dtype.value,
            "prefill_chunk": self.prefill_chunk,
            "fusions": self.fusions,
            "calibration_windows": self.calibration_windows,
            "calibration_tokens": self.calibration_tokens,
        }
