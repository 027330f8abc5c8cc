"""Errors raised on user input come from lokr's own tree (`lokr.LoKrError`), keep their builtin base for
compatibility, and say what to do."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lokr
from lokr.functional import LayerSpec


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, r=2), "a")
    return model


def _llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    lokr.inject(model, lokr.LoKrConfig(target_modules=["q_proj"], init_weights=False), "a")
    return model


def test_beam_search_row_mismatch_says_how_to_repeat_rows() -> None:
    model = _llama()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with pytest.raises(lokr.RowCountError) as caught, torch.no_grad(), lokr.adapter_batch(model, ["a", None]):
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    assert isinstance(caught.value, lokr.LoKrError)
    assert isinstance(caught.value, ValueError)  # what the bare error was: `except ValueError` still catches it
    message = str(caught.value)
    for part in ("2 row selection(s)", "has 4 rows", "num_beams", "num_return_sequences", "(here 2 per row)"):
        assert part in message


def test_rows_repeated_per_beam_as_the_message_says() -> None:
    model = _llama()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    rows = [sel for sel in ["a", None] for _ in range(2)]  # the message's recipe, k = num_beams = 2
    with torch.no_grad():
        with lokr.adapter_batch(model, rows):
            mixed = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
        lokr.set_adapter(model, "a")
        first = model.generate(ids[:1], max_new_tokens=3, num_beams=2, do_sample=False)
        lokr.set_adapter(model, None)
        second = model.generate(ids[1:], max_new_tokens=3, num_beams=2, do_sample=False)
    assert torch.equal(mixed, torch.cat([first, second]))


def test_tokens_layout_mismatch_is_a_row_count_error() -> None:
    model = _linear_model()
    rows = ["a", None, "a"]
    with (
        torch.no_grad(),
        lokr.adapter_batch(model, rows, tokens=True),
        pytest.raises(lokr.RowCountError, match="3 pos"),
    ):
        model(torch.randn(1, 4, 8))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["a", 5], "row selection must be"),
        ([[("a", "x")]], "must be a number"),
        ([[("a", None)]], "must be a number"),
        ([{"a": "z"}], "must be a number"),
        ([3.5], "row selection must be"),
    ],
)
def test_bad_row_selections_are_config_errors(rows: list[Any], match: str) -> None:
    model = _linear_model()
    with pytest.raises(lokr.ConfigError, match=match), lokr.adapter_batch(model, rows):
        pass


@pytest.mark.parametrize("name", ["", 5, None])
def test_bad_adapter_names_are_config_errors(name: Any) -> None:
    model = _linear_model()
    with pytest.raises(lokr.ConfigError, match="non-empty string"):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"]), name)
    with pytest.raises(ValueError):  # still a ValueError, as before
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"]), name)


def test_set_adapter_with_a_non_name_is_a_config_error() -> None:
    with pytest.raises(lokr.ConfigError, match="adapter name"):
        lokr.set_adapter(_linear_model(), 5)  # type: ignore[arg-type]


def test_merge_into_non_finite_weights_is_a_non_finite_error() -> None:
    model = _linear_model()
    with torch.no_grad():
        model[0].lokr_adapters["a"].lokr_w1.fill_(float("inf"))  # type: ignore[index]
    with pytest.raises(lokr.NonFiniteError, match="NaN"):
        lokr.merge_adapter(model, "a", safe_merge=True)
    assert isinstance(lokr.NonFiniteError("x"), ValueError)


def test_layer_spec_of_an_unsupported_module() -> None:
    with pytest.raises(lokr.UnsupportedLayerError, match="Embedding"):
        LayerSpec.from_module(nn.Embedding(4, 4))


def test_an_adapter_for_another_model_names_every_module_that_does_not_fit(tmp_path: Any) -> None:
    """Saved from a wider MLP and loaded onto a narrower one: one error naming the file, how many modules do not fit
    and each of them (not only the first), and nothing attached."""
    from .nets import assert_unchanged, snapshot, two_adapter_mlp

    lokr.save_adapter(two_adapter_mlp((32, 48, 16)), "a", tmp_path / "wide")
    narrow = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 16))
    before = snapshot(narrow)
    with pytest.raises(lokr.ShapeMismatchError) as caught:
        lokr.load_adapter(narrow, tmp_path / "wide", "wide")
    message = str(caught.value)
    assert str(tmp_path / "wide") in message and "2 of 2 modules do not fit" in message
    assert "0: factors give" in message and "2: factors give" in message and "another base model" in message
    assert_unchanged(narrow, before)


def test_a_broken_module_is_refused_naming_the_file(tmp_path: Any) -> None:
    from .nets import two_adapter_mlp

    model = two_adapter_mlp()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("adapters.a.lokr_w1")).fill_(float("nan"))
    lokr.save_adapter(model, "a", tmp_path / "nan")
    with pytest.raises(lokr.NonFiniteError, match=f"^{tmp_path / 'nan'}: .*NaN"):
        lokr.load_adapter(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)), tmp_path / "nan", "x")
