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


class Backend(enum.Enum):
    ORT = "ort"


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclasses.dataclass(frozen=True)
class PhaseOptions:
    scheme: QuantScheme = QuantScheme.FP32


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    backend: Backend = Backend.ORT
    device: Device = Device.CPU
    prefill: PhaseOptions = PhaseOptions()
    decode: PhaseOptions = PhaseOptions()
    # Longest sequence (prompt + generated) the artifact accepts; None = the model's own limit.
    max_len: int | None = None

    def phase(self, phase: Phase) -> PhaseOptions:
        return self.prefill if phase is Phase.PREFILL else self.decode

    def to_dict(self) -> dict:
        return {
            "backend": self.backend.value,
            "device": self.device.value,
            "prefill": {"scheme": self.prefill.scheme.value},
            "decode": {"scheme": self.decode.scheme.value},
            "max_len": self.max_len,
        }
