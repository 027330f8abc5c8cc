"""LyCORIS / kohya / SimpleTuner / PEFT LoKr files onto a diffusers pipeline's components (one ModuleDict).

References: files written by the real `lycoris-lora` package (its kohya network + save_weights, and
`create_lycoris` for SimpleTuner's `lycoris_` prefix), whose own forward at the same multiplier is
compared with ours (unmerged, per-row, through lokr); PEFT LoKr dirs saved by `peft` from the UNet.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from lycoris import create_lycoris
from lycoris import wrapper as lycoris_wrapper
from torch import nn

import lokr
from lokr.sdxl_names import original_unet_names

from .lyco import EVERY_LAYER, MULT, kohya_file, randomise, register_presets, single_thread
from .pipes import (
    WithTextModel,
    clip,
    inputs,
    original_sd,
    original_sdxl,
    run_text,
    run_unet,
    sd15_shaped_unet,
    sd_unet,
    sdxl_unet,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}
one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(autouse=True)
def presets(monkeypatch: pytest.MonkeyPatch) -> None:
    register_presets(monkeypatch)


def _wrapped_names(network: Any, *roots: tuple[str, nn.Module]) -> set[str]:
    """Container names of the layers LyCORIS wrapped, found by object identity."""
    ids = {id(m): f"{prefix}.{n}" for prefix, root in roots for n, m in root.named_modules()}
    return {ids[id(lora.org_module[0])] for lora in network.loras}


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


# ------------------------------------------------------------------------------ SD: LyCORIS option sets
OPTION_SETS: dict[str, tuple[int, float, dict[str, Any]]] = {
    "factor": (2, 1.0, {"factor": 4}),
    "decompose_both": (2, 1.0, {"decompose_both": True}),
    "full_matrix": (4, 2.0, {"full_matrix": True}),
    "use_tucker": (2, 1.0, {"use_tucker": True, "conv_dim": 2, "conv_alpha": 4}),
    "use_scalar": (2, 2.0, {"use_scalar": True}),
    "conv_dims": (2, 4.0, {"conv_dim": 4, "conv_alpha": 1}),
    "rs_lora": (2, 1.0, {"rs_lora": True}),
    "unbalanced": (2, 1.0, {"unbalanced_factorization": True, "factor": 8}),
}


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_kohya_sd_file_matches_lycoris(option_set: str, tmp_path: Path) -> None:
    """lora_te_ (transformers-5 names) + lora_unet_ (diffusers names) load as one adapter across components."""
    dim, alpha, options = OPTION_SETS[option_set]
    unet, te = sd_unet(), clip(1)
    container = nn.ModuleDict({"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)})
    x = inputs(2, 32)
    base = run_unet(unet, x)
    network = kohya_file(tmp_path / "a.safetensors", te, unet, dim, alpha, **options)
    want_unet, want_te = run_unet(unet, x), run_text(te, x)

    info = lokr.attach_adapter(container, lokr.read_adapter(tmp_path / "a.safetensors"), "x")
    assert set(info.modules) == _wrapped_names(network, ("unet", unet), ("text_encoder", te))
    with lokr.adapter_batch(container, [[("x", MULT)]] * 2):
        got_unet, got_te = run_unet(container["unet"], x), run_text(container["text_encoder"], x)
    assert _changed(want_unet, base)
    torch.testing.assert_close(got_unet, want_unet, **TOL)
    torch.testing.assert_close(got_te, want_te, **TOL)


def test_sd_text_model_names_and_mixed_rows(tmp_path: Path) -> None:
    """sd-scripts' `lora_te_text_model_encoder_layers_...` names; base rows beside adapter rows stay base."""
    unet, te = sd_unet(), clip(1)
    container = nn.ModuleDict({"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)})
    x = inputs(2, 32)
    base_unet, base_te = run_unet(unet, x), run_text(te, x)
    network = kohya_file(tmp_path / "a.safetensors", WithTextModel(te), unet, 2, 1.0)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in network.state_dict())
    want_unet, want_te = run_unet(unet, x), run_text(te, x)

    lokr.load_adapter(container, tmp_path / "a.safetensors", "x")
    with lokr.adapter_batch(container, [[("x", MULT)], None]):
        got_unet, got_te = run_unet(container["unet"], x), run_text(container["text_encoder"], x)
    torch.testing.assert_close(got_unet[0], want_unet[0], **TOL)
    torch.testing.assert_close(got_te[0], want_te[0], **TOL)
    torch.testing.assert_close(got_unet[1], base_unet[1], **TOL)
    torch.testing.assert_close(got_te[1], base_te[1], **TOL)


def test_simpletuner_lycoris_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SimpleTuner trains with `create_lycoris` on the denoiser: `lycoris_<path>` keys."""
    unet = sd_unet()
    container = nn.ModuleDict({"unet": copy.deepcopy(unet)})
    x = inputs(2, 32)
    preset = {"target_module": ["Attention", "FeedForward", "ResnetBlock2D"], "target_name": ["conv_in", "conv_out"]}
    monkeypatch.setitem(lycoris_wrapper.PRESET, "lokr-test-simpletuner", preset)
    network = create_lycoris(unet, MULT, 2, 1.0, algo="lokr", factor=8, preset="lokr-test-simpletuner")
    network.apply_to()
    randomise(network, seed=5)
    network.save_weights(str(tmp_path / "st.safetensors"), None, {})
    assert all(k.startswith("lycoris_") for k in network.state_dict())
    want = run_unet(unet, x)

    info = lokr.load_adapter(container, tmp_path / "st.safetensors", "st")
    assert set(info.modules) == _wrapped_names(network, ("unet", unet))
    with lokr.adapter_batch(container, [[("st", MULT)]] * 2):
        torch.testing.assert_close(run_unet(container["unet"], x), want, **TOL)


# ------------------------------------------------------------------------------ original layout
def test_sd_original_layout_every_block_type(tmp_path: Path) -> None:
    """SD 1.x original names (conv proj_in, input_blocks / middle_block / output_blocks, op, skip_connection)."""
    unet = sd_unet()
    container = nn.ModuleDict({"unet": copy.deepcopy(unet)})
    x = inputs(2, 32)
    network = kohya_file(tmp_path / "o.safetensors", None, original_sd(unet), 2, 1.0, preset=EVERY_LAYER)
    want = run_unet(unet, x)
    info = lokr.load_adapter(container, tmp_path / "o.safetensors", "o")
    layers = {f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(info.modules) == _wrapped_names(network, ("unet", unet)) == layers
    with lokr.adapter_batch(container, [[("o", MULT)]] * 2):
        torch.testing.assert_close(run_unet(container["unet"], x), want, **TOL)


def test_sdxl_one_file_three_components(tmp_path: Path) -> None:
    """kohya SDXL: lora_te1_ (sd-scripts names), lora_te2_ (no text_model level), lora_unet_ in the original
    layout, every block type (time_embed, label_emb, in/emb/out_layers, skip_connection, op, conv, out)."""
    unet, te1, te2 = sdxl_unet(), clip(1), clip(2, projection=True)
    container = nn.ModuleDict(
        {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te1), "text_encoder_2": copy.deepcopy(te2)}
    )
    x = inputs(2, 64, sdxl=True)
    base = run_unet(unet, x)
    tes = [WithTextModel(te1), te2.text_model]
    network = kohya_file(
        tmp_path / "xl.safetensors", tes, original_sdxl(unet), 2, 1.0, preset=EVERY_LAYER, use_tucker=True
    )
    stems = {k.rpartition(".")[0] for k in network.state_dict()}
    for part in ("time_embed_0", "label_emb_0_2", "input_blocks_3_0_op", "output_blocks_2_2_conv", "out_2"):
        assert f"lora_unet_{part}" in stems
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in stems
    assert "lora_te2_encoder_layers_1_self_attn_q_proj" in stems
    want_unet, want_te1, want_te2 = run_unet(unet, x), run_text(te1, x), run_text(te2, x)

    info = lokr.load_adapter(container, tmp_path / "xl.safetensors", "xl")
    layers = {f"unet.{n}" for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    expected = _wrapped_names(network, ("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2))
    assert set(info.modules) == expected and layers <= expected
    with lokr.adapter_batch(container, [[("xl", MULT)]] * 2):
        got = run_unet(container["unet"], x)
        got_te1, got_te2 = run_text(container["text_encoder"], x), run_text(container["text_encoder_2"], x)
    assert _changed(want_unet, base)
    torch.testing.assert_close(got, want_unet, **TOL)
    torch.testing.assert_close(got_te1, want_te1, **TOL)
    torch.testing.assert_close(got_te2, want_te2, **TOL)


# ------------------------------------------------------------------------------ PEFT
def test_peft_dir_from_unet(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    unet = sd_unet()
    container = lokr.pipeline_modules(_Pipe(unet=copy.deepcopy(unet), text_encoder=clip(1)))
    x = inputs(2, 32)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "conv_shortcut", "conv"]
    config = peft.LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False, use_effective_conv2d=True)
    model = peft.get_peft_model(unet, config)
    model.save_pretrained(str(tmp_path / "peft"))
    want = run_unet(model.base_model.model, x)

    info = lokr.load_adapter(container, tmp_path / "peft", "p")
    assert info.format == "peft" and all(n.startswith("unet.") for n in info.modules)
    with lokr.adapter_batch(container, ["p", "p"]):
        torch.testing.assert_close(run_unet(container["unet"], x), want, **TOL)


class _Pipe:
    """Stands in for a diffusers pipeline object: components as attributes (vae etc. are not adapter targets)."""

    def __init__(self, **components: nn.Module | None) -> None:
        self.vae = nn.Conv2d(3, 4, 1)
        self.scheduler = object()
        for name, module in components.items():
            setattr(self, name, module)


def test_pipeline_modules_shares_components() -> None:
    unet, te = sd_unet(), clip(1)
    container = lokr.pipeline_modules(_Pipe(unet=unet, text_encoder=te, text_encoder_2=None))
    assert list(container) == ["unet", "text_encoder"]
    assert container["unet"] is unet and container["text_encoder"] is te
    with pytest.raises(lokr.TargetError, match="none of the components"):
        lokr.pipeline_modules(object())


def test_sd15_block_numbering() -> None:
    """SD 1.5's real block structure (4 levels, 2 layers each): the checkpoint names every kohya SD file uses."""
    unet = sd15_shaped_unet()
    names = original_unet_names(unet, [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    known = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
        "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.2.resnets.0.conv_shortcut": "input_blocks.7.0.skip_connection",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
        "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
        "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.6.1.transformer_blocks.0.ff.net.2",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "time_embedding.linear_2": "time_embed.2",
        "conv_out": "out.2",
    }
    assert {k: names[k] for k in known} == known
    assert len(set(names.values())) == len(names)  # one original name per layer
