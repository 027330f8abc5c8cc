"""Load a transformers causal LM and its tokenizer (safetensors weights only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import BadRequestError

__all__ = ["LoadedModel", "load_causal_lm", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(BadRequestError):
    """The model path or hub id cannot be served."""

    code = "model_load_error"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    context_length: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_causal_lm(source: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """`source` is a local dir or a hub id (hub ids only work where the hub is reachable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if path.exists():
        _check_local_dir(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source!r}: {exc}") from exc
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
    return LoadedModel(model, tokenizer, dev, dt, context)


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"--model {path} is not a directory with config.json and *.safetensors weights")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--model {path} has no config.json; expected a transformers model directory")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found pickle weights {pickled[:2]}; convert them to safetensors)" if pickled else ""
        raise ModelLoadError(f"--model {path} has no *.safetensors weights{hint}")
