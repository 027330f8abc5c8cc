"""`lokr.grow_in_place()`: banks that fill up or empty out resize their storage in place, so an attach or unload
re-points no member (growing) or only the members moved down (shrinking), where the default moves the bank to a new
tensor and re-points every member. Answers, the one-copy rule and the spare-slot bound are those of the default."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

import lokr
from lokr.growth import growing_in_place, resize_rows
from lokr.stacked import FactorBank

COUNT = 70


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).eval()


def _load(model: nn.Module, names: list[str]) -> None:
    config = lokr.LoKrConfig(target_modules=["0", "2"], init_weights=False, r=2)
    for name in names:
        torch.manual_seed(hash(name) % 1000)
        lokr.inject(model, config, name)


def _banks(model: nn.Module) -> list[FactorBank]:
    return [bank for m in (model[0], model[2]) for bank in m._banks._banks.values()]


def _answers(model: nn.Module, names: list[str]) -> torch.Tensor:
    x = torch.randn(len(names), 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), lokr.adapter_batch(model, names):
        return model(x)


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names every `FactorBank._bind` re-points."""
    seen: list[str] = []
    original = FactorBank._bind

    def counted(self: FactorBank, names: object) -> None:
        names = list(names)  # type: ignore[call-overload]
        seen.extend(names)
        original(self, names)

    monkeypatch.setattr(FactorBank, "_bind", counted)
    return seen


def _check_one_copy(model: nn.Module) -> None:
    """Every adapter's parameters are views of its bank row; spare slots stay under 5% of each bank."""
    for bank in _banks(model):
        assert all(bank.at_home(name) for name in bank.members)
        assert bank.capacity - len(bank.members) <= max(1, 0.05 * bank.capacity)


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "default"])
def test_growing_and_shrinking_keep_answers_and_one_copy(in_place: bool, bound: list[str]) -> None:
    names = [f"a{i}" for i in range(COUNT)]
    reference = _model()
    _load(reference, names)
    want = _answers(reference, names)
    bound.clear()

    model = _model()
    with lokr.grow_in_place() if in_place else contextlib.nullcontext():
        _load(model, names)
    data = [bank.data for bank in _banks(model)]
    grows = [name for name in bound if bound.count(name) > 2]  # re-pointed again after their own attach
    assert bool(grows) is not in_place  # in place, a growth re-points nobody
    _check_one_copy(model)
    torch.testing.assert_close(_answers(model, names), want, rtol=0, atol=0)

    bound.clear()
    with lokr.grow_in_place() if in_place else contextlib.nullcontext():
        for name in names[: COUNT - 8]:
            lokr.delete_adapter(model, name)
    kept = names[COUNT - 8 :]
    assert all(bank.capacity <= 9 for bank in _banks(model))  # shrunk
    # Each move fills the hole of an unload: in place, at most one re-pointing per unload per bank; the default
    # re-points every member at every shrink.
    assert (len(bound) <= 2 * (COUNT - 8)) is in_place
    assert all(a is b for a, b in zip(data, [bank.data for bank in _banks(model)], strict=True)) is in_place
    _check_one_copy(model)
    for bank in _banks(model):
        free = [slot for slot in range(bank.capacity) if slot not in bank.slots.values()]
        assert torch.count_nonzero(bank.data[free]) == 0  # nothing of unloaded adapters is kept
    for name in kept:  # the survivors answer as they did
        torch.testing.assert_close(_answers(model, [name]), _answers(reference, [name]), rtol=0, atol=0)


def test_the_promise_holds_only_inside_the_block_and_this_thread() -> None:
    assert not growing_in_place()
    with lokr.grow_in_place():
        assert growing_in_place()
        seen: list[bool] = []
        thread = threading.Thread(target=lambda: seen.append(growing_in_place()))
        thread.start()
        thread.join()
        assert seen == [False]
    assert not growing_in_place()


def test_a_tensor_that_does_not_own_its_storage_is_not_resized() -> None:
    whole = torch.arange(12.0).view(6, 2)
    part = whole[:3]  # shares storage with more than itself
    assert not resize_rows(part, 5) and part.shape == (3, 2)
    alone = torch.arange(6.0).view(3, 2)
    view = alone[1]
    assert resize_rows(alone, 5) and alone.shape == (5, 2)
    assert torch.equal(view, torch.tensor([2.0, 3.0])) and view.data_ptr() == alone[1].data_ptr()
    assert torch.count_nonzero(alone[3:]) == 0
    assert resize_rows(alone, 2) and torch.equal(alone, torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
