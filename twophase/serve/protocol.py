"""The OpenAI wire format: request models (validated by pydantic), response and stream-chunk bodies, errors.

Requests are checked here, before anything is queued: unknown fields are ignored (clients send many), but
a feature twophase does not implement (n > 1, logprobs, tools, echo, ...) is refused with a 400 rather
than silently dropped. Every error body has OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Extensions beyond OpenAI's parameters (as vLLM accepts them): `top_k` (0 or -1 = off) and
`repetition_penalty` (1 = off). OpenAI's defaults hold: temperature 1, top_p 1; max_tokens 16 for
completions and "the rest of the context" for chat completions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from twophase.compiler.errors import TwophaseError
from twophase.runtime.sampler import SamplingParams, SamplingParamsError
from twophase.serve.scheduler import FinishReason, GenerationRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(TwophaseError):
    """An error answered to the client: HTTP status + OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --- requests -----------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class _Request(BaseModel):
    """Fields both endpoints share. None means "not given" everywhere, so JSON nulls are accepted."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if not all(stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def check_unsupported(self) -> None:
        if (self.n or 1) > 1:
            raise bad_request("n > 1 is not supported: send one request per completion", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported; use repetition_penalty (1 = off)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    def sampling_params(self) -> SamplingParams:
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=top_k,
                top_p=1.0 if self.top_p is None else self.top_p,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                seed=self.seed,
            )
        except SamplingParamsError as e:
            raise bad_request(str(e)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if (self.best_of or 1) > 1:
            raise bad_request("best_of > 1 is not supported", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt, text or token ids; a list of several prompts is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request(f"got {len(p)} prompts: send one prompt per request", "prompt")
            p = p[0]
        if not p:
            raise bad_request("the prompt is empty", "prompt")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                                  "messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if not self.messages:
            raise bad_request("messages is empty: a chat completion needs at least one message", "messages")
        if self.logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.tools:
            raise bad_request("tools are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format")

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: [{role, content}, ...]."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


def generation_request(
    body: _Request, prompt_ids: list[int], *, max_len: int, default_max_tokens: int | None
) -> GenerationRequest:
    """The scheduler's request; `default_max_tokens` None means the rest of the context."""
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else max_len - len(prompt_ids)
        if max_tokens < 1:
            raise bad_request(f"the prompt's {len(prompt_ids)} tokens fill the model's context of {max_len} tokens",
                              "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                              "context_length_exceeded")
    if len(prompt_ids) + max_tokens > max_len:
        raise bad_request(
            f"this model's maximum context is {max_len} tokens; the prompt has {len(prompt_ids)} tokens and "
            f"{param} is {max_tokens} ({len(prompt_ids) + max_tokens} in all): shorten the prompt or lower "
            f"{param}", param, "context_length_exceeded")
    return GenerationRequest(tuple(prompt_ids), max_tokens, body.sampling_params(), tuple(body.stop or ()))


# --- responses -----------------------------------------------------------------------------------------


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, reason: str | None, use: dict | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": now(), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, reason: str, use: dict) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": now(), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, str] | None, reason: str | None = None,
               use: dict | None = None) -> dict[str, Any]:
    """A chat.completion.chunk; delta None gives the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model,
                            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def model_card(model_id: str, max_len: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": now(), "owned_by": "twophase", "max_model_len": max_len}
