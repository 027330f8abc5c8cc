"""A Linear layer's bank pass (`lokr.bankpass`) reads its operands once per kept plan: a plan's first forwards keep
nothing, its next ones keep what they read (contiguous row-major copies for one row per entry), and any write to
the adapters since (through a parameter, a scale, the bank itself) is read by the next block, equal to a fresh plan."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import lokr
from lokr import plancache
from lokr.bankpass import READ_EACH_TIME, BankPass

from .nets import two_adapter_mlp

ROWS = ["a", "b", "a", None]


def _block(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), lokr.adapter_batch(model, ROWS):  # type: ignore[arg-type]
        return model(x).clone()


def _fresh(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plancache.forget_plan(model)
    return _block(model, x)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every operand read of a bank pass, by whether it was row-major."""
    calls: list[bool] = []
    original = BankPass._read

    def counted(self: BankPass, spec: object, row_major: bool) -> object:
        calls.append(row_major)
        return original(self, spec, row_major)  # type: ignore[arg-type]

    monkeypatch.setattr(BankPass, "_read", counted)
    return calls


X_SHAPES = {"one row each": (4, 32), "five rows each": (4, 5, 32)}


@pytest.mark.parametrize("shape", X_SHAPES.values(), ids=list(X_SHAPES))
def test_a_kept_plan_reads_each_pass_once_more_then_never(shape: tuple[int, ...], reads: list[bool]) -> None:
    model = two_adapter_mlp()
    x = torch.randn(shape)
    outs = [_block(model, x) for _ in range(READ_EACH_TIME)]  # each of the 2 layers' pass reads views, keeps nothing
    assert reads == [False, False] * READ_EACH_TIME
    kept = _block(model, x)  # the plan is kept: each pass reads what it keeps from now on
    one_each = len(shape) == 2
    assert reads[2 * READ_EACH_TIME :] == [one_each, one_each]
    for _ in range(3):
        torch.testing.assert_close(_block(model, x), kept, rtol=0, atol=0)
    assert len(reads) == 2 * READ_EACH_TIME + 2
    for out in outs:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(kept, outs[0])
    torch.testing.assert_close(kept, _fresh(model, x))


def _edit_a_parameter_in_place(model: nn.Module) -> None:
    params = dict(model[0].lokr_adapters["b"].named_parameters())
    with torch.no_grad():
        params.get("lokr_w2_b", params.get("lokr_w2")).mul_(-3.0)  # type: ignore[union-attr]


def _copy_into_a_parameter(model: nn.Module) -> None:
    w1 = model[2].lokr_adapters["a"].lokr_w1
    with torch.no_grad():
        w1.copy_(torch.randn_like(w1))


def _set_a_scale(model: nn.Module) -> None:
    model[2].lokr_adapters["b"].scale = 5.0


EDITS: dict[str, Callable[[nn.Module], None]] = {
    "parameter edited in place": _edit_a_parameter_in_place,
    "parameter copied into": _copy_into_a_parameter,
    "scale set": _set_a_scale,
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=list(EDITS))
@pytest.mark.parametrize("shape", X_SHAPES.values(), ids=list(X_SHAPES))
def test_a_write_after_operands_were_kept_is_read_by_the_next_block(
    shape: tuple[int, ...], edit: Callable[[nn.Module], None]
) -> None:
    model = two_adapter_mlp()
    x = torch.randn(shape)
    for _ in range(READ_EACH_TIME):
        _block(model, x)
    kept = _block(model, x)  # operands kept now
    edit(model)
    after = _block(model, x)
    assert not torch.allclose(after, kept)
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)
    torch.testing.assert_close(_block(model, x), after, rtol=0, atol=0)  # and kept again from there


@pytest.mark.parametrize("shape", X_SHAPES.values(), ids=list(X_SHAPES))
def test_a_scale_set_inside_an_open_block_is_read_by_its_next_forward(shape: tuple[int, ...]) -> None:
    """The bank's own writes (a scale lives in its rows) are checked at every forward, not only as a block opens."""
    model = two_adapter_mlp()
    x = torch.randn(shape)
    with torch.inference_mode(), lokr.adapter_batch(model, ROWS):  # type: ignore[arg-type]
        for _ in range(READ_EACH_TIME):
            model(x)
        kept = model(x).clone()
        _set_a_scale(model)
        after = model(x).clone()
    assert not torch.allclose(after, kept)
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)


def test_under_parameters_unwritten_blocks_skip_the_parameter_checks_but_not_the_banks() -> None:
    """The promise a serving engine makes: no re-read of every parameter's version as a block opens (a write through
    a parameter inside it goes unseen, as promised), while writes through lokr (a scale, an attach) are still read;
    outside the promise the parameter write is read again."""
    model = two_adapter_mlp()
    x = torch.randn(4, 32)
    for _ in range(READ_EACH_TIME):
        _block(model, x)
    kept = _block(model, x)
    with lokr.parameters_unwritten():
        _edit_a_parameter_in_place(model)
        torch.testing.assert_close(_block(model, x), kept, rtol=0, atol=0)  # skipped: the caller promised
    seen = _block(model, x)
    assert not torch.allclose(seen, kept)
    with lokr.parameters_unwritten():
        _set_a_scale(model)  # through the bank: its version is checked at every forward
        scaled = _block(model, x)
    assert not torch.allclose(scaled, seen)
    torch.testing.assert_close(scaled, _fresh(model, x), rtol=0, atol=0)
