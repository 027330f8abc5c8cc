"""offload_adapter / restore_adapter: off the model and back without changing outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lokr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin0(x), self.conv(img)


def test_offload_restore_round_trip() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    base = copy.deepcopy(model)
    lokr.inject(model, lokr.LoKrConfig(target_modules=["lin0", "conv"], init_weights=False, r=2), "a")
    lokr.inject(model, lokr.LoKrConfig(target_modules=["lin0"], init_weights=False), "b")
    x, img = torch.randn(3, 16), torch.randn(2, 4, 6, 6)
    lokr.set_adapter(model, "a")
    want = model(x, img)

    off = lokr.offload_adapter(model, "a")
    assert set(off.modules) == {"lin0", "conv"} and off.nbytes > 0
    assert lokr.list_adapters(model) == ["b"]
    assert isinstance(model.conv, nn.Conv2d)  # unwrapped: no adapter left there
    with pytest.raises(lokr.AdapterNotFoundError):
        lokr.set_adapter(model, "a")
    with lokr.adapter_batch(model, [None] * 3):
        torch.testing.assert_close(model.lin0(x), base.lin0(x))

    lokr.restore_adapter(model, off)
    lokr.set_adapter(model, "a")
    got = model(x, img)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(lokr.AdapterExistsError):
        lokr.restore_adapter(model, off)
    with pytest.raises(lokr.AdapterNotFoundError):
        lokr.offload_adapter(model, "missing")


def test_restoring_onto_a_model_without_its_modules_changes_nothing() -> None:
    """An offloaded adapter taken to a model lacking one of its modules: a clear refusal before any attach."""
    torch.manual_seed(0)
    model = Net().eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["lin0", "conv"], init_weights=False, r=2), "a")
    off = lokr.offload_adapter(model, "a")
    other = nn.Module()
    other.add_module("lin0", nn.Linear(16, 24))  # has lin0, not conv
    with pytest.raises(lokr.UnknownModuleError, match="conv"):
        lokr.restore_adapter(other, off)
    assert lokr.list_adapters(other) == [] and isinstance(other.lin0, nn.Linear)


def test_rows_given_as_one_string_are_refused() -> None:
    model = Net().eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["lin0"], init_weights=False), "ab")
    with pytest.raises(lokr.ConfigError, match=r"\['ab'\] \* batch"), lokr.adapter_batch(model, "ab"):
        pass
