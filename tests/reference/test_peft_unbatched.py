"""Unbatched conv inputs, `(C, L)` for Conv1d and `(C, H, W)` for Conv2d, against the real `peft` package.

torch's convs accept them and so do PEFT's LoKr layers. lokr runs them as a batch of one in every mode: training or
eval, with or without autograd, plain forwards after `set_adapter` and one-row `adapter_batch` blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft import get_peft_model
from torch import nn

import lokr
import lokr.merged

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Conv1d(8, 12, 3, padding=1), (8, 9)),
    "conv1d-grouped": (lambda: nn.Conv1d(8, 12, 3, groups=2), (8, 9)),
    "conv2d": (lambda: nn.Conv2d(8, 12, 3, padding=1), (8, 6, 6)),
    "conv2d-strided": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2), (8, 7, 7)),
    "conv2d-1x1": (lambda: nn.Conv2d(8, 12, 1), (8, 5, 5)),
    "conv2d-grouped": (lambda: nn.Conv2d(8, 12, 3, groups=2), (8, 6, 6)),
}
CONFIGS: dict[str, dict[str, Any]] = {
    "lowrank": {"r": 2},
    "full": {"r": 16},  # a full w2 (PEFT's swapped layout on Conv1d)
    "cp": {"r": 2, "use_effective_conv2d": True},
    "decompose-both": {"r": 1, "decompose_both": True},
}
MODES = {
    "eval-no-grad": (False, False),
    "eval-grad": (False, True),
    "train-no-grad": (True, False),
    "train-grad": (True, True),
}


def _tol(layer: str) -> float:
    return 1e-3 if "grouped" in layer else 1e-5


def _pair(layer: str, config: dict[str, Any], training: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The base model, PEFT's model and lokr's, with the same freshly drawn factors, in `training` mode."""
    torch.manual_seed(0)
    base = nn.Sequential(LAYERS[layer][0]())
    cfg = {"target_modules": ["0"], "init_weights": False, **config}
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(**cfg))
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    lokr.inject(ours, lokr.LoKrConfig(**cfg))
    lokr.set_adapter(ours, "default")
    return base.train(training), peft_model.train(training), ours.train(training)


def _input(layer: str) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(*LAYERS[layer][1])


@pytest.mark.parametrize("mode", MODES, ids=MODES.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layer", LAYERS, ids=LAYERS.keys())
def test_unbatched_plain_forward_equals_peft(layer: str, config: dict[str, Any], mode: str) -> None:
    training, grad = MODES[mode]
    _, peft_model, ours = _pair(layer, config, training)
    x = _input(layer)
    with torch.set_grad_enabled(grad):
        expected = peft_model(x)
        got = ours(x)
    assert got.shape == expected.shape == ours[0].base_layer(x).shape  # type: ignore[index]
    torch.testing.assert_close(got, expected, atol=_tol(layer), rtol=_tol(layer))
    if grad:  # the adapter's factors get gradients through the unbatched input too
        got.square().sum().backward()
        assert all(p.grad is not None for p in ours[0].lokr_adapters["default"].parameters())  # type: ignore[index]


# Row batches: autograd or training take the per-adapter path; inference forwards run the factored delta or the
# folded weight (the cost model is forced either way), or with `fold=1` the weight folded as the block opens.
ROW_VARIANTS: dict[str, tuple[bool, bool, int, str | None]] = {
    "train-grad": (True, True, 0, None),
    "train-no-grad": (True, False, 0, None),
    "eval-grad": (False, True, 0, None),
    "inference-factored": (False, False, 0, "factored"),
    "inference-folded": (False, False, 0, "folded"),
    "inference-fold1": (False, False, 1, None),
}


@pytest.mark.parametrize("variant", ROW_VARIANTS, ids=ROW_VARIANTS.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("layer", LAYERS, ids=LAYERS.keys())
def test_unbatched_input_is_one_row_of_an_adapter_batch(
    layer: str, config: dict[str, Any], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    training, grad, fold, path = ROW_VARIANTS[variant]
    if path is not None:
        monkeypatch.setattr(lokr.merged, "ELEMENT_COST", 0 if path == "folded" else 10**12)
    base, peft_model, ours = _pair(layer, config, training)
    lokr.set_adapter(ours, None)
    x = _input(layer)
    with torch.set_grad_enabled(grad):
        expected = peft_model(x)
        with lokr.adapter_batch(ours, ["default"], fold=fold):
            got = ours(x)
        with lokr.adapter_batch(ours, [None], fold=fold):
            plain = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=_tol(layer), rtol=_tol(layer))
    torch.testing.assert_close(plain, base(x), atol=0.0, rtol=0.0)


def test_unbatched_rank_dropout_draws_like_peft() -> None:
    _, peft_model, ours = _pair("conv2d", {"r": 2, "rank_dropout": 0.5}, training=True)
    x = _input("conv2d")
    torch.manual_seed(3)
    expected = peft_model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_unbatched_input_with_several_rows_is_refused() -> None:
    _, _, ours = _pair("conv2d", {"r": 2}, training=False)
    with (
        torch.no_grad(),
        lokr.adapter_batch(ours, ["default", None]),
        pytest.raises(lokr.RowCountError, match="2 row selection"),
    ):
        ours(_input("conv2d"))
