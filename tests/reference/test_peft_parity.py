"""`lokr` against the real `peft` package (0.21.2) on identical weights.

Every check builds a tiny model, lets PEFT create (or load) the adapter, and compares lokr's
parameters, delta weights and outputs with PEFT's. PEFT is the numerical reference.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lokr.layer import LoKrLayer as PeftLoKrLayer
from torch import nn

import lokr
from lokr.inject import iter_lokr_layers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = RTOL = 1e-5
GROUPED_TOL = 1e-3


# --------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """PEFT's `MLP` from tests/test_custom_models.py (without the dropout layer, which would draw RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.relu(self.lin0(x.float()))))


class ConvNet(nn.Module):
    """A conv layer named like PEFT's test models, then flatten + `lin0`."""

    def __init__(self, conv: nn.Module, name: str, flat: int) -> None:
        super().__init__()
        setattr(self, name, conv)
        self._conv_name = name
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(flat, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(self.flat(self.relu(getattr(self, self._conv_name)(x))))


@dataclass
class Case:
    model: Callable[[], nn.Module]
    input: Callable[[], torch.Tensor]
    config: dict[str, Any]
    tol: float = ATOL
    supported: bool = True  # lokr refuses modules_to_save on purpose (not switchable per request)
    extra: dict[str, Any] = field(default_factory=dict)


def _mlp_input() -> torch.Tensor:
    return torch.randn(9, 10)


def _conv1d(in_c: int, out_c: int, k: int, length: int, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        conv = nn.Conv1d(in_c, out_c, k, **kw)
        out_len = conv(torch.zeros(1, in_c, length)).shape[-1]
        return ConvNet(conv, "conv1d", out_c * out_len)

    return build


def _conv2d(in_c: int, out_c: int, k: int, size: int, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        conv = nn.Conv2d(in_c, out_c, k, **kw)
        out = conv(torch.zeros(1, in_c, size, size)).shape
        return ConvNet(conv, "conv2d", out_c * out[-1] * out[-2])

    return build


def _inp(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape)


# PEFT's LoKr TEST_CASES (tests/test_custom_models.py), plus a few variants that reach the CP / low-rank branches.
CASES: dict[str, Case] = {
    "Vanilla MLP 1 LOKR": Case(MLP, _mlp_input, {"target_modules": "lin0"}),
    "Vanilla MLP 2 LOKR": Case(MLP, _mlp_input, {"target_modules": ["lin0"]}),
    "Vanilla MLP 3 LOKR": Case(MLP, _mlp_input, {"target_modules": ["lin1"]}),
    "Vanilla MLP 4 LOKR": Case(MLP, _mlp_input, {"target_modules": ["lin0", "lin1"]}),
    "Vanilla MLP 5 LOKR": Case(
        MLP, _mlp_input, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, supported=False
    ),
    "Vanilla MLP 6 LOKR": Case(MLP, _mlp_input, {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    "Vanilla MLP 7 LOKR": Case(MLP, _mlp_input, {"target_modules": ["lin0"], "rank_dropout": 0.5}),
    "Vanilla MLP 8 LOKR": Case(
        MLP, _mlp_input, {"target_modules": ["lin0"], "decompose_both": True, "r": 1, "alpha": 1}
    ),
    "Conv1d LOKR 1": Case(_conv1d(1, 1, 2, 10), _inp(3, 1, 10), {"target_modules": ["conv1d"]}),
    "Conv1d LOKR 2": Case(_conv1d(1, 1, 2, 10), _inp(3, 1, 10), {"target_modules": ["conv1d"], "r": 2}),
    "Conv1d LOKR 3": Case(
        _conv1d(64, 16, 2, 6),
        _inp(2, 64, 6),
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    "Conv1d LOKR 4": Case(
        _conv1d(64, 16, 2, 6),
        _inp(2, 64, 6),
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False},
    ),
    "Conv1d Groups LOKR": Case(
        _conv1d(8, 8, 3, 9, groups=2), _inp(3, 8, 9), {"target_modules": ["conv1d"], "r": 4}, tol=GROUPED_TOL
    ),
    "Conv2d 1 LOKR": Case(_conv2d(5, 10, 3, 5), _inp(3, 5, 5, 5), {"target_modules": ["conv2d"]}),
    "Conv2d 2 LOKR": Case(_conv2d(5, 10, 3, 5), _inp(3, 5, 5, 5), {"target_modules": ["conv2d", "lin0"]}),
    "Conv2d 3 LOKR": Case(
        _conv2d(5, 10, 3, 5), _inp(3, 5, 5, 5), {"target_modules": ["conv2d"], "use_effective_conv2d": True}
    ),
    "Conv2d 4 LOKR": Case(
        _conv2d(5, 10, 3, 5),
        _inp(3, 5, 5, 5),
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True},
    ),
    "Conv2d 5 LOKR": Case(
        _conv2d(5, 10, 3, 5),
        _inp(3, 5, 5, 5),
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True},
    ),
    "Conv2d 6 LOKR": Case(
        _conv2d(5, 10, 3, 5),
        _inp(3, 5, 5, 5),
        {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4},
    ),
    "Conv2d 7 LOKR": Case(
        _conv2d(5, 10, 3, 5),
        _inp(3, 5, 5, 5),
        {
            "target_modules": ["conv2d", "lin0"],
            "use_effective_conv2d": True,
            "decompose_both": True,
            "decompose_factor": 4,
        },
    ),
    "Conv2d 1x1 LOKR": Case(_conv2d(1, 10, 1, 4), _inp(3, 1, 4, 4), {"target_modules": ["conv2d"]}),
    "Conv2d Groups LOKR": Case(
        _conv2d(16, 16, 3, 5, groups=8), _inp(2, 16, 5, 5), {"target_modules": ["conv2d"]}, tol=GROUPED_TOL
    ),
    "Conv2d Groups2 LOKR": Case(
        _conv2d(16, 32, 3, 5, padding=1, groups=2),
        _inp(2, 16, 5, 5),
        {"target_modules": ["conv2d"]},
        tol=GROUPED_TOL,
    ),
    # Extra: low rank so that CP (t2), LoRA-style conv w2 and decomposed w1 really occur.
    "Conv2d CP r1 strided": Case(
        _conv2d(16, 32, 3, 7, stride=2, padding=2, dilation=2),
        _inp(2, 16, 7, 7),
        {"target_modules": ["conv2d"], "r": 1, "use_effective_conv2d": True, "decompose_both": True},
    ),
    "Conv2d lowrank r1": Case(
        _conv2d(16, 32, 3, 6, padding=1),
        _inp(2, 16, 6, 6),
        {"target_modules": ["conv2d"], "r": 1, "alpha": 3},
    ),
    "Conv1d full w2 quirk": Case(_conv1d(8, 16, 3, 7, padding=1), _inp(2, 8, 7), {"target_modules": ["conv1d"]}),
    "Conv1d CP r2": Case(
        _conv1d(16, 32, 3, 9, stride=2),
        _inp(2, 16, 9),
        {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True},
    ),
    "Conv2d 1x1 effective ignored": Case(
        _conv2d(16, 32, 1, 4),
        _inp(2, 16, 4, 4),
        {"target_modules": ["conv2d"], "r": 1, "use_effective_conv2d": True},
    ),
    "Linear factor 4 lowrank": Case(
        MLP, _mlp_input, {"target_modules": ["lin0", "lin1"], "r": 1, "decompose_factor": 4, "alpha": 2}
    ),
}
SUPPORTED = [name for name, case in CASES.items() if case.supported]


# --------------------------------------------------------------------------------------------- helpers
def _base(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.model().eval()


def _peft_model(base: nn.Module, config: dict[str, Any], init_weights: Any = False) -> PeftModel:
    return get_peft_model(copy.deepcopy(base), PeftLoKrConfig(init_weights=init_weights, **config)).eval()


def _load_into_lokr(base: nn.Module, adapter_dir: Path, name: str = "default") -> nn.Module:
    model = copy.deepcopy(base)
    lokr.load_adapter(model, adapter_dir, name)
    lokr.set_adapter(model, name)
    return model.eval()


def _peft_layers(pm: nn.Module) -> dict[str, PeftLoKrLayer]:
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in pm.named_modules() if isinstance(m, PeftLoKrLayer)}


def _peft_factors(pm: nn.Module, adapter: str = "default") -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for name, layer in _peft_layers(pm).items():
        for factor in PeftLoKrLayer.adapter_layer_names:
            pdict = getattr(layer, factor)
            if adapter in pdict:
                out[(name, factor)] = pdict[adapter].detach()
    return out


def _lokr_factors(model: nn.Module, adapter: str = "default") -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for name, layer in iter_lokr_layers(model):
        if adapter in layer.lokr_adapters:
            for factor, p in layer.lokr_adapters[adapter].named_parameters():
                out[(name, factor)] = p.detach()
    return out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _save_peft(pm: PeftModel, tmp_path: Path) -> Path:
    out = tmp_path / "peft"
    pm.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------- PEFT's cases
@pytest.mark.parametrize("case_name", SUPPORTED)
def test_peft_case_forward_delta_and_merge(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    base = _base(case)
    pm = _peft_model(base, case.config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    x = case.input()

    assert _lokr_factors(ours).keys() == _peft_factors(pm).keys()
    peft_layers = _peft_layers(pm)
    for name, layer in iter_lokr_layers(ours):
        _close(layer.get_delta_weight("default"), peft_layers[name].get_delta_weight("default").detach())
    with torch.no_grad():
        expected = pm(x)
        _close(ours(x), expected, case.tol)
        assert not torch.allclose(base(x), expected)  # the adapter really changes the output

        lokr.merge_adapter(ours, "default")
        _close(ours(x), expected, case.tol)
        lokr.unmerge_adapter(ours)
        for name, layer in iter_lokr_layers(ours):
            _close(layer.base_layer.weight, base.get_submodule(name).weight, 1e-6)
        _close(ours(x), expected, case.tol)


def test_modules_to_save_is_refused_without_changes(tmp_path: Path) -> None:
    case = CASES["Vanilla MLP 5 LOKR"]
    base = _base(case)
    adapter_dir = _save_peft(_peft_model(base, case.config), tmp_path)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lokr.UnsupportedAdapterError, match="modules_to_save"):
        lokr.load_adapter(model, adapter_dir)
    assert lokr.list_adapters(model) == []
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize("case_name", SUPPORTED)
def test_inject_initialises_exactly_like_peft(case_name: str, init_weights: Any) -> None:
    case = CASES[case_name]
    base = _base(case)
    torch.manual_seed(1234)
    pm = _peft_model(base, case.config, init_weights=init_weights)
    peft_next = torch.rand(3)
    ours = copy.deepcopy(base)
    torch.manual_seed(1234)
    lokr.inject(ours, lokr.LoKrConfig(init_weights=init_weights, **case.config))
    assert torch.equal(torch.rand(3), peft_next)  # the RNG stream is left in the same place too
    ours_factors, peft_factors = _lokr_factors(ours), _peft_factors(pm)
    assert ours_factors.keys() == peft_factors.keys()
    for key, value in peft_factors.items():
        assert torch.equal(ours_factors[key], value), key

    lokr.set_adapter(ours, "default")
    x = case.input()
    with torch.no_grad():
        _close(ours(x), pm(x), case.tol)
        if init_weights is not False:
            _close(ours(x), base(x), 1e-6)


@pytest.mark.parametrize("case_name", SUPPORTED)
def test_lokr_save_loads_in_peft(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    base = _base(case)
    torch.manual_seed(7)
    ours = copy.deepcopy(base)
    lokr.inject(ours, lokr.LoKrConfig(init_weights=False, **case.config))
    lokr.set_adapter(ours, "default")
    ours.eval()
    lokr.save_adapter(ours, "default", tmp_path / "ours")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    x = case.input()
    with torch.no_grad():
        _close(pm(x), ours(x), case.tol)
    for key, value in _lokr_factors(ours).items():
        assert torch.equal(_peft_factors(pm)[key], value)
    # and back again into lokr
    pm.save_pretrained(tmp_path / "again")
    again = _load_into_lokr(base, tmp_path / "again")
    with torch.no_grad():
        _close(again(x), ours(x), case.tol)


class _Nested(nn.Module):
    """`proj` at the top and inside `a` and `b`: PEFT's pattern keys match names as dotted suffixes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.a = nn.Sequential()
        self.a.add_module("proj", nn.Linear(16, 16))
        self.b = nn.Sequential()
        self.b.add_module("proj", nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b.proj(self.a.proj(self.proj(x)))


@pytest.mark.parametrize("pattern", ["alpha_pattern", "rank_pattern"])
def test_saved_patterns_name_one_module_in_peft(pattern: str, tmp_path: Path) -> None:
    """A top-level module with its own rank or alpha: the saved pattern must not reach `a.proj` and `b.proj`."""
    torch.manual_seed(0)
    base = _Nested().eval()
    ours = copy.deepcopy(base)
    config = {
        "target_modules": ["proj"],
        "r": 2,
        "alpha": 1,
        pattern: {"^proj": 3 if pattern == "alpha_pattern" else 4},
    }
    lokr.inject(ours, lokr.LoKrConfig(init_weights=False, **config))  # type: ignore[arg-type]
    lokr.set_adapter(ours, "default")
    lokr.save_adapter(ours, "default", tmp_path / "ours")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    again = _load_into_lokr(base, tmp_path / "ours")
    x = torch.randn(3, 16)
    with torch.no_grad():
        _close(pm(x), ours(x))
        _close(again(x), ours(x))


# --------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize(
    ("targets_a", "targets_b"), [(["lin0"], ["lin0"]), (["lin0"], ["lin1"])], ids=["same", "different"]
)
def test_two_active_adapters_sum_like_peft(targets_a: list[str], targets_b: list[str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = MLP().eval()
    pm = _peft_model(base, {"target_modules": targets_a, "r": 2})
    pm.add_adapter("other", PeftLoKrConfig(target_modules=targets_b, init_weights=False, alpha=3))
    pm.eval()
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lokr.load_adapter(ours, tmp_path, "default")
    lokr.load_adapter(ours, tmp_path / "other", "other")
    x = _mlp_input()
    with torch.no_grad():
        for names in ("default", "other", ["default", "other"]):
            pm.base_model.set_adapter(names)
            lokr.set_adapter(ours, names)
            _close(ours(x), pm(x))
        both = ours(x)
        lokr.set_adapter(ours, "default")
        assert not torch.allclose(ours(x), both)
        lokr.set_adapter(ours, None)
        _close(ours(x), base(x), 1e-6)
        # merge with both active, then unmerge restores the base
        lokr.set_adapter(ours, ["default", "other"])
        lokr.merge_adapter(ours)
        _close(ours(x), both)
        lokr.unmerge_adapter(ours)
        for name, layer in iter_lokr_layers(ours):
            _close(layer.base_layer.weight, base.get_submodule(name).weight, 1e-6)


# --------------------------------------------------------------------------------------------- tiny llama
def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return _tiny_llama()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


TARGET_CONFIGS: dict[str, dict[str, Any]] = {
    "regex": {"target_modules": r".*\.(q|v)_proj"},
    "list": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    "all-linear": {"target_modules": "all-linear"},
    "default": {},
    "exclude list": {"target_modules": "all-linear", "exclude_modules": ["q_proj", "gate_proj"]},
    "exclude regex": {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*layers\.1\..*"},
    "layers_to_transform": {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1]},
    "layers_to_transform+pattern": {
        "target_modules": ["q_proj", "up_proj"],
        "layers_to_transform": 0,
        "layers_pattern": "layers",
    },
    "rank/alpha patterns": {
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"],
        "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "v_proj": 1, "up_proj": 3},
        "alpha_pattern": {"q_proj": 3, r"model\.layers\.1\.self_attn\.o_proj": 5, "up_proj": 7},
        "decompose_both": True,
    },
    "decompose_factor 4": {"target_modules": ["q_proj", "gate_proj"], "decompose_factor": 4, "r": 2},
}


@pytest.mark.parametrize("config_name", list(TARGET_CONFIGS))
def test_llama_targets_and_outputs_match_peft(config_name: str, llama: nn.Module, tmp_path: Path) -> None:
    config = TARGET_CONFIGS[config_name]
    torch.manual_seed(5)
    pm = _peft_model(llama, config)
    torch.manual_seed(5)
    injected = copy.deepcopy(llama)
    lokr.inject(injected, lokr.LoKrConfig(init_weights=False, **config))
    peft_names = set(_peft_layers(pm))
    assert {n for n, _ in iter_lokr_layers(injected)} == peft_names
    peft_factors, ours_factors = _peft_factors(pm), _lokr_factors(injected)
    assert ours_factors.keys() == peft_factors.keys()
    assert all(torch.equal(ours_factors[k], v) for k, v in peft_factors.items())
    lokr.set_adapter(injected, "default")
    expected = _logits(pm)
    _close(_logits(injected), expected)

    loaded = _load_into_lokr(llama, _save_peft(pm, tmp_path))
    _close(_logits(loaded), expected)
    for name, layer in iter_lokr_layers(loaded):
        assert math.isclose(
            layer.lokr_adapters["default"].scale, pm.base_model.model.get_submodule(name).scaling["default"]
        )

    lokr.save_adapter(injected, "default", tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours").eval()
    _close(_logits(back), expected)


# --------------------------------------------------------------------------------------------- details
def test_conv1d_full_w2_uses_peft_layout(tmp_path: Path) -> None:
    case = CASES["Conv1d full w2 quirk"]
    base = _base(case)
    pm = _peft_model(base, case.config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    layer = dict(iter_lokr_layers(ours))["conv1d"]
    adapter = layer.lokr_adapters["default"]
    assert hasattr(adapter, "lokr_w2")
    assert adapter.lokr_w2.dim() == 3
    w1, w2, s = adapter.lokr_w1.detach(), adapter.lokr_w2.detach(), adapter.scale
    delta = layer.get_delta_weight("default")
    _close(delta, s * torch.kron(w2, w1[:, :, None]))
    assert not torch.allclose(delta, s * torch.kron(w1[:, :, None], w2))
    _close(delta, _peft_layers(pm)["conv1d"].get_delta_weight("default").detach())


def test_training_mode_dropout_matches_peft_rng(tmp_path: Path) -> None:
    """module_dropout and rank_dropout draw from the CPU RNG in PEFT's order: outputs are identical."""
    torch.manual_seed(0)
    base = MLP()
    config = {"target_modules": ["lin0", "lin1"], "module_dropout": 0.5, "rank_dropout": 0.5, "r": 2}
    pm = _peft_model(base, config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    pm.train()
    ours.train()
    x = _mlp_input()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = pm(x)
        peft_next = torch.rand(2)
        torch.manual_seed(seed)
        _close(ours(x), expected)
        assert torch.equal(torch.rand(2), peft_next)  # same number of draws
        seen.add(round(float(expected.sum()), 4))
    assert len(seen) > 3  # the dropout really varies between seeds


def test_rank_dropout_scale_matches_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = MLP()
    config = {"target_modules": ["lin0"], "rank_dropout": 0.3, "rank_dropout_scale": True}
    pm = _peft_model(base, config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    pm.train()
    ours.train()
    x = _mlp_input()
    for seed in range(5):
        torch.manual_seed(seed)
        expected = pm(x)
        torch.manual_seed(seed)
        _close(ours(x), expected)


def test_bf16_base_with_fp32_adapter(tmp_path: Path) -> None:
    case = CASES["Vanilla MLP 4 LOKR"]
    base = _base(case).to(torch.bfloat16)
    pm = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(init_weights=False, **case.config)).eval()
    assert {p.dtype for p in _peft_factors(pm).values()} == {torch.float32}
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    assert {p.dtype for p in _lokr_factors(ours).values()} == {torch.float32}
    x = torch.randn(9, 10).to(torch.bfloat16)
    with torch.no_grad():
        lin = ours.lin0(x)
        expected = pm.base_model.model.lin0(x)
    assert lin.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(lin, expected, atol=2e-2, rtol=2e-2)


def test_disable_adapters_equals_base(tmp_path: Path) -> None:
    case = CASES["Conv2d 2 LOKR"]
    base = _base(case)
    pm = _peft_model(base, case.config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    x = case.input()
    with torch.no_grad():
        with lokr.disable_adapters(ours):
            disabled = ours(x)
        with pm.disable_adapter():
            _close(disabled, pm(x))
        _close(disabled, base(x), 0.0)
        _close(ours(x), pm(x))
        # merged adapters are unmerged by a disabled forward, as in PEFT
        lokr.merge_adapter(ours, "default")
        with lokr.disable_adapters(ours):
            _close(ours(x), base(x), 1e-6)
        assert not any(layer.merged for _, layer in iter_lokr_layers(ours))


def test_safe_merge_with_nan_raises_and_keeps_weights(tmp_path: Path) -> None:
    case = CASES["Vanilla MLP 4 LOKR"]
    base = _base(case)
    ours = _load_into_lokr(base, _save_peft(_peft_model(base, case.config), tmp_path))
    layer = dict(iter_lokr_layers(ours))["lin1"]
    with torch.no_grad():
        layer.lokr_adapters["default"].lokr_w1[0, 0] = float("nan")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        lokr.merge_adapter(ours, "default", safe_merge=True)
    after = ours.state_dict()
    for key, value in before.items():
        if "base_layer" in key:
            assert torch.equal(after[key], value), key
    assert not layer.merged


def test_merge_matches_peft_merge_and_unload(tmp_path: Path) -> None:
    case = CASES["Conv2d 7 LOKR"]
    base = _base(case)
    pm = _peft_model(base, case.config)
    ours = _load_into_lokr(base, _save_peft(pm, tmp_path))
    lokr.merge_adapter(ours, "default", safe_merge=True)
    merged = pm.merge_and_unload()
    for name, layer in iter_lokr_layers(ours):
        _close(layer.base_layer.weight, merged.get_submodule(name).weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lokr.unmerge_adapter(ours)
