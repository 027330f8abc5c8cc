"""Tiny random Flux-style (and SD3-style) pipelines built from configs (DiT denoiser, CLIP + T5 text encoders,
flow matching).

Nothing is downloaded: the T5 tokenizer is a Unigram model over a few words and the letters, the CLIP one is
`tiny.build_clip_tokenizer`'s; weights come from a fixed seed. The VAE has 4 latent channels, so the
transformer sees 16 channels (4 x 2x2 packing), as diffusers' own Flux tests build it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FLUX_TARGETS", "build_t5_tokenizer", "build_tiny_chroma", "build_tiny_flux", "build_tiny_sd3",
    "save_peft_flux_lokr",
]  # fmt: skip

# The transformer layers a typical Flux LoKr trains: attention (image and text streams), MLPs, norms' linears.
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX_TARGETS += ["ff.net.2", "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear"]

_WORDS = ["a", "red", "cat", "the", "dog", "on", "mat", "lighthouse", "at", "dusk", "blue", "sky"]


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram over pad / eos / unk, a few words and single letters); ~40 entries."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(_WORDS)]
    pieces += [("\u2581", -30.0)] + [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _t5(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config)


def _flux_vae(latent_channels: int = 4, factor: int = 2) -> Any:
    """Flux's VAE shape in miniature: no quant convs, a shift and scaling factor; `factor` 2 (two blocks), or 8 as
    the real one's (four: Kontext's references are megapixel pictures, which at a factor of 2 would be hundreds of
    thousands of tokens)."""
    from diffusers import AutoencoderKL

    blocks = factor.bit_length()  # each block after the first halves the size: 2 -> 2 blocks, 8 -> 4
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:blocks], in_channels=3, out_channels=3,
        latent_channels=latent_channels, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    )  # fmt: skip


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True, fill: bool = False, kontext: bool = False) -> Any:
    """A random-weight `FluxPipeline` on CPU (one double-stream and two single-stream blocks, width 16); `fill`: a
    `FluxFillPipeline` (an inpainting checkpoint: the transformer also takes the masked picture's packed latents,
    16 channels, and the packed mask, 2x2 VAE factor x 4 = 16); `kontext`: a `FluxKontextPipeline` (the same
    transformer, edits from a reference picture)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel

    from .tiny import _text_config, build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=48 if fill else 16, out_channels=16, num_layers=1, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    cls = FluxFillPipeline if fill else FluxKontextPipeline if kontext else FluxPipeline
    vae = _flux_vae(factor=8 if kontext else 2)
    return cls(
        scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_text_config(len(tokenizer), False)),
        tokenizer=tokenizer, text_encoder_2=_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def save_peft_flux_lokr(pipeline_dir: Path, out: Path, seed: int) -> Path:
    """peft's LoKr on the pipeline's Flux transformer (`FLUX_TARGETS`), saved as a PEFT dir (`transformer.` keys)."""
    from diffusers import FluxTransformer2DModel

    from .tiny import save_peft_lokr

    transformer = FluxTransformer2DModel.from_pretrained(pipeline_dir, subfolder="transformer", use_safetensors=True)
    return save_peft_lokr(transformer, "transformer", FLUX_TARGETS, out, seed)


def build_tiny_sd3(seed: int = 0) -> Any:
    """A random-weight `StableDiffusion3Pipeline` on CPU: an MMDiT of two joint blocks (width 16, patch 2; SD3.5's
    second image attention in the first and q / k RMS norms; the last block's context stream ends early), two CLIP
    encoders with projections (32 wide each: 64 pooled), a T5 of width 64 (CLIP's 2 x 32 padded to it), Flux's
    tiny VAE with SD3's 16 latent channels (diffusers' SD3 inpainting pipeline takes no other), flow matching with
    SD3's shift of 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .tiny import _text_config, build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        dual_attention_layers=(0,), qk_norm="rms_norm",
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=16,
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))  # fmt: skip
    vocab = len(tokenizer)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flux_vae(16),
        text_encoder=CLIPTextModelWithProjection(_text_config(vocab, True)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab, True)), tokenizer_2=tokenizer_2,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )  # fmt: skip


def build_tiny_chroma(seed: int = 0) -> Any:
    """A random-weight `ChromaPipeline` on CPU: Flux's tiny transformer shape (one double-stream and two
    single-stream blocks, width 16) with a one-layer approximator for its modulations, the tiny T5 as its only text
    encoder, Flux's tiny VAE and flow-matching schedule."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return ChromaPipeline(
        scheduler=scheduler, vae=_flux_vae(), text_encoder=_t5(len(tokenizer)), tokenizer=tokenizer,
        transformer=transformer,
    )  # fmt: skip
