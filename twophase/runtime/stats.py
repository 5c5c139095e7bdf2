"""Timing and token counts of one generate call."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class GenerationStats:
    """Counts and wall-clock seconds of the last generation.

    ttft_s runs from the generate call (tokenization included) to the first sampled token;
    prefill_s is the prefill graph run; decode_s sums the decode graph runs (decode_steps of them;
    the first generated token comes from prefill, so decode_steps is generated_tokens - 1 at most).
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    stop_reason: str | None = None  # "eos", "stop_token", "stop_string", "max_new_tokens", "closed"

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of prefill."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode loop (one token per decode step)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        d["decode_tok_s"] = self.decode_tok_s
        return d
