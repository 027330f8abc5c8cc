"""`adapter_batch(..., fold=n)`: a batch that runs one adapter at scale 1 on every row uses `W + dW`, folded
once and kept; so do the row selections of a mixed step that the cost model folds, while they fit `n` weight
copies. The result equals the factored forward, a changed adapter is folded again, and batches the cost model
keeps factored keep nothing. `tokens=True` selects per position of a packed sequence."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr

from .nets import two_adapter_mlp
from .threads import run_in_threads


def _run(model: nn.Module, rows: list[object], x: torch.Tensor, fold: int, tokens: bool = False) -> torch.Tensor:
    with torch.inference_mode(), lokr.adapter_batch(model, rows, fold=fold, tokens=tokens):  # type: ignore[arg-type]
        return model(x).clone()


def _dense(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Each layer as `base(x) + x @ dW^T`, from `get_delta_weight` (PEFT's dense delta)."""
    with torch.no_grad():
        for module in model:
            if isinstance(module, lokr.LoKrLayer):
                x = module.base_layer(x) + F.linear(x, module.get_delta_weight(name))
            else:
                x = module(x)
        return x


def _folds(model: nn.Module) -> list[int]:
    return [len(m._folds._entries) for m in model if isinstance(m, lokr.LoKrLayer)]


def test_one_adapter_batches_fold_once_and_stay_exact() -> None:
    model = two_adapter_mlp((64, 96, 32))
    x = torch.randn(5, 3, 64)
    got = _run(model, ["a"] * 5, x, fold=1)
    torch.testing.assert_close(got, _dense(model, "a", x), rtol=1e-5, atol=1e-5)
    layer = model[0]
    stored = layer._folds._entries["a"].tensor
    torch.testing.assert_close(_run(model, ["a"] * 5, x, fold=1), got, rtol=0, atol=0)
    assert layer._folds._entries["a"].tensor is stored  # kept, not folded again
    assert _folds(model) == [1, 1]
    torch.testing.assert_close(_run(model, ["b"] * 5, x, fold=1), _dense(model, "b", x), rtol=1e-5, atol=1e-5)
    assert list(layer._folds._entries) == ["b"]  # capacity 1: the least recent goes
    _run(model, ["a"] * 5, x, fold=0)
    assert _folds(model) == [0, 0]


@pytest.mark.parametrize(
    "rows", [["a", "b", "a"], ["a", None, "a"], [[("a", 0.5)]] * 3, [[("a", 1.0), ("b", 1.0)]] * 3]
)
def test_mixed_batches_the_cost_model_keeps_factored_keep_no_folds(rows: list[object]) -> None:
    model = two_adapter_mlp((64, 96, 32))
    x = torch.randn(3, 2, 64)
    unfolded = _run(model, rows, x, fold=0)
    torch.testing.assert_close(_run(model, rows, x, fold=4), unfolded, rtol=0, atol=0)
    assert _folds(model) == [0, 0]


MIXED: dict[str, list[object]] = {
    "stacked": ["a", "a", "b", "b", [("c", 0.5)], [("c", 0.5)]],  # equal consecutive selections: one grouped conv
    "apart": ["a", "a", "b", [("c", 0.5)], [("c", 0.5)], [("c", 0.5)]],  # consecutive, unequal: one conv each
    "gathered": ["a", [("a", 1.0), ("c", 2.0)], "a", "b", [("a", 1.0), ("c", 2.0)], "b"],  # rows gathered
}


def _conv_net(monkeypatch: pytest.MonkeyPatch) -> nn.Sequential:
    """One 3x3 conv with adapters a, b, c, and a cost model that folds every mixed step."""
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1)).eval()
    for name in ("a", "b", "c"):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), name)
    return model


def _count_folds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the fold builders called from now on: `_fold_all` (stacked) and `_fold` (one selection)."""
    builds: list[str] = []
    for name in ("_fold_all", "_fold"):
        real = getattr(lokr.merged, name)
        monkeypatch.setattr(lokr.merged, name, lambda *a, real=real, name=name: builds.append(name) or real(*a))
    return builds


@pytest.mark.parametrize("rows", MIXED.values(), ids=MIXED.keys())
def test_mixed_steps_keep_their_folds_while_they_fit(rows: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose rows keep their adapters (a denoising loop) folds each of its 3 selections once, then reuses
    them: one entry of 3 copies where one stacked op reads them side by side, else one entry per selection."""
    model = _conv_net(monkeypatch)
    layer = model[0]
    x = torch.randn(len(rows), 8, 9, 9)
    want = _run(model, rows, x, fold=0)
    builds = _count_folds(monkeypatch)
    selections = 3
    torch.testing.assert_close(_run(model, rows, x, fold=selections), want, rtol=1e-6, atol=1e-6)
    entries = [(e.tensor.shape, e.copies) for e in layer._folds._entries.values()]
    if rows is MIXED["stacked"]:
        assert entries == [((selections, *layer.weight.shape), selections)] and builds == ["_fold_all"]
    else:
        assert entries == [(layer.weight.shape, 1)] * selections and builds == ["_fold"] * selections
    builds.clear()
    torch.testing.assert_close(_run(model, rows, x, fold=selections), want, rtol=1e-6, atol=1e-6)
    assert builds == []  # the second step folded nothing
    _run(model, rows, x, fold=selections - 1)  # no longer fits: nothing new is kept, the rest trimmed to fit
    held = sum(e.copies for e in layer._folds._entries.values())
    stacked = rows is MIXED["stacked"]
    assert held == (0 if stacked else selections - 1)
    assert builds == (["_fold_all"] if stacked else ["_fold"] * selections)  # folded for this step only


