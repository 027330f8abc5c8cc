"""Request bodies (pydantic). Field names follow OpenAI; `adapters` is our composition extension."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AdapterRef",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ErrorResponse",
    "LoadAdapterRequest",
    "RequestBody",
    "StreamOptions",
    "VllmLoadRequest",
    "VllmUnloadRequest",
]

MAX_STOPS = 16  # OpenAI takes 4; vLLM any number. More than this is refused, never cut short.
Stop = str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None


def _unencodable(value: Any, path: str) -> str | None:
    """Where in a decoded JSON `value` a string first holds a lone UTF-16 surrogate (JSON `"\\ud800"` decodes to
    one; no tokenizer, stop-string match or UTF-8 response can carry it), as `path[i].key`; None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = _unencodable(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if where is not None:
            return where
    return None


class RequestBody(BaseModel):
    """Base of every JSON request body: text anywhere in it must be valid Unicode (no lone surrogates)."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        where = _unencodable(data, "")
        if where is not None:
            raise ValueError(
                f"`{where}` holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is "
                "not valid Unicode text; send the text as UTF-8, or escape characters outside the BMP as a full "
                "surrogate pair"
            )
        return data


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


class _Sampling(RequestBody):
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
    n: int = Field(1, ge=1, strict=True)  # the server's limit (LOKR_MAX_N) is checked per route, in one message
    stream: bool = False
    stream_options: StreamOptions | None = None
    adapters: list[AdapterRef] | None = Field(None, max_length=16)

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stops)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    max_tokens: int | None = Field(None, ge=0, strict=True)  # None: 16, or what the context leaves
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, strict=True)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, object]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[dict[str, object]] | None) -> str | list[dict[str, object]] | None:
        """Content parts other than text (`image_url`, `input_audio`, `file`) are refused, never dropped: the model
        would answer without them."""
        for i, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                got = f"has type {kind!r}" if kind != "text" else "is a text part without a string `text`"
                raise ValueError(
                    f"part {i} {got}; this server serves a text model and takes only "
                    '{"type": "text", "text": "..."} parts (or a plain string)'
                )
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part["text"]) for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, strict=True)


class LoadAdapterRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=256)
    source: str = Field(min_length=1, max_length=4096)


class VllmLoadRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class VllmUnloadRequest(RequestBody):
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
