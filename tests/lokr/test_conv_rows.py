"""Mixed-adapter rows on every layer kind: the folded-weight and per-adapter paths equal per-row dense deltas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr
import lokr.merged
from lokr.inject import iter_lokr_layers

LAYERS = {
    "conv2d": lambda: nn.Conv2d(8, 12, 3, padding=1),
    "conv2d-strided": lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2),
    "conv2d-1x1": lambda: nn.Conv2d(8, 12, 1),
    "conv2d-grouped": lambda: nn.Conv2d(8, 12, 3, groups=2),
    "conv1d": lambda: nn.Conv1d(8, 12, 3, padding=1),
    "conv1d-grouped": lambda: nn.Conv1d(8, 12, 3, groups=2),
    "linear": lambda: nn.Linear(16, 24),
}
CONFIGS = {
    "lowrank": {"r": 2},
    "full": {"r": 16},  # full w2 (PEFT's swapped layout on Conv1d)
    "cp": {"r": 2, "use_effective_conv2d": True},
    "decompose-both": {"r": 1, "decompose_both": True},
}
F_ = TypeVar("F_", bound=Callable[..., None])


def every_layer_and_config(test: F_) -> F_:
    """Run `test(layer, config, ...)` on every layer kind crossed with every LoKr config."""
    by_config = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())(test)
    return pytest.mark.parametrize("layer", LAYERS, ids=LAYERS.keys())(by_config)


ROWS: list[Any] = ["a0", None, [("a1", 0.5), ("a2", -2.0)], "a1", "a0", [("a0", 1.0), ("a0", 0.25)]]


def _model(layer: str, config: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(LAYERS[layer]()).double().eval()
    for i in range(3):
        cfg = lokr.LoKrConfig(target_modules=["0"], init_weights=False, alpha=3, **config)
        lokr.inject(model, cfg, f"a{i}")
    model.double()
    return model


def _forced(layer: str, config: dict[str, Any], fold: bool, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """`_model`, with the cost model forced to fold (`fold`) or to run the factored deltas everywhere."""
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0 if fold else 10**12)
    return _model(layer, config)


def _input(layer: str, rows: int) -> torch.Tensor:
    shape = {"linear": (rows, 3, 16), "conv1d": (rows, 8, 9)}.get(layer.split("-")[0], (rows, 8, 7, 7))
    return torch.randn(*shape, dtype=torch.float64)


def _reference(model: nn.Module, rows: list[Any], x: torch.Tensor) -> torch.Tensor:
    layer = model[0]  # type: ignore[index]
    spec = layer.spec
    out = []
    for i, row in enumerate(rows):
        want = layer.base_layer(x[i : i + 1])
        for name, scale in [] if row is None else [(row, 1.0)] if isinstance(row, str) else row:
            dw = layer.get_delta_weight(name)
            if spec.kind == "linear":
                want = want + scale * F.linear(x[i : i + 1], dw)
            else:
                conv = F.conv1d if spec.kind == "conv1d" else F.conv2d
                want = want + scale * conv(
                    x[i : i + 1], dw, None, spec.stride, spec.padding, spec.dilation, spec.groups
                )
        out.append(want)
    return torch.cat(out)


@pytest.mark.parametrize("path", ["folded", "per-adapter"])
@every_layer_and_config
def test_mixed_rows_equal_dense_per_row(
    layer: str, config: dict[str, Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _forced(layer, config, path == "folded", monkeypatch)
    calls: list[int] = []
    real = lokr.layer.merged_forward
    monkeypatch.setattr(lokr.layer, "merged_forward", lambda *a: calls.append(1) or real(*a))
    x = _input(layer, len(ROWS))
    with torch.no_grad(), lokr.adapter_batch(model, ROWS):
        got = model(x)
    with torch.no_grad():
        want = _reference(model, ROWS, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert bool(calls) == (path == "folded")


def test_one_adapter_on_every_row_folds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _forced("conv2d", {"r": 2}, True, monkeypatch)
    x = _input("conv2d", 4)
    with torch.no_grad(), lokr.adapter_batch(model, [[("a1", 0.5)]] * 4) as plan:
        got = model(x)
    (prepared,) = plan.prepared.values()
    layer = model[0]
    mp = prepared.merge_plan(plan, layer._banks, layer.spec, layer.weight, x)  # built by the forward, which folded
    assert mp is not None and mp.terms == 1 and mp.selections[0].rows is None
    torch.testing.assert_close(got, _reference(model, [[("a1", 0.5)]] * 4, x), rtol=1e-10, atol=1e-10)


def test_folding_skips_bases_it_cannot_replay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect")).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "a")
    ((_, layer),) = iter_lokr_layers(model)
    assert not lokr.merged.eligible(layer.base_layer)  # PEFT's delta zero-pads; a folded weight would reflect it
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad(), lokr.adapter_batch(model, ["a", None]):
        got = model(x)
    with torch.no_grad():
        want = layer.base_layer(x[:1]) + F.conv2d(x[:1], layer.get_delta_weight("a"), None, 1, 1)
    torch.testing.assert_close(got[:1], want, rtol=1e-5, atol=1e-5)


def test_cost_model_picks_factored_for_decode_and_folded_for_images() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Conv2d(320, 320, 3, padding=1)).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "1"], init_weights=False, r=8), "a")
    layers = dict(iter_lokr_layers(model))
    plan = lokr.batch.RowPlan.from_rows(["a"] * 2)
    decisions = {}
    for name, x in {"0": torch.randn(2, 1, 1024), "1": torch.randn(2, 320, 32, 32)}.items():
        layer = layers[name]
        mp = layer._prepare(plan).merge_plan(plan, layer._banks, layer.spec, layer.weight, x)  # None: cannot win
        decisions[name] = mp is not None and lokr.merged.cheaper(mp, x, layer.spec, layer.weight)
    assert decisions == {"0": False, "1": True}


def test_cost_model_counts_each_linear_row_once_per_own_adapter() -> None:
    """A packed prefill of 16 prompts, each with its own adapter: a Linear row pays its own adapter's delta only
    (the bank pass computes one entry per row), so 512 such rows stay factored; rows that sum every adapter pay
    all 16; a conv, which runs one delta per adapter, still counts every adapter present."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Conv2d(16, 16, 3, padding=1)).eval()
    for i in range(16):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "1"], init_weights=False, r=8), f"a{i}")
    layers = dict(iter_lokr_layers(model))
    linear, conv = layers["0"], layers["1"]
    one = linear._banks.bank_of("a0").factored_cost(linear.spec)  # type: ignore[union-attr]
    own = lokr.batch.RowPlan.from_rows([f"a{i // 32}" for i in range(512)], tokens=True)
    summed = lokr.batch.RowPlan.from_rows([[(f"a{i}", 1.0) for i in range(16)]] * 512, tokens=True)
    x = torch.randn(512, 1, 512)
    assert linear._prepare(own).factored == one
    assert linear._prepare(summed).factored == 16 * one
    mp = lokr.merged.plan_merge(own, [f"a{i}" for i in range(16)], linear._banks, linear.spec, x.device)
    assert mp.factored_cost == one and not lokr.merged.cheaper(mp, x, linear.spec, linear.weight)
    mixed = lokr.batch.RowPlan.from_rows([f"a{i}" for i in range(16)])
    conv_one = conv._banks.bank_of("a0").factored_cost(conv.spec)  # type: ignore[union-attr]
    assert conv._prepare(mixed).factored == 16 * conv_one


