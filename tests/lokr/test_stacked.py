"""Factor banks: the one copy of each adapter; the batched mixed-adapter Linear path equals dense per-row deltas."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr
from lokr.inject import iter_lokr_layers

from .threads import run_in_threads

CONFIGS = {
    "lowrank-w2": {"r": 2},
    "full-w2": {"r": 16},
    "decompose-both": {"r": 1, "decompose_both": True},
    "factor-4": {"r": 2, "decompose_factor": 4},
}
ROWS = {
    "permutation": ["a2", "a0", "a1", "a0"],
    "mixed": ["a0", None, [("a1", 0.5), ("a2", 2.0)], [("a0", -1.0)]],
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_stacked_rows_equal_dense(config: dict[str, object], rows: list[object]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96)).eval().double()
    for i in range(3):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, **config), f"a{i}")  # type: ignore[arg-type]
    layer = model[0]
    for adapter in layer.lokr_adapters.values():
        adapter.double()
    x = torch.randn(len(rows), 5, 64, dtype=torch.float64)
    with torch.no_grad(), lokr.adapter_batch(model, rows):  # type: ignore[arg-type]
        got = model(x)
    assert layer.bank_nbytes > 0
    with torch.no_grad():
        for i, row in enumerate(rows):
            want = layer.base_layer(x[i])
            for name, scale in _pairs(row):
                want = want + scale * F.linear(x[i], layer.get_delta_weight(name))
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)


def _pairs(row: object) -> list[tuple[str, float]]:
    if row is None:
        return []
    if isinstance(row, str):
        return [(row, 1.0)]
    return list(row)  # type: ignore[call-overload]


# ------------------------------------------------------------------------------------------ bank lifecycle
def _net(n: int, **config: object) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96)).eval()
    for i in range(n):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, **config), f"a{i}")  # type: ignore[arg-type]
    return model


def _mixed(model: nn.Module, rows: list[object], x: torch.Tensor, mode: str = "no_grad") -> torch.Tensor:
    guard = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with guard, lokr.adapter_batch(model, rows):  # type: ignore[arg-type]
        return model(x).clone()


def _dense(model: nn.Module, rows: list[object], x: torch.Tensor) -> torch.Tensor:
    layer = model[0]  # type: ignore[index]
    with torch.no_grad():
        out = []
        for i, row in enumerate(rows):
            want = layer.base_layer(x[i])
            for name, scale in _pairs(row):
                want = want + scale * F.linear(x[i], layer.get_delta_weight(name))
            out.append(want)
        return torch.stack(out)


ROW_MIX = ["a0", "a1", None, [("a0", 0.5), ("a2", -1.0)], "a2"]


def _check(model: nn.Module, rows: list[object] = ROW_MIX, mode: str = "no_grad") -> None:
    x = torch.randn(len(rows), 3, 64)
    torch.testing.assert_close(_mixed(model, rows, x, mode), _dense(model, rows, x), rtol=1e-5, atol=1e-5)


def test_banks_work_in_and_out_of_inference_mode() -> None:
    model = _net(3, r=2)
    _check(model, mode="inference")  # banks created inside inference mode stay writable outside it
    _check(model, mode="no_grad")
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "a3")
    _check(model, ["a3", "a0", "a1"], mode="no_grad")
    _check(model, ["a1", "a3"], mode="inference")


@pytest.mark.parametrize("change", ["in_place", "state_dict", "scale", "replace", "attach_over", "parameter"])
def test_a_changed_adapter_is_restacked(change: str) -> None:
    model = _net(3, r=2)
    layer = model[0]
    _check(model)
    adapter = layer.lokr_adapters["a1"]
    with torch.no_grad():
        if change == "in_place":
            adapter.lokr_w1.mul_(3.0)
        elif change == "state_dict":
            state = {k: torch.randn_like(v) for k, v in adapter.state_dict().items()}
            adapter.load_state_dict(state)
        elif change == "scale":
            adapter.scale = 0.25
        elif change == "attach_over":  # same name, same shapes, same scale, a fresh (packed) buffer
            fresh = copy.deepcopy(adapter)
            with torch.no_grad():
                for p in fresh.parameters():
                    p.normal_()
            layer.add_adapter("a1", fresh)
        elif change == "replace":
            lokr.delete_adapter(model, "a1")
            lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "a1")
        else:
            adapter.lokr_w2_b = nn.Parameter(torch.randn_like(adapter.lokr_w2_b), requires_grad=False)
    _check(model)


def test_banks_grow_and_shrink_and_stay_exact() -> None:
    model = _net(40, r=2)
    layer = model[0]
    names = [f"a{i}" for i in range(40)]
    _check(model, [*names, [("a3", 0.5), ("a17", 1.0)]])
    (bank,) = layer._banks._banks.values()
    assert 40 <= bank.capacity <= 41  # at most ~3% spare slots
    grown = bank.nbytes
    for name in names[:36]:  # unloads free slots (zeroed) and shrink the bank; survivors move slots
        lokr.delete_adapter(model, name)
    (bank,) = layer._banks._banks.values()
    assert bank.nbytes < grown and sorted(bank.slots) == names[36:]
    free = [slot for slot in range(bank.capacity) if slot not in bank.slots.values()]
    assert torch.count_nonzero(bank.data[free]) == 0  # nothing of unloaded adapters is kept
    _check(model, ["a36", "a39", None, [("a37", 2.0), ("a38", 1.0)]])
    for name in names[36:]:
        lokr.delete_adapter(model, name)
    assert layer.bank_nbytes == 0  # an empty bank is dropped


def test_adapters_of_different_shapes_get_their_own_banks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96)).eval()
    for name, config in {"a0": {"r": 2}, "a1": {"r": 16}, "a2": {"r": 1, "decompose_both": True}}.items():
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, **config), name)  # type: ignore[arg-type]
    _check(model)
    assert len(model[0]._banks._banks) == 3


def test_moving_the_model_rebuilds_banks_in_the_new_dtype() -> None:
    model = _net(3, r=2)
    _check(model)
    model.double()
    x = torch.randn(len(ROW_MIX), 2, 64, dtype=torch.float64)
    got = _mixed(model, ROW_MIX, x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _dense(model, ROW_MIX, x), rtol=1e-10, atol=1e-10)


def test_a_deep_copy_has_its_own_banks() -> None:
    model = _net(3, r=2)
    _check(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].lokr_adapters["a0"].lokr_w1.mul_(-1.0)
    _check(twin)
    _check(model)
    x = torch.randn(1, 64)
    assert not torch.allclose(_mixed(model, ["a0"], x), _mixed(twin, ["a0"], x))


def test_concurrent_mixed_batches_from_threads_are_exact() -> None:
    model = _net(12, r=2)
    names = [f"a{i}" for i in range(12)]

    def check(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(20):
            pick = torch.randint(0, 12, (6,), generator=g).tolist()
            _check(model, [names[i] for i in pick], mode="inference")

    run_in_threads(check)


def _bank_bytes(model: nn.Module) -> int:
    return sum(layer.bank_nbytes for _, layer in iter_lokr_layers(model))


@pytest.mark.parametrize("config", [{"r": 2}, {"r": 16}, {"r": 1, "decompose_both": True}])
def test_device_bytes_per_adapter_are_its_factor_bytes(config: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Conv2d(8, 16, 3), nn.Conv1d(16, 8, 3)).eval()
    targets = ["0", "1", "2"]
    for i in range(40):
        lokr.inject(model, lokr.LoKrConfig(target_modules=targets, init_weights=False, **config), f"a{i}")  # type: ignore[arg-type]
    info = lokr.describe_adapter(model, "a0")
    assert info.nbytes <= info.device_nbytes <= 1.05 * info.nbytes  # reported: its factors (and its scales)
    assert info.stacked_nbytes == 0
    assert _bank_bytes(model) <= 1.05 * 40 * info.nbytes  # allocated: one copy, spare slots included
    for _, layer in iter_lokr_layers(model):  # the parameters are the bank rows, not copies
        (bank,) = layer._banks._banks.values()
        ptr = bank.data.untyped_storage().data_ptr()
        assert all(p.untyped_storage().data_ptr() == ptr for p in layer.lokr_adapters.parameters())
    x = torch.randn(4, 64)
    with torch.no_grad(), lokr.adapter_batch(model[:1], ["a0", "a39", None, "a5"]):
        model[:1](x)
    assert _bank_bytes(model) <= 1.05 * 40 * info.nbytes  # a mixed step allocates no stacked copy


def test_in_place_edits_write_the_bank_and_are_seen_at_once() -> None:
    model = _net(3, r=2)
    layer = model[0]
    x = torch.randn(len(ROW_MIX), 3, 64)
    with torch.no_grad(), lokr.adapter_batch(model, ROW_MIX):
        before = model(x).clone()
        layer.lokr_adapters["a0"].lokr_w1.mul_(-2.0)  # inside the block: the rows it gathers are the factors
        layer.lokr_adapters["a2"].scale = 0.1
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _dense(model, ROW_MIX, x), rtol=1e-5, atol=1e-5)


def test_optimizer_steps_update_the_served_factors() -> None:
    model = _net(2, r=2)
    adapter = model[0].lokr_adapters["a1"]
    adapter.train()
    for p in adapter.parameters():
        p.requires_grad_(True)
    params = list(adapter.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    lokr.set_adapter(model, "a1")
    model(torch.randn(4, 64)).pow(2).mean().backward()
    optimizer.step()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "a2")  # may resize the bank
    assert list(adapter.parameters()) == params  # the same parameter objects, still the bank's rows
    with torch.no_grad():
        params[0].add_(0.01)  # an optimiser holding them keeps writing what is served
    adapter.eval()
    _check(model, ["a1", "a0", "a2"])


def test_an_adapter_that_changes_shape_moves_bank_and_its_neighbours_stay_exact() -> None:
    model = _net(16, r=2)
    layer = model[0]
    names = [f"a{i}" for i in range(16)]
    _check(model, names)
    for name in names[8:]:
        lokr.delete_adapter(model, name)
    (bank,) = layer._banks._banks.values()
    assert bank.capacity <= 9 and sorted(bank.slots) == names[:8]  # shrunk, survivors packed
    changed = layer.lokr_adapters["a5"]
    with torch.no_grad():  # a rank-4 w2 now: another bank; leaving the old one moves its neighbours' slots
        changed.lokr_w2_a = nn.Parameter(torch.randn(changed.lokr_w2_a.shape[0], 4), requires_grad=False)
        changed.lokr_w2_b = nn.Parameter(torch.randn(4, changed.lokr_w2_b.shape[1]), requires_grad=False)
    assert len(layer._banks._banks) == 2 and "a5" not in bank.slots
    _check(model, ["a0", "a2", "a7", "a5", None, [("a4", 0.5), ("a5", 1.0)]])


def test_detached_adapters_keep_their_values_and_lose_the_bank() -> None:
    model = _net(2, r=2)
    adapter = model[0].lokr_adapters["a0"]
    values = {k: v.clone() for k, v in adapter.state_dict().items()}
    lokr.delete_adapter(model, "a0")
    for k, v in adapter.state_dict().items():  # the caller's reference still holds the factors
        torch.testing.assert_close(v, values[k], rtol=0, atol=0)
    (bank,) = model[0]._banks._banks.values()
    assert all(p.untyped_storage().data_ptr() != bank.data.untyped_storage().data_ptr() for p in adapter.parameters())
    twin = copy.deepcopy(model[0].lokr_adapters["a1"])  # a copy of an attached adapter is not attached
    model[0].add_adapter("a0", twin)
    _check(model, ["a0", "a1"])


def test_placement_is_kept_until_an_adapter_comes_goes_or_moves() -> None:
    """`LayerBanks.place` answers a repeated adapter set from memory, and never with a bank tensor that has gone."""
    model = _net(2, r=2)
    layer = model[0]
    banks = layer._banks
    first = banks.place(["a0", "a1"])
    assert banks.place(["a0", "a1"]) is first

    def current() -> list[tuple[object, torch.Tensor, object]]:
        placed = banks.place(["a0", "a1"])
        for bank, data, pairs in placed:
            assert data is bank.data and all(bank.slots[n] == s for n, s in pairs)  # type: ignore[attr-defined]
        return placed

    for i in range(2, 6):  # the bank grows: new data tensors
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), f"a{i}")
    after_growth = current()
    assert after_growth is not first
    lokr.delete_adapter(model, "a3")
    assert current() is not after_growth
    model.double()
    assert all(data.dtype == torch.float64 for _, data, _ in current())
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    with torch.inference_mode(), lokr.adapter_batch(model, ["a0", "a1", "a0"]):
        got = model(x)
    with torch.no_grad():
        want = torch.stack(
            [
                layer.base_layer(x[i]) + F.linear(x[i], layer.get_delta_weight(n))
                for i, n in enumerate(["a0", "a1", "a0"])
            ]
        )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_prepared_attach_changes_nothing_until_attached() -> None:
    """`prepare_attach` (a server runs it off the forward thread) only reads the model; `attach_prepared` then
    attaches it, and refuses a name taken in between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    cfg = lokr.LoKrConfig(target_modules=["0", "2"], r=2, alpha=2, init_weights=False)
    lokr.inject(model, cfg, "src")
    with tempfile.TemporaryDirectory() as tmp:
        lokr.save_adapter(model, "src", tmp)
        parsed = lokr.read_adapter(tmp)
    x = torch.randn(3, 16)
    lokr.set_adapter(model, "src")
    want = model(x)
    lokr.delete_adapter(model, "src")
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lokr" not in k})
    prepared = lokr.prepare_attach(base, parsed, "a")
    assert lokr.list_adapters(base) == [] and all(type(m) is nn.Linear for m in (base[0], base[2]))
    lokr.attach_prepared(base, prepared)
    lokr.set_adapter(base, "a")
    torch.testing.assert_close(base(x), want)
    again = lokr.prepare_attach(base, parsed, "b")
    lokr.attach_prepared(base, lokr.prepare_attach(base, parsed, "c"))
    with pytest.raises(lokr.AdapterExistsError):
        lokr.attach_prepared(base, lokr.PreparedAttach("c", again.adapters))


def test_the_shared_scale_follows_every_adapter_scale_change() -> None:
    """A bank whose adapters all hold one scale runs it on the last matmul; one changed scale ends that, and the
    same scale set on all of them brings it back, each time exact (inference, one adapter per row)."""
    model = _net(3, r=2)
    layer = model[0]
    bank = layer._banks.bank_of("a0")
    rows: list[object] = ["a2", "a0", "a1", "a0"]
    assert bank is not None and bank.scales.common == layer.lokr_adapters["a0"].scale
    _check(model, rows, mode="inference")
    layer.lokr_adapters["a1"].scale = 0.25
    assert bank.scales.common is None
    _check(model, rows, mode="inference")
    for name in ("a0", "a2"):
        layer.lokr_adapters[name].scale = 0.25
    assert bank.scales.common == 0.25
    _check(model, rows, mode="inference")
    lokr.delete_adapter(model, "a2")
    assert bank.scales.common == 0.25
    _check(model, ["a1", "a0"], mode="inference")
