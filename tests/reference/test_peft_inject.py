"""`lokr.inject` against PEFT's `get_peft_model`: which parameters train, what `inject` refuses, and the factors'
values and dtype on half-precision and float64 bases."""

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
from tests.reference.test_peft_parity import CASES, _lokr_factors, _peft_factors

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


HALF_CASES = [
    "Vanilla MLP 4 LOKR",
    "Vanilla MLP 8 LOKR",
    "Conv1d LOKR 3",
    "Conv1d full w2 quirk",
    "Conv1d Groups LOKR",
    "Conv2d 7 LOKR",
    "Conv2d CP r1 strided",
    "Conv2d lowrank r1",
    "Linear factor 4 lowrank",
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize("case_name", HALF_CASES)
def test_inject_into_a_half_precision_model_initialises_like_peft(
    case_name: str, init_weights: Any, dtype: torch.dtype
) -> None:
    """PEFT draws the factors in float32, casts them to the base dtype and back (autocast_adapter_dtype): float32
    factors holding half-rounded values, bit for bit the same here."""
    case = CASES[case_name]
    torch.manual_seed(0)
    base = case.model().to(dtype)
    torch.manual_seed(1234)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(init_weights=init_weights, **case.config))
    peft_next = torch.rand(3)
    ours = copy.deepcopy(base)
    torch.manual_seed(1234)
    lokr.inject(ours, lokr.LoKrConfig(init_weights=init_weights, **case.config))
    assert torch.equal(torch.rand(3), peft_next)
    ours_factors, peft_factors = _lokr_factors(ours), _peft_factors(peft_model)
    assert ours_factors.keys() == peft_factors.keys()
    for key, value in peft_factors.items():
        assert value.dtype == ours_factors[key].dtype == torch.float32, key
        assert torch.equal(ours_factors[key], value), key


def test_half_precision_inject_forward_matches_peft() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32)).to(torch.bfloat16).eval()
    config = {"target_modules": ["0", "2"], "r": 4, "init_weights": False}
    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(**config)).eval()
    ours = copy.deepcopy(base)
    torch.manual_seed(2)
    lokr.inject(ours, lokr.LoKrConfig(**config))
    lokr.set_adapter(ours, "default")
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peft_model(x), atol=1e-2, rtol=1e-2)