@pytest.mark.parametrize("layer", ["conv2d", "linear"])
def test_consecutive_selections_fold_on_slices(layer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows grouped by selection: each selection's op reads a slice of the input, no gather / scatter."""
    model = _model(layer, {"r": 2})
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)
    rows: list[Any] = ["a0", "a0", None, [("a1", 0.5), ("a2", -2.0)], [("a1", 0.5), ("a2", -2.0)], "a1"]
    x = _input(layer, len(rows))
    calls: list[str] = []  # gathers / scatters of activations (the factor bank's own 2-D gather is not one)
    for method in ("index_select", "index_copy_"):
        real = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *a: Any, _real: Any = real, _name: str = method) -> torch.Tensor:
            if self.dim() > 2:
                calls.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, method, counted)
    with torch.no_grad(), lokr.adapter_batch(model, rows):
        got = model(x)
    monkeypatch.undo()
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(model, rows, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_fold_operands_kept_until_an_adapter_changes(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady selection does not rebuild its kron operands each step; a factor edit, a new scale or a bank
    resize (another adapter attached) is seen by the very next forward."""
    model = _model("conv2d", {"r": 2})
    layer = model[0]
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)
    builds: list[int] = []
    bank = layer._banks.bank_of("a0")
    real = bank.kron_operands
    monkeypatch.setattr(bank, "kron_operands", lambda *a: builds.append(1) or real(*a))
    rows: list[Any] = ["a0", "a0", [("a1", 0.5)], "a2"]
    x = _input("conv2d", len(rows))
    context = torch.inference_mode if mode == "inference" else torch.no_grad

    def step() -> torch.Tensor:
        with context(), lokr.adapter_batch(model, rows):
            got = model(x)
        with torch.no_grad():
            torch.testing.assert_close(got, _reference(model, rows, x), rtol=1e-10, atol=1e-10)
        return got

    first = step()
    torch.testing.assert_close(step(), first, rtol=0, atol=0)
    assert len(builds) == 1
    with torch.no_grad():
        layer.lokr_adapters["a1"].lokr_w1.mul_(3.0)  # in place, through the bank row
    step()
    layer.lokr_adapters["a2"].scale = -1.5
    step()
    assert len(builds) == 3
    cfg = lokr.LoKrConfig(target_modules=["0"], init_weights=False, alpha=3, r=2)
    for i in range(3, 6):  # the bank grows: a new data tensor
        lokr.inject(model, cfg, f"a{i}")
    model.double()
    step()


EQUAL_SELECTIONS: dict[str, list[Any]] = {
    "one-term-each": ["a0", "a0", [("a1", 0.5)], [("a1", 0.5)], "a2", "a2"],
    "base-and-sums": ["a0", "a0", None, None, [("a1", 0.5), ("a2", -2.0)], [("a1", 0.5), ("a2", -2.0)]],
}


@pytest.mark.parametrize("rows", EQUAL_SELECTIONS.values(), ids=EQUAL_SELECTIONS.keys())
@every_layer_and_config
def test_equal_small_selections_run_as_one_op(
    layer: str, config: dict[str, Any], rows: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal-sized selections whose ops are small run as one grouped conv / batched matmul, not one op each."""
    model = _model(layer, config)
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)
    ops: list[str] = []
    for name in ("stacked_op", "base_op"):
        real = getattr(lokr.merged, name)
        monkeypatch.setattr(lokr.merged, name, lambda *a, _real=real, _name=name: ops.append(_name) or _real(*a))
    x = _input(layer, len(rows))
    with torch.no_grad(), lokr.adapter_batch(model, rows):
        got = model(x)
    assert ops == ["stacked_op"]
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(model, rows, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("limit", ["STACK_MAX_MACS", "STACK_MAX_BYTES"])
@pytest.mark.parametrize("layer", ["conv2d", "conv2d-strided", "conv2d-grouped", "conv1d", "linear", "conv2d-1x1"])
def test_large_selections_run_apart(layer: str, limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the size where a grouped kernel loses, or when the selections' folded weights would not fit the
    budget, each selection keeps its own op (pointwise convs stack at any size: their stacked form is a matmul,
    which won at every size measured)."""
    model = _model(layer, {"r": 2})
    monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0)
    monkeypatch.setattr(lokr.merged, limit, 0)
    ops: list[str] = []
    for name in ("stacked_op", "base_op"):
        real = getattr(lokr.merged, name)
        monkeypatch.setattr(lokr.merged, name, lambda *a, _real=real, _name=name: ops.append(_name) or _real(*a))
    rows = EQUAL_SELECTIONS["one-term-each"]
    x = _input(layer, len(rows))
    with torch.no_grad(), lokr.adapter_batch(model, rows):
        got = model(x)
    assert ops == (["stacked_op"] if layer == "conv2d-1x1" and limit == "STACK_MAX_MACS" else ["base_op"] * 3)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(model, rows, x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------- set_adapter: a plain forward at inference
@pytest.mark.parametrize("path", ["folded", "factored"])
@every_layer_and_config
def test_active_adapters_fold_into_one_op_where_cheaper(
    layer: str, config: dict[str, Any], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _forced(layer, config, path == "folded", monkeypatch)
    folds = _count_folds(monkeypatch)
    lokr.set_adapter(model, ["a0", "a2"])
    x = _input(layer, 3)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _reference(model, [[("a0", 1.0), ("a2", 1.0)]] * 3, x), rtol=1e-10, atol=1e-10)
    assert folds == ([1] if path == "folded" else [])


def test_active_adapter_cost_model_folds_images_not_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Conv2d(320, 320, 3, padding=1)).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "1"], init_weights=False, r=8), "a")
    lokr.set_adapter(model, "a")
    layers = dict(iter_lokr_layers(model))
    folds = _count_folds(monkeypatch)
    with torch.inference_mode():
        layers["0"](torch.randn(2, 1, 1024))  # decode: two tokens; the factored delta wins
        assert folds == []
        layers["1"](torch.randn(2, 320, 32, 32))  # two 32x32 latents: folding wins
        assert folds == [1]


def test_active_adapter_keeps_the_factored_path_for_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _forced("conv2d", {"r": 2}, True, monkeypatch)
    folds = _count_folds(monkeypatch)
    lokr.set_adapter(model, "a1")
    model(_input("conv2d", 2)).sum().backward()
    assert folds == []
    adapter = model[0]._adapter("a1")  # type: ignore[index]
    assert all(p.grad is not None for p in adapter.parameters())


def test_active_adapter_fold_reads_factors_replaced_behind_the_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _forced("conv2d", {"r": 2}, True, monkeypatch)
    lokr.set_adapter(model, "a1")
    x = _input("conv2d", 2)
    with torch.no_grad():
        model(x)  # folds (and keeps the kron operands of) the factors as they are
        w1 = model[0]._adapter("a1").lokr_w1  # type: ignore[index]
        w1.data = w1.data * 3  # new storage, not through the bank
        got = model(x)
    torch.testing.assert_close(got, _reference(model, ["a1"] * 2, x), rtol=1e-10, atol=1e-10)


def _count_folds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each folded weight a plain forward builds (`merged.folded_weight` returning one)."""
    calls: list[int] = []
    real = lokr.merged.folded_weight

    def spy(*args: Any) -> torch.Tensor | None:
        out = real(*args)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(lokr.layer, "folded_weight", spy)
    return calls
