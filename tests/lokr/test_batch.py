"""Per-row (mixed adapter) batches: `with lokr.adapter_batch(model, rows): model(x)`."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr
from lokr.batch import current_plan, restrict_rows
from lokr.inject import iter_lokr_layers

TOL = {"atol": 1e-5, "rtol": 1e-5}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 16)
        self.lin1 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 6, 3, groups=2)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, 8, 6, 6)
        g = self.grouped(h)  # (B, 8, 4, 4)
        return self.conv1d(g.flatten(2))  # (B, 6, 14)


def _with_adapters(build: Callable[[], nn.Module], targets: list[str]) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    torch.manual_seed(1)
    lokr.inject(model, lokr.LoKrConfig(target_modules=targets, init_weights=False, r=2, alpha=3), "a")
    lokr.inject(model, lokr.LoKrConfig(target_modules=targets[:1], init_weights=False, r=8), "b")
    lokr.inject(model, lokr.LoKrConfig(target_modules=targets, init_weights=False, decompose_both=True, r=1), "c")
    return model


@pytest.fixture
def mlp() -> nn.Module:
    return _with_adapters(MLP, ["lin0", "lin1"])


@pytest.fixture
def convnet() -> nn.Module:
    return _with_adapters(ConvNet, ["conv2d", "conv1d", "grouped"])


def _selection(model: nn.Module, spec: Any) -> nn.Module:
    """A copy of `model` whose plain forward uses `spec` (name / None / (name, scale) pairs)."""
    copy_ = copy.deepcopy(model)
    if spec is None:
        lokr.set_adapter(copy_, None)
        return copy_
    pairs = [(spec, 1.0)] if isinstance(spec, str) else list(spec.items() if isinstance(spec, dict) else spec)
    for _, layer in iter_lokr_layers(copy_):
        for name, scale in pairs:
            if name in layer.lokr_adapters:
                layer.lokr_adapters[name].scale *= scale
    lokr.set_adapter(copy_, [name for name, _ in pairs])
    return copy_


def _row_by_row(model: nn.Module, rows: Sequence[Any], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_selection(model, spec)(x[i : i + 1]) for i, spec in enumerate(rows)])


ROWS: list[Any] = [
    "a",
    None,
    [("a", 0.5), ("b", 2.0)],
    "b",
    {"c": -1.0},
    "a",
    [("b", 1.0), ("c", 0.25), ("a", 1.0)],
]


def test_mixed_rows_equal_each_row_alone(mlp: nn.Module) -> None:
    x = torch.randn(len(ROWS), 12)
    with torch.no_grad(), lokr.adapter_batch(mlp, ROWS):
        y = mlp(x)
    torch.testing.assert_close(y, _row_by_row(mlp, ROWS, x), **TOL)
    # rows really differ by adapter
    with torch.no_grad():
        assert not torch.allclose(y[0], _selection(mlp, None)(x[:1])[0])


def test_mixed_rows_on_convs(convnet: nn.Module) -> None:
    x = torch.randn(len(ROWS), 4, 6, 6)
    with torch.no_grad(), lokr.adapter_batch(convnet, ROWS):
        y = convnet(x)
    torch.testing.assert_close(y, _row_by_row(convnet, ROWS, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [["a"] * 3, [[("a", 0.5)]] * 3, [None] * 3, [{"a": 1.0, "b": 2.0}] * 3])
def test_uniform_rows(mlp: nn.Module, rows: list[Any]) -> None:
    x = torch.randn(3, 12)
    with torch.no_grad(), lokr.adapter_batch(mlp, rows):
        y = mlp(x)
    torch.testing.assert_close(y, _row_by_row(mlp, rows, x), **TOL)


def test_composition_is_sum_of_scaled_deltas(mlp: nn.Module) -> None:
    layer = dict(iter_lokr_layers(mlp))["lin0"]
    x = torch.randn(2, 12)
    with torch.no_grad():
        base = layer.base_layer(x)
        d_a, d_b = layer.get_delta_weight("a"), layer.get_delta_weight("b")
        expected = base + 0.5 * F.linear(x, d_a) - 2.0 * F.linear(x, d_b)
        with lokr.adapter_batch(mlp, [[("a", 0.5), ("b", -2.0)], [("a", 0.5), ("b", -1.0), ("b", -1.0)]]):
            got = layer(x)
    torch.testing.assert_close(got, expected, **TOL)


def test_scope_is_cleared_after_block_and_after_error(mlp: nn.Module) -> None:
    x = torch.randn(2, 12)
    lokr.set_adapter(mlp, None)
    with torch.no_grad():
        base = mlp(x)
        with lokr.adapter_batch(mlp, ["a", "b"]):
            assert not torch.allclose(mlp(x), base)
        torch.testing.assert_close(mlp(x), base, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="boom"), lokr.adapter_batch(mlp, ["a", "a"]):
            raise RuntimeError("boom")
        torch.testing.assert_close(mlp(x), base, atol=0, rtol=0)
    assert all(current_plan(layer) is None for _, layer in iter_lokr_layers(mlp))


def test_scope_does_not_touch_set_adapter_state(mlp: nn.Module) -> None:
    lokr.set_adapter(mlp, "b")
    active = [list(layer.active_adapters) for _, layer in iter_lokr_layers(mlp)]
    x = torch.randn(2, 12)
    with torch.no_grad():
        before = mlp(x)
        with lokr.adapter_batch(mlp, [None, None]):
            torch.testing.assert_close(mlp(x), _selection(mlp, None)(x), **TOL)
        torch.testing.assert_close(mlp(x), before, atol=0, rtol=0)
    assert [layer.active_adapters for _, layer in iter_lokr_layers(mlp)] == active == [["b"], []]


def test_selection_is_not_visible_in_another_thread(mlp: nn.Module) -> None:
    lokr.set_adapter(mlp, None)
    x = torch.randn(3, 12)
    with torch.no_grad():
        base, adapted = mlp(x), _selection(mlp, "a")(x)
    opened, checked = threading.Barrier(2, timeout=20), threading.Barrier(2, timeout=20)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with torch.no_grad(), lokr.adapter_batch(mlp, ["a"] * 3):
                opened.wait()
                checked.wait()  # the other thread ran its forward while this scope was open
                results["holder"] = mlp(x)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def other() -> None:
        try:
            opened.wait()
            with torch.no_grad():
                results["other"] = mlp(x)
            results["plans"] = [current_plan(layer) for _, layer in iter_lokr_layers(mlp)]
            checked.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    torch.testing.assert_close(results["other"], base, atol=0, rtol=0)
    assert results["plans"] == [None] * len(results["plans"])
    torch.testing.assert_close(results["holder"], adapted, **TOL)


def test_base_rows_run_base_ops_and_prepare_nothing(mlp: nn.Module) -> None:
    """A batch of base rows only (a base-model step of the server) skips every layer's per-step preparation."""
    x = torch.randn(3, 12)
    with torch.inference_mode(), lokr.adapter_batch(mlp, [None] * 3) as plan:
        y = mlp(x)
    assert plan.prepared == {}
    with torch.no_grad():
        torch.testing.assert_close(y, _selection(mlp, None)(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows"), lokr.adapter_batch(mlp, [None] * 3):
        mlp(torch.randn(2, 12))


@pytest.mark.parametrize("rows", [[None] * 3, ["a"] * 3, ["a", "b", "c"]], ids=["base", "one", "mixed"])
def test_per_row_forwards_answer_in_the_input_dtype_under_autocast(mlp: nn.Module, rows: list[Any]) -> None:
    """Under autocast the base ops compute in bfloat16; every per-row path casts back to the input's dtype, as a
    plain forward does (base rows, one folded adapter, bank deltas)."""
    x = torch.randn(3, 12)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        with lokr.adapter_batch(mlp, rows, fold=1):
            first = mlp(x)
        with lokr.adapter_batch(mlp, rows, fold=1):  # the one-adapter block now runs on the kept folded weight
            again = mlp(x)
    assert first.dtype == again.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(again, _row_by_row(mlp, rows, x), rtol=0.05, atol=0.05)


def test_unknown_adapter_raises(mlp: nn.Module) -> None:
    with pytest.raises(lokr.AdapterNotFoundError, match="nope"), lokr.adapter_batch(mlp, ["a", "nope"]):
        pass
    with pytest.raises(lokr.AdapterNotFoundError), lokr.adapter_batch(mlp, [[("a", 1.0), ("zzz", 2.0)]]):
        pass


def test_wrong_row_count_raises(mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match="rows"), lokr.adapter_batch(mlp, ["a", "b", None]):
        mlp(torch.randn(2, 12))


@pytest.mark.parametrize("bad", [[("a",)], [("a", float("nan"))], [("a", float("inf"))], [(3, 1.0)]])
def test_bad_row_spec_raises(mlp: nn.Module, bad: Any) -> None:
    with pytest.raises(lokr.ConfigError), lokr.adapter_batch(mlp, [bad]):
        pass


def test_merged_model_refuses(mlp: nn.Module) -> None:
    lokr.merge_adapter(mlp, "a")
    with pytest.raises(lokr.AdapterStateError), lokr.adapter_batch(mlp, ["a"]):
        pass
    lokr.unmerge_adapter(mlp)
    with lokr.adapter_batch(mlp, ["a"]):
        pass


def test_gradients_flow_per_row(mlp: nn.Module) -> None:
    adapter = dict(iter_lokr_layers(mlp))["lin0"].lokr_adapters["a"]
    for p in adapter.parameters():
        p.requires_grad_(True)
    x = torch.randn(3, 12)
    with lokr.adapter_batch(mlp, ["a", None, "b"]):
        mlp(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_restrict_rows_keeps_only_the_layers_adapters() -> None:
    """A scope over one layer: names it lacks leave each row (a row left with none runs the base op), repeated
    specs stay one object's answer, and scales are kept."""
    composed = [("a", 0.5), ("b", 2.0)]
    only_b = {"b": 1.5, "c": 1.0}
    rows = ["a", "b", None, composed, composed, only_b]
    assert restrict_rows(rows, {"b"}) == [None, "b", None, [("b", 2.0)], [("b", 2.0)], [("b", 1.5)]]
    assert restrict_rows(rows, {"z"}) == [None] * 6
    assert restrict_rows(rows, {"a", "b", "c"})[3:] == [composed, composed, [("b", 1.5), ("c", 1.0)]]
