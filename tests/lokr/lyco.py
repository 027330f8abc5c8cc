"""Writing reference files with the real `lycoris-lora` package (its kohya network and save_weights)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lycoris import kohya
from torch import nn

MULT = 0.7
FULL = "lokr-test-full"  # LyCORIS's "full" preset minus its TimestepEmbedding class (clashes with its names)
EVERY_LAYER = "lokr-test-every-layer"  # every Linear / Conv2d of the UNet


def single_thread() -> Iterator[None]:
    """Tiny models: per-op overhead dominates, and a second thread only contends on a shared box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Class attributes LyCORIS's `apply_preset` overwrites for good (`create_lycoris(..., preset=...)` and the kohya
# network call it): restored after each test so later tests see LyCORIS's defaults.
_PRESET_ATTRS = (
    "ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "LORA_PREFIX",
    "USE_FNMATCH", "TARGET_EXCLUDE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
)  # fmt: skip


def keep_class_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    from lycoris import LycorisNetwork

    for cls in (LycorisNetwork, kohya.LycorisNetworkKohya):
        for attr in _PRESET_ATTRS:
            if attr in vars(cls):
                monkeypatch.setattr(cls, attr, vars(cls)[attr])


def register_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    keep_class_presets(monkeypatch)
    full = copy.deepcopy(kohya.PRESET["full"])
    full["unet_target_module"] = [m for m in full["unet_target_module"] if m != "TimestepEmbedding"]
    every = {**full, "unet_target_module": ["Linear", "Conv2d"], "unet_target_name": []}
    for name, preset in ((FULL, full), (EVERY_LAYER, every)):
        monkeypatch.setitem(kohya.PRESET, name, {**preset, "module_algo_map": {}, "name_algo_map": {}})


def randomise(network: nn.Module, seed: int) -> None:
    """Trained-looking factors (LyCORIS initialises one side to zero); `scalar` (use_scalar) to 0.7."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.full_like(p, 0.7) if name.endswith("scalar") else torch.randn(p.shape, generator=g) * 0.2)


def kohya_file(path: Path, te: Any, unet: nn.Module, dim: int, alpha: float, algo: str = "lokr", **options: Any) -> Any:
    """LyCORIS's kohya network (lora_te*/lora_unet_ keys) applied to `te` / `unet`, randomised and saved."""
    options.setdefault("preset", FULL)
    network = kohya.create_network(1.0, dim, alpha, None, te, unet, algo=algo, **options)
    network.apply_to(te, unet, apply_text_encoder=te is not None, apply_unet=True)
    randomise(network, seed=11)
    network.set_multiplier(MULT)
    network.save_weights(str(path), None, {})
    return network
