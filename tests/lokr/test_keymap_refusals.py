"""Every key form a pipeline container accepts, and every file it refuses (nothing loaded, nothing lost)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lokr

from .lyco import kohya_file, register_presets, single_thread
from .nets import assert_unchanged, snapshot
from .pipes import clip, sd_unet, sdxl_unet

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear(32, 32)
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d(32, 32, 3)
TE_Q = "encoder.layers.0.self_attn.q_proj"  # Linear(32, 32) in transformers 5's CLIPTextModel


@pytest.fixture(autouse=True)
def presets(monkeypatch: pytest.MonkeyPatch) -> None:
    register_presets(monkeypatch)


def _factors(stem: str, conv: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(stem))
    w2 = torch.randn(8, 8, 3, 3, generator=g) if conv else torch.randn(8, 8, generator=g)
    return {f"{stem}.lokr_w1": torch.randn(4, 4, generator=g), f"{stem}.lokr_w2": w2}


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


@pytest.fixture
def container(tmp_path: Path) -> nn.ModuleDict:
    """An SD-style pipeline container already serving one adapter, which a failed load must leave intact."""
    pipe = nn.ModuleDict({"unet": sd_unet(), "text_encoder": clip(1)})
    lokr.load_adapter(pipe, _write(tmp_path / "keep.safetensors", _factors(f"lora_unet_{Q.replace('.', '_')}")), "keep")
    return pipe


# ------------------------------------------------------------------------------ accepted key forms
SD_FORMS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", f"unet.{Q}"),
    ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", f"unet.{Q}"),
    ("lycoris_input_blocks_1_0_in_layers_2", f"unet.{CONV}"),
    ("lora_transformer_down_blocks_0_resnets_0_conv1", f"unet.{CONV}"),
    ("unet.down_blocks.0.resnets.0.conv1", f"unet.{CONV}"),
    ("down_blocks.0.resnets.0.conv1", f"unet.{CONV}"),
    ("diffusion_model.input_blocks.1.0.in_layers.2", f"unet.{CONV}"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", f"unet.{Q}"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", f"text_encoder.{TE_Q}"),
    ("lora_te_encoder_layers_0_self_attn_q_proj", f"text_encoder.{TE_Q}"),
    ("lora_te1_encoder_layers_0_self_attn_q_proj", f"text_encoder.{TE_Q}"),
    ("text_encoder.encoder.layers.0.self_attn.q_proj", f"text_encoder.{TE_Q}"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", f"text_encoder.{TE_Q}"),
]


@pytest.mark.parametrize(("stem", "module"), SD_FORMS, ids=[s for s, _ in SD_FORMS])
def test_sd_key_forms(stem: str, module: str, container: nn.ModuleDict, tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", _factors(stem, conv=module.endswith("conv1")))
    info = lokr.load_adapter(container, path, "a")
    assert info.modules == [module]
    layer = container.get_submodule(module)
    t = _factors(stem, conv=module.endswith("conv1"))
    w1, w2 = t[f"{stem}.lokr_w1"], t[f"{stem}.lokr_w2"]
    expected = torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)
    torch.testing.assert_close(layer.get_delta_weight("a"), expected)


def _dit_container(with_te3: bool) -> nn.ModuleDict:
    """Flux-like (T5 as text_encoder_2) or SD3-like (text_encoder_3) names; layers only, no forward needed."""
    block = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(32, 32)})})
    t5 = nn.ModuleDict({"encoder": nn.ModuleDict({"block": nn.ModuleList([nn.ModuleDict({"q": nn.Linear(32, 32)})])})})
    parts: dict[str, nn.Module] = {
        "transformer": nn.ModuleDict({"transformer_blocks": nn.ModuleList([block])}),
        "text_encoder": clip(1),
        "text_encoder_2": clip(2, projection=True) if with_te3 else t5,
    }
    if with_te3:
        parts["text_encoder_3"] = t5
    return nn.ModuleDict(parts)


@pytest.mark.parametrize("sd3", [False, True], ids=["flux-like", "sd3-like"])
def test_dit_key_forms(sd3: bool, tmp_path: Path) -> None:
    pipe = _dit_container(with_te3=sd3)
    t5 = "text_encoder_3" if sd3 else "text_encoder_2"
    forms = [
        ("lora_unet_transformer_blocks_0_attn_to_q", "transformer.transformer_blocks.0.attn.to_q"),
        ("lycoris_transformer_blocks_0_attn_to_q", "transformer.transformer_blocks.0.attn.to_q"),
        ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", f"text_encoder.{TE_Q}"),
        ("lora_te3_encoder_block_0_q", f"{t5}.encoder.block.0.q"),
    ]
    if sd3:
        forms.append(("lora_te2_encoder_layers_1_mlp_fc2", "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"))
    for i, (stem, module) in enumerate(forms):
        tensors = _factors(stem)
        if module.endswith("fc2"):  # Linear(37, 32): 37 is prime
            tensors = {f"{stem}.lokr_w1": torch.randn(4, 1), f"{stem}.lokr_w2": torch.randn(8, 37)}
        info = lokr.load_adapter(pipe, _write(tmp_path / f"{i}.safetensors", tensors), f"a{i}")
        assert info.modules == [module], stem


# ------------------------------------------------------------------------------ refusals
def _mixed_unknown(tmp_path: Path, stem: str) -> Path:
    """One valid key beside a bad one: the valid one must not load either."""
    return _write(
        tmp_path / "bad.safetensors", {**_factors(f"lora_unet_{CONV.replace('.', '_')}", True), **_factors(stem)}
    )


def _lycoris_algo(algo: str, **options: object) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        kohya_file(tmp_path / "bad.safetensors", clip(3), sd_unet(3), 2, 1.0, algo=algo, **options)
        return tmp_path / "bad.safetensors"

    return build


def _shape_mismatch(tmp_path: Path) -> Path:
    kohya_file(tmp_path / "bad.safetensors", None, sd_unet(3, widths=(16, 32, 32)), 2, 1.0)
    return tmp_path / "bad.safetensors"


def _duplicate(first: str, second: str, conv: bool) -> Callable[[Path], Path]:
    return lambda tmp_path: _write(tmp_path / "bad.safetensors", {**_factors(first, conv), **_factors(second, conv)})


def _peft_unknown(tmp_path: Path) -> Path:
    peft = pytest.importorskip("peft")
    config = peft.LoKrConfig(r=2, target_modules=["linear_1"], init_weights=False)
    peft.get_peft_model(sdxl_unet(3), config).save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


REFUSALS: dict[str, tuple[Callable[[Path], Path], type[Exception], str]] = {
    "component the pipeline lacks": (
        lambda p: _mixed_unknown(p, "lora_te2_encoder_layers_0_self_attn_q_proj"),
        lokr.UnknownModuleError,
        r"components: unet, text_encoder.*lora_te2_encoder_layers_0_self_attn_q_proj' \(this pipeline has no "
        "text_encoder_2",
    ),
    "module the unet lacks": (
        lambda p: _mixed_unknown(p, "lora_unet_down_blocks_7_resnets_0_conv1"),
        lokr.UnknownModuleError,
        r"lora_unet_down_blocks_7_resnets_0_conv1' \(no such layer in unet",
    ),
    "flux original layout on SD": (
        lambda p: _mixed_unknown(p, "lora_unet_double_blocks_0_img_attn_qkv"),
        lokr.UnknownModuleError,
        "double_blocks_0_img_attn_qkv",
    ),
    "unprefixed underscore stem": (
        lambda p: _mixed_unknown(p, "down_blocks_0_resnets_0_conv2"),
        lokr.UnknownModuleError,
        "down_blocks_0_resnets_0_conv2' \\(no known prefix",
    ),
    "LoRA file": (_lycoris_algo("lora"), lokr.UnsupportedAdapterError, "LoRA"),
    "LoHa file": (_lycoris_algo("loha"), lokr.UnsupportedAdapterError, "LoHa"),
    "DoRA LoKr file": (_lycoris_algo("lokr", dora_wd=True), lokr.UnsupportedAdapterError, "DoRA"),
    "shape mismatch": (_shape_mismatch, lokr.ShapeMismatchError, "trained on another base model"),
    "both text-encoder namings": (
        _duplicate("lora_te_text_model_" + TE_Q.replace(".", "_"), "lora_te_" + TE_Q.replace(".", "_"), False),
        lokr.UnexpectedKeysError,
        "'lora_te_encoder_layers_0_self_attn_q_proj' and 'lora_te_text_model_encoder_layers_0_self_attn_q_proj' both",
    ),
    "original and diffusers unet names": (
        _duplicate("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_" + CONV.replace(".", "_"), True),
        lokr.UnexpectedKeysError,
        f"both name module 'unet.{CONV}'",
    ),
    "PEFT dir for another unet": (_peft_unknown, lokr.UnknownModuleError, "add_embedding.linear_1"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_and_nothing_changes(case: str, container: nn.ModuleDict, tmp_path: Path) -> None:
    build, error, message = REFUSALS[case]
    source = build(tmp_path)
    before = snapshot(container)
    with pytest.raises(error, match=message):
        lokr.load_adapter(container, source, "bad")
    assert_unchanged(container, before)
    assert lokr.list_adapters(container) == ["keep"]
