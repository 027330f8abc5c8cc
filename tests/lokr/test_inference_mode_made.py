"""Adapters injected or loaded under `torch.inference_mode()` (a serving script's usual context) serve like any
other: their parameters, made as inference tensors, keep no version counter, which views, kept plans and folded
weights need; the banks give them parameters that view their rows and do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lokr

from .nets import two_adapter_mlp

ROWS: dict[str, list[object]] = {
    "one adapter": ["a", "a", "a", "a"],
    "mixed": ["a", "b", None, "a"],
    "scaled": [[("a", 0.5), ("b", 2.0)], "b", None, "a"],
}


def _model(inference: bool) -> nn.Sequential:
    with torch.inference_mode(inference):
        return two_adapter_mlp()


def _answers(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every path, each run four times (plans and folds kept from the second or third on)."""
    out = []
    with torch.inference_mode():
        lokr.set_adapter(model, "a")
        out += [model(x) for _ in range(2)]
        for fold in (0, 4):
            for rows in ROWS.values():
                for _ in range(4):
                    with lokr.adapter_batch(model, rows, fold=fold):  # type: ignore[arg-type]
                        out.append(model(x))
    return out


def test_adapters_injected_under_inference_mode_answer_as_others_do() -> None:
    x = torch.randn(4, 32)
    made_there, made_here = _answers(_model(True), x), _answers(_model(False), x)
    for got, want in zip(made_there, made_here, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rows", ROWS.values(), ids=list(ROWS))
def test_an_adapter_loaded_under_inference_mode_serves_mixed_batches(rows: list[object], tmp_path: Path) -> None:
    source = _model(False)
    lokr.save_adapter(source, "b", tmp_path / "b")
    x = torch.randn(4, 32)
    with torch.inference_mode():
        target = _model(False)
        lokr.delete_adapter(target, "b")
        lokr.load_adapter(target, tmp_path / "b", "b")
        for _ in range(4):
            with lokr.adapter_batch(target, rows, fold=4):  # type: ignore[arg-type]
                got = target(x)
        with lokr.adapter_batch(source, rows, fold=4):  # type: ignore[arg-type]
            want = source(x)
    torch.testing.assert_close(got, want)
