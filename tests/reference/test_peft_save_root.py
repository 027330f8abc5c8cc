"""A PEFT save root whose adapters have other names than "default": PEFT writes each to `<dir>/<name>/`, and
`load_adapter` on the root says which subfolders to pass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoKrConfig as PeftLoKrConfig
from peft import get_peft_model
from torch import nn

import lokr

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _saved_root(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    config = PeftLoKrConfig(target_modules=["0", "2"], init_weights=False, r=2)
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name="style")
    peft_model.add_adapter("ink", config)
    peft_model.save_pretrained(tmp_path)
    return base, peft_model


def test_root_of_named_adapters_lists_the_subfolders(tmp_path: Path) -> None:
    base, _ = _saved_root(tmp_path)
    assert (tmp_path / "ink" / "adapter_model.safetensors").is_file()  # what PEFT wrote: no adapter in the root
    assert not (tmp_path / "adapter_model.safetensors").exists()
    model = copy.deepcopy(base)
    with pytest.raises(lokr.AdapterFormatError) as caught:
        lokr.load_adapter(model, tmp_path, "a")
    message = str(caught.value)
    assert "2 of its subfolders hold an adapter: ink, style" in message
    assert f"pass one of them, e.g. {tmp_path / 'ink'}" in message
    assert lokr.list_adapters(model) == []


def test_a_named_subfolder_loads_like_peft(tmp_path: Path) -> None:
    base, peft_model = _saved_root(tmp_path)
    model = copy.deepcopy(base)
    lokr.load_adapter(model, tmp_path / "style", "style")
    lokr.set_adapter(model, "style")
    peft_model.set_adapter("style")
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), atol=1e-5, rtol=1e-5)


def test_a_folder_without_any_adapter_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(lokr.AdapterFormatError, match="has no adapter_model.safetensors$"):
        lokr.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path)
