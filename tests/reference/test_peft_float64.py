"""A float64 model against the real `peft` package: PEFT keeps LoKr factors in float64 there (it upcasts only
half-precision adapters to float32), for fresh adapters and for a float32 adapter file loaded into the model, so
lokr's outputs agree with PEFT's to float64 rounding (~1e-12), not float32's."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lokr
from tests.reference.test_peft_parity import _lokr_factors, _peft_factors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-12
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, Any]]] = {
    "linear-full": (lambda: nn.Linear(24, 36), (5, 24), {"r": 8}),
    "linear-lowrank": (lambda: nn.Linear(64, 64), (3, 7, 64), {"r": 2}),
    "linear-decompose-both": (lambda: nn.Linear(64, 96), (4, 64), {"r": 1, "decompose_both": True}),
    "conv1d-full-w2": (lambda: nn.Conv1d(8, 16, 3, padding=1), (2, 8, 9), {"r": 16}),
    "conv1d-cp": (lambda: nn.Conv1d(16, 32, 3, stride=2), (2, 16, 9), {"r": 2, "use_effective_conv2d": True}),
    "conv2d-lowrank": (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6), {"r": 1}),
    "conv2d-cp": (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6), {"r": 2, "use_effective_conv2d": True}),
    "conv2d-1x1": (lambda: nn.Conv2d(16, 32, 1), (2, 16, 4, 4), {"r": 2}),
    "conv2d-grouped": (lambda: nn.Conv2d(16, 16, 3, groups=4), (2, 16, 5, 5), {"r": 2}),
}


def _base(case: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(CASES[case][0](), nn.Tanh()).double().eval()


def _input(case: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*CASES[case][1], dtype=torch.float64)


def _config(case: str) -> dict[str, Any]:
    return {"target_modules": ["0"], "init_weights": False, **CASES[case][2]}


def _assert_same_outputs(ours: nn.Module, peft_model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = peft_model(x)
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=TOL)
        lokr.set_adapter(ours, None)
        with lokr.adapter_batch(ours, ["default"] * x.shape[0]):  # the per-row paths read the same factors
            torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("case", CASES)
def test_inject_into_a_float64_model_keeps_float64_factors_like_peft(case: str) -> None:
    base = _base(case)
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(**_config(case))).eval()
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    lokr.inject(ours, lokr.LoKrConfig(**_config(case)))
    lokr.set_adapter(ours, "default")
    assert lokr.describe_adapter(ours, "default").dtype == "float64"
    ours_factors, peft_factors = _lokr_factors(ours), _peft_factors(peft_model)
    assert ours_factors.keys() == peft_factors.keys()
    for key, value in peft_factors.items():
        assert value.dtype == ours_factors[key].dtype == torch.float64, key
        assert torch.equal(ours_factors[key], value), key
    _assert_same_outputs(ours, peft_model, _input(case))


@pytest.mark.parametrize("case", CASES)
def test_float32_adapter_loaded_into_a_float64_model_like_peft(case: str, tmp_path: Path) -> None:
    base = _base(case)
    torch.manual_seed(5)
    get_peft_model(copy.deepcopy(base).float(), PeftLoKrConfig(**_config(case))).save_pretrained(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = copy.deepcopy(base)
    info = lokr.load_adapter(ours, tmp_path, "default")
    lokr.set_adapter(ours, "default")
    assert info.dtype == "float64"
    for key, value in _peft_factors(peft_model).items():
        assert value.dtype == torch.float64, key
        assert torch.equal(_lokr_factors(ours)[key], value), key
    _assert_same_outputs(ours, peft_model, _input(case))


def test_auto_dtype_follows_peft_on_float32_and_half_models(tmp_path: Path) -> None:
    """float32 factors on a float32 or half-precision base (PEFT's autocast), whatever the file holds: here
    float64 factors, which PEFT also loads into float32 parameters on such a base."""
    base = nn.Sequential(nn.Linear(16, 16))
    lokr.inject(base, lokr.LoKrConfig(target_modules=["0"]), "a")
    lokr.save_adapter(base.double(), "a", tmp_path)
    peft_model = PeftModel.from_pretrained(nn.Sequential(nn.Linear(16, 16)), tmp_path)
    assert {p.dtype for p in _peft_factors(peft_model).values()} == {torch.float32}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = nn.Sequential(nn.Linear(16, 16)).to(dtype)
        assert lokr.load_adapter(model, tmp_path, "a").dtype == "float32"
        assert lokr.load_adapter(model, tmp_path, "b", dtype=torch.float16).dtype == "float16"  # an explicit dtype
