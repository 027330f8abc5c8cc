"""Typed settings: every CLI flag is also an env var `LOKR_<FLAG>`."""

from __future__ import annotations

import ipaddress
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["BYTE_FIELDS", "Settings", "parse_bytes"]

BYTE_FIELDS = ("max_resident_bytes", "max_host_bytes", "max_body_bytes", "max_upload_bytes", "max_adapter_bytes")


def parse_bytes(value: Any) -> Any:
    """A byte count: a number, or text such as `4194304`, `4MiB`, `4Mi`, `2GiB`, `500MB` (KB/MB/GB decimal)."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", value.lower())
    if match is None or (match.group(3) and not match.group(2)):
        raise ValueError(f"expects a byte count such as 4194304, 4MiB or 2GiB, got {value!r}")
    number, prefix, binary = match.groups()
    power = " kmgt".index(prefix or " ")  # none, k, m, g, t: each a step of 1000, or of 1024 with "i"
    return int(float(number) * (1024 if binary else 1000) ** power)


class Settings(BaseSettings):
    """Server configuration (see `lokr-serve serve --help`)."""

    model_config = SettingsConfigDict(env_prefix="LOKR_", extra="ignore", protected_namespaces=())

    model: str | None = None
    model_kind: Literal["causal-lm"] = "causal-lm"
    served_model_name: str | None = None
    adapter: Annotated[list[str], NoDecode] = Field(default_factory=list, description="NAME=SOURCE adapters to preload")
    adapter_root: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    adapter_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    admin_token: str | None = None
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_origin: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(256, ge=1)
    max_prefill_tokens: int = Field(512, ge=1)
    prefill_stall: float = Field(1.0, ge=0)
    fold_cache: int | Literal["auto"] = "auto"
    max_resident_adapters: int = Field(128, ge=1)
    max_resident_bytes: int = Field(0, ge=0)
    max_host_adapters: int = Field(512, ge=0)
    max_host_bytes: int = Field(0, ge=0)
    max_body_bytes: int | None = Field(None, ge=1024)  # None: `body_limit`'s default for the model's kind
    max_upload_bytes: int = Field(2 << 30, ge=1024)
    max_adapter_bytes: int = Field(4 << 30, ge=1024)
    max_logprobs: int = Field(20, ge=0, le=100)
    max_n: int = Field(16, ge=1)
    max_image_pixels: int = Field(2048 * 2048, ge=64 * 64, le=2048 * 2048)
    upload_dir: Path | None = None
    shutdown_grace_s: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True

    @field_validator("adapter", "adapter_root", "api_key", "cors_origin", mode="before")
    @classmethod
    def _split_env_lists(cls, value: Any) -> Any:
        """Env vars hold lists as comma-separated text (`LOKR_ADAPTER_ROOT=/a,/b`) or JSON."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [v.strip() for v in text.split(",") if v.strip()]
        return value

    def body_limit(self, images: bool) -> int:
        """The largest request body but uploads: `max_body_bytes`, else 4 MiB of JSON on a causal-LM server and
        64 MiB on an image server, whose img2img requests carry pictures (base64 JSON or multipart)."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return (64 if images else 4) << 20

    @field_validator(*BYTE_FIELDS, mode="before")
    @classmethod
    def _byte_counts(cls, value: Any) -> Any:
        return parse_bytes(value)

    @field_validator("fold_cache", mode="before")
    @classmethod
    def _fold_copies(cls, value: Any) -> Any:
        """A number of weight copies (0 or more) or `auto`."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            copies = int(value)
        except (TypeError, ValueError):
            copies = -1
        if copies < 0 or isinstance(value, (bool, float)):
            raise ValueError(f"expects a number of weight copies (0 or more) or 'auto', got {value!r}")
        return copies

    @field_validator("adapter_root", mode="after")
    @classmethod
    def _roots_exist(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            if not root.is_dir():
                raise ValueError(f"adapter root {root} is not a directory")
        return [root.resolve() for root in roots]

    @field_validator("adapter", mode="after")
    @classmethod
    def _adapter_pairs(cls, items: list[str]) -> list[str]:
        for item in items:
            name, sep, source = item.partition("=")
            if not sep or not name or not source:
                raise ValueError(f"expected NAME=SOURCE, got {item!r}")
        return items

    @property
    def base_name(self) -> str:
        """The name clients use in `model` for the base model."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "base"

    def upload_root(self) -> Path:
        """Where uploads go (`--upload-dir`, else a folder in the system temp dir); made if missing."""
        root = self.upload_dir or Path(tempfile.gettempdir()) / "lokr-serve-uploads"
        root.mkdir(parents=True, exist_ok=True)
        return root

    @property
    def loopback_bind(self) -> bool:
        if self.host in ("localhost", ""):
            return self.host == "localhost"
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def preload_pairs(self) -> list[tuple[str, str]]:
        return [tuple(item.split("=", 1)) for item in self.adapter]  # type: ignore[misc]
