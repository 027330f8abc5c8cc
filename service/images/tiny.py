"""Tiny random SD-style, SDXL-style and Flux-style pipelines built from configs (tests, benchmarks, demos).

Nothing is downloaded: the CLIP tokenizer is a byte-level BPE with a handful of merges, the weights come
from a fixed seed (Flux: `tiny_flux`). `save_tiny_pipeline` writes a diffusers pipeline dir (safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UNET_TARGETS",
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "inject_peft_lokr",
    "save_peft_lokr",
    "save_peft_unet_lokr",
    "save_tiny_pipeline",
]

# The UNet layers a typical LoKr trains (attention, feed-forward out, resnet convs and time projections).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]
UNET_TARGETS += ["time_emb_proj"]

_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>"),
]  # fmt: skip


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def build_clip_tokenizer(model_max_length: int = 16) -> Any:
    """A CLIP tokenizer (bytes, bytes + `</w>`, a few merges, CLIP's special tokens); ~530 entries."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    for merge in _MERGES:
        merged = "".join(merge)
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: Any = list(_MERGES)  # (left, right) pairs; the hint says str
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_config(vocab_size: int, projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=vocab_size, max_position_embeddings=16, projection_dim=32 if projection else 512,
        hidden_act="gelu",
    )  # fmt: skip


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )  # fmt: skip


def _controlnet(unet: Any) -> Any:
    """A ControlNet copied from `unet` (as diffusers starts one), its zero convolutions drawn at random instead and
    its control-image embedding drawn larger, so that the control image and its content change the image (a
    trained one's are not zero either)."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.3)
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            conv.weight.normal_(0.0, 0.5)
    return controlnet


def build_tiny_pipeline(kind: str = "sd", seed: int = 0) -> Any:
    """A random-weight `StableDiffusionPipeline` ("sd"), an SD inpainting checkpoint ("sd-inpaint": a 9-channel UNet,
    `StableDiffusionInpaintPipeline`), `StableDiffusionXLPipeline` ("sdxl"; "sdxl-inpaint" likewise) or `FluxPipeline`
    ("flux"; "flux-fill": `FluxFillPipeline`, Flux's inpainting checkpoint; "flux-kontext": `FluxKontextPipeline`),
    `StableDiffusion3Pipeline` ("sd3"), `ChromaPipeline` ("chroma") or `StableDiffusionControlNetPipeline` /
    `StableDiffusionXLControlNetPipeline` ("sd-controlnet" / "sdxl-controlnet": "sd" / "sdxl" with a ControlNet) on
    CPU."""
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind in ("flux", "flux-fill", "flux-kontext"):
        from .tiny_flux import build_tiny_flux

        return build_tiny_flux(seed, fill=kind == "flux-fill", kontext=kind == "flux-kontext")
    if kind == "chroma":
        from .tiny_flux import build_tiny_chroma

        return build_tiny_chroma(seed)
    if kind == "sd3":
        from .tiny_flux import build_tiny_sd3

        return build_tiny_sd3(seed)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    vocab = len(tokenizer)
    common: dict[str, Any] = {
        "block_out_channels": (16, 32), "layers_per_block": 1, "sample_size": 16, "in_channels": 4,
        "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 4,
    }  # fmt: skip
    scheduler: Any
    if kind in ("sd", "sd-inpaint", "sd-controlnet"):  # an inpainting UNet also takes the mask and masked picture
        unet = UNet2DConditionModel(**{**common, "in_channels": 9 if kind == "sd-inpaint" else 4},
                                    cross_attention_dim=32, attention_head_dim=4)  # fmt: skip
        scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        parts = {"vae": _vae(), "text_encoder": CLIPTextModel(_text_config(vocab, False)), "tokenizer": tokenizer,
                 "unet": unet, "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
                 "requires_safety_checker": False}  # fmt: skip
        if kind == "sd-controlnet":
            from diffusers import StableDiffusionControlNetPipeline

            return StableDiffusionControlNetPipeline(**parts, controlnet=_controlnet(unet))
        cls = StableDiffusionInpaintPipeline if kind == "sd-inpaint" else StableDiffusionPipeline
        return cls(**parts)
    if kind in ("sdxl", "sdxl-inpaint", "sdxl-controlnet"):
        unet = UNet2DConditionModel(
            **{**common, "in_channels": 9 if kind == "sdxl-inpaint" else 4}, attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        )  # fmt: skip
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
        xl_parts = {"vae": _vae(), "text_encoder": CLIPTextModel(_text_config(vocab, True)), "tokenizer": tokenizer,
                    "text_encoder_2": CLIPTextModelWithProjection(_text_config(vocab, True)),
                    "tokenizer_2": build_clip_tokenizer(), "unet": unet, "scheduler": scheduler,
                    "force_zeros_for_empty_prompt": True}  # fmt: skip
        if kind == "sdxl-controlnet":
            from diffusers import StableDiffusionXLControlNetPipeline

            return StableDiffusionXLControlNetPipeline(**xl_parts, controlnet=_controlnet(unet))
        xl_cls = StableDiffusionXLInpaintPipeline if kind == "sdxl-inpaint" else StableDiffusionXLPipeline
        return xl_cls(**xl_parts)
    kinds = (
        "'sd', 'sd-inpaint', 'sd-controlnet', 'sdxl', 'sdxl-inpaint', 'sdxl-controlnet', 'sd3', 'flux', 'flux-fill', "
        "'flux-kontext' or 'chroma'"
    )
    raise ValueError(f"kind must be {kinds}, got {kind!r}")


def save_tiny_pipeline(out: Path, kind: str = "sd", seed: int = 0) -> Path:
    """Build and save a tiny pipeline dir (safetensors weights); returns `out`."""
    pipe = build_tiny_pipeline(kind, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def inject_peft_lokr(model: Any, seed: int, name: str = "default", r: int = 4, targets: list[str] | None = None) -> Any:
    """peft's LoKr (random factors from `seed`) injected into `model` (a UNet unless `targets` says otherwise) in
    place; returns its peft config."""
    from peft import LoKrConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoKrConfig(r=r, alpha=r, target_modules=targets or UNET_TARGETS, init_weights=False)
    inject_adapter_in_model(config, model, adapter_name=name)
    return config


def save_peft_unet_lokr(pipeline_dir: Path, out: Path, seed: int) -> Path:
    """peft's LoKr on the pipeline's UNet, saved as a PEFT dir keyed by the adapter container (`unet.` prefix)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet", use_safetensors=True)
    return save_peft_lokr(unet, "unet", UNET_TARGETS, out, seed)


def save_peft_lokr(model: Any, component: str, targets: list[str], out: Path, seed: int) -> Path:
    """peft's LoKr injected into `model` (the pipeline's `component`), saved as a PEFT dir with container keys."""
    import json

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = inject_peft_lokr(model, seed, targets=targets)
    state = get_peft_model_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{component}.{k}": v.contiguous() for k, v in state.items()}
    save_file(tensors, out / "adapter_model.safetensors")
    meta = {**config.to_dict(), "target_modules": sorted(config.target_modules), "peft_type": "LOKR"}
    (out / "adapter_config.json").write_text(json.dumps(meta, default=str))
    return out
