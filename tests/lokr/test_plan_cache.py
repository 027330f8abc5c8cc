"""A block with the rows of the model's block before reuses its plan and every layer's share of it
(`lokr.plancache`): nothing is prepared again, and the answer is the one a fresh plan gives. Anything that changes
what the layers prepared from (adapters loaded, deleted, re-scaled, refreshed, a module wrapped, a hook on a base
layer, an edit of a folded adapter) makes the next block see it."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

import lokr
from lokr import plancache
from lokr.layer import LoKrLayer

from .nets import two_adapter_mlp


def _run(model: nn.Module, rows: list[object], x: torch.Tensor, fold: int = 0) -> tuple[torch.Tensor, object]:
    with torch.inference_mode(), lokr.adapter_batch(model, rows, fold=fold) as plan:  # type: ignore[arg-type]
        return model(x).clone(), plan


def _fresh(model: nn.Module, rows: list[object], x: torch.Tensor, fold: int = 0) -> torch.Tensor:
    """The answer of a plan built now (nothing kept)."""
    plancache.forget_plan(model)
    return _run(model, rows, x, fold)[0]


@pytest.fixture
def prepares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every `LoKrLayer._prepare` call, by layer id."""
    calls: list[int] = []
    original = LoKrLayer._prepare

    def counted(self: LoKrLayer, plan: object) -> object:
        calls.append(id(self))
        return original(self, plan)  # type: ignore[arg-type]

    monkeypatch.setattr(LoKrLayer, "_prepare", counted)
    return calls


ROWS: list[list[object]] = [["a", "b", None, "a"], [[("a", 0.5), ("b", 2.0)], "b", [["a", 1.0]], {"b": -1.0}]]


@pytest.mark.parametrize("rows", ROWS, ids=["names", "scaled"])
def test_the_same_rows_reuse_the_plan_and_prepare_nothing(rows: list[object], prepares: list[int]) -> None:
    model = two_adapter_mlp()
    x = torch.randn(4, 3, 32)
    first, plan = _run(model, rows, x)
    assert len(prepares) == 2
    again, kept = _run(model, list(rows), x)  # an equal list, not the same object
    assert kept is plan and len(prepares) == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other, new = _run(model, rows[::-1], x)
    assert new is not plan and len(prepares) == 4
    torch.testing.assert_close(other, _fresh(model, rows[::-1], x), rtol=0, atol=0)


def test_a_plan_open_in_one_block_is_not_shared_with_a_nested_one() -> None:
    model = two_adapter_mlp()
    x = torch.randn(2, 32)
    with torch.inference_mode(), lokr.adapter_batch(model, ["a", "b"]) as outer:
        with lokr.adapter_batch(model, ["a", "b"]) as inner:
            assert inner is not outer
            nested = model(x)
        torch.testing.assert_close(model(x), nested, rtol=0, atol=0)


def _scale(model: nn.Module) -> None:
    model[0].lokr_adapters["a"].scale = 3.0


def _load(model: nn.Module) -> None:
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "2"], init_weights=False, r=2), "c")


def _delete(model: nn.Module) -> None:
    lokr.delete_adapter(model, "b")


def _replace(model: nn.Module) -> None:
    """Layer by layer (no model-level call), a third adapter (its bank grows: new storage) and "a" replaced by a copy
    of "b": the rows name the same adapters; their factors and where they live are new."""
    for layer in (model[0], model[2]):
        layer.add_adapter("c", copy.deepcopy(layer.lokr_adapters["b"]))
        layer.add_adapter("a", copy.deepcopy(layer.lokr_adapters["b"]))


def _edit_in_place(model: nn.Module) -> None:
    with torch.no_grad():
        model[2].lokr_adapters["a"].lokr_w1.mul_(-2.0)


def _edit_data_and_refresh(model: nn.Module) -> None:
    model[2].lokr_adapters["a"].lokr_w1.data = torch.randn_like(model[2].lokr_adapters["a"].lokr_w1)
    lokr.refresh(model)


