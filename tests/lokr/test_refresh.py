"""Which edits to an adapter's parameters the next forward sees (README, "Python library"), and `lokr.refresh`.

The reference is a deep copy of the edited model: a copy rebuilds its banks from the parameters and keeps nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lokr
import lokr.merged

Rows = list[str | None]


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)).eval()
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed + 1)
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], r=2, init_weights=False), name)
    return model


def _input(kind: str) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(3, 64) if kind == "linear" else torch.randn(3, 8, 6, 6)


def _w1(model: nn.Module) -> nn.Parameter:
    return model[0].lokr_adapters["a"].lokr_w1  # type: ignore[index, no-any-return]


def _in_place(model: nn.Module) -> None:
    _w1(model).mul_(3.0)


def _state_dict(model: nn.Module) -> None:
    model.load_state_dict({k: v * 3 if k.endswith(".a.lokr_w1") else v for k, v in model.state_dict().items()})


def _scale(model: nn.Module) -> None:
    adapter = model[0].lokr_adapters["a"]  # type: ignore[index]
    adapter.scale = adapter.scale * 3


def _optimiser(model: nn.Module) -> None:
    p = _w1(model)
    p.grad = -2 * p.detach().clone()
    torch.optim.SGD([p], lr=1.0).step()


def _data_in_place(model: nn.Module) -> None:
    _w1(model).data.mul_(3.0)  # an EMA / weight-averaging idiom: no version bump


def _data_assign(model: nn.Module) -> None:
    p = _w1(model)
    p.data = p.data * 3.0  # new storage behind the bank's back


TRACKED: dict[str, Callable[[nn.Module], None]] = {
    "in-place": _in_place,
    "load_state_dict": _state_dict,
    "scale": _scale,
    "optimiser": _optimiser,
}
UNTRACKED: dict[str, Callable[[nn.Module], None]] = {"data-in-place": _data_in_place, "data-assign": _data_assign}
PATHS: dict[str, tuple[Rows, int | None]] = {  # rows, fold (None: a plain forward after set_adapter)
    "plain": (["a", "a", "a"], None),
    "rows-fold0": (["a", "a", "a"], 0),
    "rows-fold1": (["a", "a", "a"], 1),
    "mixed-fold0": (["a", "b", None], 0),
    "mixed-fold4": (["a", "b", None], 4),
}


def _reference(model: nn.Module, rows: Rows, x: torch.Tensor) -> torch.Tensor:
    fresh = copy.deepcopy(model)
    outputs = []
    for i, row in enumerate(rows):
        lokr.set_adapter(fresh, row)
        outputs.append(fresh(x[i : i + 1]))
    return torch.cat(outputs)


def _run(kind: str, path: str, edit: Callable[[nn.Module], None], in_block: bool, refresh: bool) -> None:
    """Forward once (filling whatever is kept), edit, optionally refresh, forward again: equal to the reference."""
    rows, fold = PATHS[path]
    model, x = _model(kind), _input(kind)
    with torch.no_grad():
        if fold is None:
            lokr.set_adapter(model, "a")
            model(x)
            edit(model)
            if refresh:
                lokr.refresh(model)
            got = model(x)
        elif in_block:
            with lokr.adapter_batch(model, rows, fold=fold):
                model(x)
                edit(model)
                if refresh:
                    lokr.refresh(model)
                got = model(x)
        else:
            with lokr.adapter_batch(model, rows, fold=fold):
                model(x)
            edit(model)
            if refresh:
                lokr.refresh(model)
            with lokr.adapter_batch(model, rows, fold=fold):
                got = model(x)
        torch.testing.assert_close(got, _reference(model, rows, x), atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["folded", "factored"])
def cost(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the cost model to fold every layer's weight or to run the factored deltas."""
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0 if request.param == "folded" else 10**12)
    return str(request.param)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_tracked_edits_are_seen_without_refresh(kind: str, path: str, cost: str) -> None:
    for edit in TRACKED.values():
        _run(kind, path, edit, in_block=False, refresh=False)
        if path != "rows-fold1":  # the documented exception: a one-adapter fold block keeps its weight
            _run(kind, path, edit, in_block=True, refresh=False)


@pytest.mark.parametrize("in_block", [False, True], ids=["between-blocks", "in-block"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_refresh_makes_every_edit_seen(kind: str, path: str, in_block: bool, cost: str) -> None:
    for edit in [*TRACKED.values(), *UNTRACKED.values()]:
        _run(kind, path, edit, in_block, refresh=True)


def test_refresh_after_a_data_edit_on_a_cached_dense_delta() -> None:
    """A conv whose dense `dW` is cached per adapter (the plain inference path when it is cheaper than factored)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1)).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], r=2, init_weights=False))
    lokr.set_adapter(model, "default")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        model(x)
        model[0].lokr_adapters["default"].lokr_w1.data.mul_(3.0)  # type: ignore[index]
        lokr.refresh(model)
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x), atol=1e-5, rtol=1e-5)
