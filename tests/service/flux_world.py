"""Builders for the Flux image tests: LoKr files written by the real `lycoris-lora` on the diffusers Flux
transformer (its own `create_lycoris` network, `lycoris_` keys as SimpleTuner saves them) and peft references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.images.tiny import inject_peft_lokr
from service.images.tiny_flux import FLUX_TARGETS

from ..lokr.lyco import MULT, keep_class_presets, randomise
from .images_world import load

__all__ = [
    "LINEAR_PRESET",
    "MULT",
    "lycoris_flux_file",
    "peft_flux_reference",
    "register_linear_preset",
    "with_extra_key",
]

LINEAR_PRESET = "lokr-test-flux-linear"  # every nn.Linear of the transformer (LyCORIS's "full" adds norms)


def register_linear_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS's wrapper preset targeting Linear layers only; class attributes restored after the test."""
    from lycoris import config

    keep_class_presets(monkeypatch)
    monkeypatch.setitem(config.PRESET, LINEAR_PRESET, {"target_module": ["Linear"], "module_algo_map": {},
                                                       "name_algo_map": {}})  # fmt: skip


def lycoris_flux_file(path: Path, transformer: nn.Module, seed: int = 11, **options: Any) -> Any:
    """`create_lycoris(transformer, algo="lokr")` applied in place at multiplier MULT, randomised, saved."""
    from lycoris import create_lycoris

    options.setdefault("factor", 4)
    network = create_lycoris(transformer, MULT, 4, 2.0, algo="lokr", preset=LINEAR_PRESET, **options)
    network.apply_to()
    randomise(network, seed)
    network.save_weights(str(path), None, {})
    return network


def peft_flux_reference(path: Path, seed: int) -> Any:
    """The plain Flux pipeline with peft's LoKr (same seed as `save_peft_flux_lokr`) injected into its transformer."""
    pipe = load(path).pipe
    inject_peft_lokr(pipe.transformer, seed, targets=FLUX_TARGETS)
    return pipe


def with_extra_key(src: Path, out: Path, stem: str) -> Path:
    """A copy of the LyCORIS file `src` plus LoKr factors for the module `stem` (which the model may lack)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    tensors[f"{stem}.lokr_w1"] = torch.ones(2, 2)
    tensors[f"{stem}.lokr_w2"] = torch.ones(8, 8)
    tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(out))
    return out