def _wrap_a_module(model: nn.Module) -> None:
    model.append(nn.Linear(16, 16))
    lokr.inject(model, lokr.LoKrConfig(target_modules=["3"], init_weights=False, r=2), "d")


CHANGES = {  # what it does, and whether it changes the answer for rows that use "a" (and "b", if they do)
    "scale": (_scale, True),
    "load": (_load, False),
    "delete": (_delete, None),
    "replace": (_replace, True),  # only rows that used "b" (they run the base model now)
    "edit in place": (_edit_in_place, True),
    "edit .data + refresh": (_edit_data_and_refresh, True),
    "wrap a module": (_wrap_a_module, True),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=list(CHANGES))
@pytest.mark.parametrize("fold", [0, 2])
@pytest.mark.parametrize("rows", [["a", "a", "a"], ["a", "b", None]], ids=["one adapter", "mixed"])
def test_a_change_between_blocks_is_seen_by_the_next(rows: list[object], fold: int, change: tuple) -> None:
    apply, changes_answer = change
    model = two_adapter_mlp()
    x = torch.randn(3, 32)
    before, _ = _run(model, rows, x, fold)
    apply(model)
    if changes_answer is None:
        changes_answer = "b" in rows
        rows = [None if r == "b" else r for r in rows]
    after, _ = _run(model, rows, x, fold)
    torch.testing.assert_close(after, _fresh(model, rows, x, fold), rtol=0, atol=0)
    assert torch.equal(after, before) is not changes_answer


def test_a_hook_added_to_a_base_layer_runs_in_the_next_block() -> None:
    model = two_adapter_mlp()
    x = torch.randn(3, 32)
    _run(model, ["a"] * 3, x, fold=2)  # one adapter on every row: the base op runs on a folded weight
    seen: list[int] = []
    model[0].base_layer.register_forward_hook(lambda module, args, out: seen.append(1))
    after, _ = _run(model, ["a"] * 3, x, fold=2)
    assert seen  # not skipped by the folded weight prepared before the hook came
    torch.testing.assert_close(after, _fresh(model, ["a"] * 3, x, fold=2), rtol=1e-6, atol=1e-6)


def test_deleting_an_adapter_frees_what_the_kept_plan_ran_on() -> None:
    model = two_adapter_mlp()
    _run(model, ["a", "b"], torch.randn(2, 32))
    bank = model[0]._banks.bank_of("b")
    assert bank is not None
    data = weakref.ref(bank.data)
    del bank
    lokr.delete_adapter(model, "b")
    lokr.delete_adapter(model, "a")
    gc.collect()
    assert data() is None


def test_copies_and_pickles_of_a_model_carry_no_plan() -> None:
    model = two_adapter_mlp()
    x = torch.randn(2, 32)
    want, _ = _run(model, ["a", "b"], x)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other not in plancache._PLANS.by_model
        got, _ = _run(other, ["a", "b"], x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_model_that_goes_away_takes_its_plan_with_it() -> None:
    model = two_adapter_mlp()
    _run(model, ["a", "b"], torch.randn(2, 32))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_rows_that_cannot_be_keys_are_planned_every_time() -> None:
    model = two_adapter_mlp()
    x = torch.randn(2, 32)
    rows: list[object] = [[["a", 1.0]], [["b", {}]]]  # a pair holding a dict: no key; refused as a scale anyway
    with pytest.raises(lokr.ConfigError):
        _run(model, rows, x)
    assert plancache.rows_key([[["a", 1.0]], "b"], False, 0) == (((("a", 1.0),), "b"), False, 0)
    assert plancache.rows_key([{"a": 1.0}], False, 0) != plancache.rows_key([[("a", 1.0)]], False, 0)
    assert plancache.rows_key([[["b", {}]]], False, 0) is None
