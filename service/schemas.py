"""Request bodies (pydantic). Field names follow OpenAI; `adapters` is our composition extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AdapterRef",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ErrorResponse",
    "LoadAdapterRequest",
    "StreamOptions",
    "VllmLoadRequest",
    "VllmUnloadRequest",
]

MAX_STOPS = 16  # OpenAI takes 4; vLLM any number. More than this is refused, never cut short.
Stop = str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    scale: float = Field(1.0, allow_inf_nan=False, ge=-100, le=100)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# OpenAI / vLLM fields this server does not implement: taken only at values that change nothing (clients send
# some at their defaults), refused otherwise rather than silently ignored.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "ignore_eos": (None, False),
    "min_tokens": (None, 0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in _NEUTRAL.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"`{name}` is not supported by this server (got {data[name]!r}); leave it out")
        return data

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stop = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    adapters: list[AdapterRef] | None = Field(None, max_length=16)

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stops)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, object]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    source: str = Field(min_length=1, max_length=4096)


class VllmLoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class VllmUnloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(max_length=256)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorResponse(BaseModel):
    """The one error shape of every route: `{"error": {"message", "type", "code"}}`."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    "4XX": {"model": ErrorResponse, "description": "Bad request, auth, not found, conflict or too large"},
    "5XX": {"model": ErrorResponse, "description": "Overloaded (503 + Retry-After), not ready, or an engine error"},
}
