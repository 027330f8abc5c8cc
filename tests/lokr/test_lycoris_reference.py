"""LyCORIS files written by the real `lycoris-lora` package (its network + `save_weights`), and target errors.

Covers issue 10 items 5 (an unsupported layer type is named, with the supported ones) and 6 (a Conv1d
Tucker core `lokr_t2 (r, r, k)` loads and matches LyCORIS's forward; two key stems for one module are refused).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lokr
from lokr.formats import write_peft_dir

from .nets import assert_unchanged, snapshot

lycoris = pytest.importorskip("lycoris")


class ConvNet(nn.Module):
    """A Conv1d (k=3, Tucker-capable), a Conv2d and a Linear: the layer kinds LoKr serves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(16, 32, 3, padding=1)
        self.conv2d = nn.Conv2d(32, 16, 3, padding=1)
        self.proj = nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 16, L) -> (B, L, 24)."""
        h = self.conv1d(x).unsqueeze(-1)  # (B, 32, L, 1)
        h = self.conv2d(h).squeeze(-1)  # (B, 16, L)
        return self.proj(h.transpose(1, 2))


def _lycoris_file(
    base: nn.Module, path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str = "lycoris", **kwargs: object
) -> nn.Module:
    """A copy of `base` with a LyCORIS LoKr network applied (random factors), saved to `path` by LyCORIS."""
    from lycoris import LycorisNetwork, create_lycoris

    # create_lycoris applies its preset to class attributes; the prefix is restored after the test
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", prefix)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    network = create_lycoris(model, 1.0, algo="lokr", **kwargs)
    network.apply_to()
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0.0, 0.3)
    network.save_weights(str(path), torch.float32, {})
    return model


@pytest.mark.parametrize(("dim", "alpha"), [(2, 1.0), (2, 2.0)])
def test_conv1d_tucker_core_loads_and_matches_lycoris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dim: int, alpha: float
) -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    path = tmp_path / "tucker.safetensors"
    reference = _lycoris_file(
        base, path, monkeypatch, linear_dim=dim, linear_alpha=alpha, use_tucker=True, factor=4
    ).eval()
    saved = load_file(str(path))
    assert saved["lycoris_conv1d.lokr_t2"].shape == (dim, dim, 3)  # the layout this test is about
    assert saved["lycoris_conv2d.lokr_t2"].shape == (dim, dim, 3, 3)

    ours = copy.deepcopy(base)
    info = lokr.load_adapter(ours, path, "tucker")
    assert set(info.modules) == {"conv1d", "conv2d", "proj"}
    lokr.set_adapter(ours, "tucker")
    x = torch.randn(2, 16, 7)
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert (want - base(x)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    lokr.merge_adapter(ours, "tucker")  # the merged weight is LyCORIS's too
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)


def test_a_zero_alpha_means_the_rank_as_in_lycoris(tmp_path: Path) -> None:
    """Other trainers write `.alpha = 0`; LyCORIS's loader (as kohya's) reads it as alpha = rank, scale 1."""
    from lycoris import create_lycoris_from_weights

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32)).eval()
    path = tmp_path / "zero-alpha.safetensors"
    factors = {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(8, 2), "lokr_w2_b": torch.randn(2, 4)}
    save_file({**{f"lycoris_0.{k}": v for k, v in factors.items()}, "lycoris_0.alpha": torch.tensor(0.0)}, str(path))
    reference = copy.deepcopy(base)
    network, _ = create_lycoris_from_weights(1.0, str(path), reference)
    network.apply_to()
    ours = copy.deepcopy(base)
    lokr.load_adapter(ours, path, "zero")
    lokr.set_adapter(ours, "zero")
    assert lokr.describe_adapter(ours, "zero").scales == {"0": 1.0}
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("first", "second"), [("lycoris", "lora_unet"), ("lora_te1", "lora_te2")])
def test_two_stems_for_one_module_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str, second: str
) -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    tensors: dict[str, torch.Tensor] = {}
    for prefix in (first, second):
        path = tmp_path / f"{prefix}.safetensors"
        _lycoris_file(base, path, monkeypatch, prefix=prefix, linear_dim=4, linear_alpha=2.0)
        tensors.update(load_file(str(path)))
    both = tmp_path / "both.safetensors"
    save_file(tensors, str(both))

    model = copy.deepcopy(base)
    lokr.load_adapter(model, tmp_path / f"{first}.safetensors", "keep")
    before = snapshot(model)
    with pytest.raises(lokr.AdapterFormatError) as info:
        lokr.load_adapter(model, both, "both")
    message = str(info.value)
    assert f"'{first}_conv1d'" in message and f"'{second}_conv1d'" in message and "'conv1d'" in message
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------- item 5
def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


def _c_attn_adapter(tmp_path: Path, kind: str) -> Path:
    """An adapter for GPT-2's `c_attn`, a transformers Conv1D of weight (16, 48)."""
    factors = {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(12, 4)}
    if kind == "lycoris":
        path = tmp_path / "c_attn.safetensors"
        save_file({f"lora_unet_transformer_h_0_attn_c_attn.{k}": v for k, v in factors.items()}, str(path))
        return path
    tensors = {f"transformer.h.0.attn.c_attn.{k}": v for k, v in factors.items()}
    return write_peft_dir(tmp_path / "peft", tensors, lokr.LoKrConfig(r=4, alpha=4, target_modules=["c_attn"]))


@pytest.mark.parametrize("kind", ["peft", "lycoris"])
def test_unsupported_layer_type_is_named(tmp_path: Path, kind: str) -> None:
    model = _tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(lokr.TargetError) as info:
        lokr.load_adapter(model, _c_attn_adapter(tmp_path, kind), "gpt2")
    message = str(info.value)
    assert "transformer.h.0.attn.c_attn" in message
    assert "transformers.pytorch_utils.Conv1D" in message
    assert "torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d" in message
    assert "not in the base model" not in message
    assert_unchanged(model, before)
