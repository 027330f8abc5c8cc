"""`lokr.inject` against PEFT's `get_peft_model`: which parameters train, and what `inject` refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft import get_peft_model
from torch import nn

import lokr
from tests.lokr.nets import assert_unchanged, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.head(torch.relu(self.norm(self.body(h))))


def _trainable_peft(model: nn.Module) -> set[str]:
    """PEFT's trainable parameter names as `module.lokr_x` / base names, with PEFT's prefixes and adapter keys gone."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
            names.add(n.removesuffix(".default"))
    return names


def _trainable_lokr(model: nn.Module) -> set[str]:
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            names.add(n.replace(".lokr_adapters.default.", ".").replace(".base_layer.", "."))
    return names


CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {"target_modules": ["body"]},
    "conv-and-head": {"target_modules": ["conv", "head"], "r": 2},
    "regex": {"target_modules": r".*(body|head)"},
    "inference-mode": {"target_modules": ["body", "conv"], "inference_mode": True},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_inject_freezes_the_base_like_get_peft_model(config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    base = Net()
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(**config))
    ours = copy.deepcopy(base)
    lokr.inject(ours, lokr.LoKrConfig(**config))
    assert _trainable_lokr(ours) == _trainable_peft(peft_model)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lokr_adapters" not in n)
    if not config.get("inference_mode"):
        assert _trainable_lokr(ours)  # the adapter itself trains
        lokr.set_adapter(ours, "default")
        ours(torch.randn(2, 3, 5, 5)).square().sum().backward()
        assert all(p.grad is None for n, p in ours.named_parameters() if "lokr_adapters" not in n)


def test_a_second_inject_freezes_again_and_keeps_the_first_adapter_training() -> None:
    torch.manual_seed(0)
    model = Net()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["body"]), "a")
    model.norm.weight.requires_grad_(True)  # unfrozen by hand in between
    lokr.inject(model, lokr.LoKrConfig(target_modules=["head"]), "b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "body.lokr_adapters.a.lokr_w1",
        "body.lokr_adapters.a.lokr_w2",
        "head.lokr_adapters.b.lokr_w1",
        "head.lokr_adapters.b.lokr_w2",
    }


def test_inject_refuses_modules_to_save_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = Net()
    before = snapshot(model)
    config = lokr.LoKrConfig(target_modules=["body"], modules_to_save=["head"])
    with pytest.raises(lokr.UnsupportedAdapterError, match="modules_to_save"):
        lokr.inject(model, config)
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())