def test_a_selection_joining_a_mixed_step_folds_only_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows keep their adapters while another row joins and later leaves (an image joining a running denoising
    batch): each selection is kept on its own, so the join folds only the newcomer and the leave folds nothing."""
    model = _conv_net(monkeypatch)
    running, joined = ["a", "a", "b"], ["a", "a", "b", [("c", 0.5)]]  # unequal selections: one conv each
    x = torch.randn(len(joined), 8, 9, 9)
    want_running, want_joined = _run(model, running, x[:3], fold=0), _run(model, joined, x, fold=0)
    builds = _count_folds(monkeypatch)
    torch.testing.assert_close(_run(model, running, x[:3], fold=4), want_running, rtol=1e-6, atol=1e-6)
    assert builds == ["_fold", "_fold"]
    torch.testing.assert_close(_run(model, joined, x, fold=4), want_joined, rtol=1e-6, atol=1e-6)
    assert builds == ["_fold"] * 3  # the newcomer only
    torch.testing.assert_close(_run(model, running, x[:3], fold=4), want_running, rtol=1e-6, atol=1e-6)
    assert builds == ["_fold"] * 3  # nothing: both selections were kept


@pytest.mark.parametrize("change", ["in_place", "deleted"])
def test_mixed_folds_see_a_changed_adapter(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _conv_net(monkeypatch)
    layer = model[0]
    rows = MIXED["stacked"]
    x = torch.randn(len(rows), 8, 9, 9)
    _run(model, rows, x, fold=3)
    with torch.no_grad():
        if change == "in_place":
            layer.lokr_adapters["c"].lokr_w1.mul_(-2.0)  # through the bank row: its version moves
        else:
            lokr.delete_adapter(model, "c")
            assert layer._folds.nbytes == 0
            lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "c")
    torch.testing.assert_close(_run(model, rows, x, fold=3), _run(model, rows, x, fold=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["in_place", "scale", "replace", "attach_over", "deleted"])
def test_a_changed_adapter_is_folded_again(change: str) -> None:
    model = two_adapter_mlp((64, 96, 32))
    x = torch.randn(4, 64)
    _run(model, ["a"] * 4, x, fold=2)
    layer = model[0]
    adapter = layer.lokr_adapters["a"]
    with torch.no_grad():
        if change == "in_place":
            adapter.lokr_w1.mul_(3.0)
        elif change == "scale":
            adapter.scale = 0.25
        elif change == "attach_over":
            fresh = copy.deepcopy(adapter)
            for p in fresh.parameters():
                p.normal_()
            layer.add_adapter("a", fresh)
        else:
            lokr.delete_adapter(model, "a")
            if change == "deleted":
                assert _folds(model) == [0, 0]
            lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "2"], init_weights=False, r=4), "a")
    torch.testing.assert_close(_run(model, ["a"] * 4, x, fold=2), _dense(model, "a", x), rtol=1e-5, atol=1e-5)


def test_tokens_select_per_position_of_a_packed_sequence() -> None:
    model = two_adapter_mlp((64, 96, 32))
    rows: list[object] = ["a", None, "b", [("a", 0.5), ("b", 2.0)], "a"]
    x = torch.randn(len(rows), 64)
    per_row = _run(model, rows, x[:, None], fold=0)[:, 0]
    packed = _run(model, rows, x[None], fold=0, tokens=True)[0]
    torch.testing.assert_close(packed, per_row, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        _run(model, rows, x[None, :3], fold=0, tokens=True)


def test_adapter_batch_walks_the_module_tree_only_after_lokr_rewraps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-step callers pay no module-tree walk: the layer list is cached until lokr wraps or unwraps a module."""
    inject_module = importlib.import_module("lokr.inject")  # `lokr.inject` is also a function
    model = two_adapter_mlp((64, 96, 32))
    walks = []
    walk = inject_module.iter_lokr_layers

    def counted(m: nn.Module):  # type: ignore[no-untyped-def]
        walks.append(m)
        return walk(m)

    monkeypatch.setattr(inject_module, "iter_lokr_layers", counted)
    x = torch.randn(2, 64)
    for _ in range(3):
        _run(model, ["a", "b"], x, fold=0)
    assert len(walks) <= 1
    model.add_module("3", nn.Linear(32, 8))
    lokr.inject(model, lokr.LoKrConfig(target_modules=["3"], init_weights=False, r=2), "c")
    assert len(lokr.lokr_layers(model)) == 3  # the new wrapper is seen
    _run(model, ["a", "c"], x, fold=0)


def test_threads_sharing_kept_folds_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-row batches from several threads share each layer's kept folds (one-adapter and mixed entries evicting
    each other at capacity 3) and every result equals its single-threaded answer."""
    model = _conv_net(monkeypatch)
    x = torch.randn(6, 8, 9, 9)
    cases = [MIXED["stacked"], MIXED["gathered"], ["a"] * 6, ["b"] * 6, [[("c", 0.5)]] * 6]
    want = [_run(model, rows, x, fold=0) for rows in cases]

    def check(seed: int) -> None:
        for step in range(30):
            k = (seed + step * (seed + 1)) % len(cases)
            torch.testing.assert_close(_run(model, cases[k], x, fold=3), want[k], rtol=1e-6, atol=1e-6)

    run_in_threads(check)
