"""Tiny SD- and SDXL-style pipeline components from configs, and the original-layout (LDM / SGM) view of a UNet.

`OriginalUNet` rewraps a diffusers UNet's own layers (shared, not copied) under the names kohya's SDXL
files use (`input_blocks.4.1.proj_in`, `output_blocks.2.2.conv`, ...). The block lists are written out
by hand from the original architecture for the two tiny configs below, independently of `lokr.sdxl_names`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TEXT_LEN = 7


def sd_unet(seed: int = 0, widths: tuple[int, int, int] = (32, 64, 64)) -> UNet2DConditionModel:
    """SD 1.x layout: conv proj_in/out, attention in the two upper levels, one layer per block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: linear proj_in/out, text_time add_embedding, two layers per block, depth-2 transformers."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + the pooled 32-d text embedding
        cross_attention_dim=64,
        norm_num_groups=8,
    ).eval()


def clip(seed: int, projection: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,  # prime: a 1 x 37 factorization on the MLP
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=99,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


@dataclass
class Inputs:
    """Fixed inputs for one denoiser call and the text encoders."""

    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    ids: torch.Tensor
    added: dict[str, torch.Tensor] | None = None


def inputs(batch: int, context_dim: int, sdxl: bool = False) -> Inputs:
    g = torch.Generator().manual_seed(7)
    added = None
    if sdxl:
        added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * 64}
    return Inputs(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([500.0, 20.0, 999.0, 1.0][:batch]),
        context=torch.randn(batch, TEXT_LEN, context_dim, generator=g),
        ids=torch.randint(3, 99, (batch, TEXT_LEN), generator=g),
        added=added,
    )


def run_unet(unet: nn.Module, x: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(x.sample, x.timestep, x.context, added_cond_kwargs=x.added).sample


def run_text(encoder: nn.Module, x: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return encoder(x.ids).last_hidden_state


# ------------------------------------------------------------------------------ original-layout view
class ResBlock(nn.Module):
    """LDM's ResBlock names around a diffusers ResnetBlock2D's layers."""

    def __init__(self, r: nn.Module) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(r.norm1, nn.SiLU(), r.conv1)
        self.emb_layers = nn.Sequential(nn.SiLU(), r.time_emb_proj)
        self.out_layers = nn.Sequential(r.norm2, nn.SiLU(), nn.Dropout(), r.conv2)
        self.skip_connection = r.conv_shortcut if r.conv_shortcut is not None else nn.Identity()


class Downsample(nn.Module):
    def __init__(self, d: nn.Module) -> None:
        super().__init__()
        self.op = d.conv


class Upsample(nn.Module):
    def __init__(self, u: nn.Module) -> None:
        super().__init__()
        self.conv = u.conv


class OriginalUNet(nn.Module):
    """`input_blocks` / `middle_block` / `output_blocks` / `time_embed` / `label_emb` / `out` of the LDM code."""

    def __init__(self, u: UNet2DConditionModel, inputs: list[list[nn.Module]], outputs: list[list[nn.Module]]) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(u.time_embedding.linear_1, nn.SiLU(), u.time_embedding.linear_2)
        if getattr(u, "add_embedding", None) is not None:
            self.label_emb = nn.Sequential(nn.Sequential(u.add_embedding.linear_1, nn.SiLU(), u.add_embedding.linear_2))
        self.input_blocks = nn.ModuleList(nn.Sequential(*b) for b in inputs)
        m = u.mid_block
        self.middle_block = nn.Sequential(ResBlock(m.resnets[0]), m.attentions[0], ResBlock(m.resnets[1]))
        self.output_blocks = nn.ModuleList(nn.Sequential(*b) for b in outputs)
        self.out = nn.Sequential(u.conv_norm_out, nn.SiLU(), u.conv_out)


def original_sd(u: UNet2DConditionModel) -> OriginalUNet:
    """SD 1.x numbering for `sd_unet` (one layer per block; attention at levels 0 and 1)."""
    d, up = u.down_blocks, u.up_blocks
    inputs = [
        [u.conv_in],
        [ResBlock(d[0].resnets[0]), d[0].attentions[0]],
        [Downsample(d[0].downsamplers[0])],
        [ResBlock(d[1].resnets[0]), d[1].attentions[0]],
        [Downsample(d[1].downsamplers[0])],
        [ResBlock(d[2].resnets[0])],
    ]
    outputs = [
        [ResBlock(up[0].resnets[0])],
        [ResBlock(up[0].resnets[1]), Upsample(up[0].upsamplers[0])],
        [ResBlock(up[1].resnets[0]), up[1].attentions[0]],
        [ResBlock(up[1].resnets[1]), up[1].attentions[1], Upsample(up[1].upsamplers[0])],
        [ResBlock(up[2].resnets[0]), up[2].attentions[0]],
        [ResBlock(up[2].resnets[1]), up[2].attentions[1]],
    ]
    return OriginalUNet(u, inputs, outputs)


def original_sdxl(u: UNet2DConditionModel) -> OriginalUNet:
    """SDXL numbering for `sdxl_unet` (two layers per block; attention at levels 1 and 2)."""
    d, up = u.down_blocks, u.up_blocks
    inputs = [
        [u.conv_in],
        [ResBlock(d[0].resnets[0])],
        [ResBlock(d[0].resnets[1])],
        [Downsample(d[0].downsamplers[0])],
        [ResBlock(d[1].resnets[0]), d[1].attentions[0]],
        [ResBlock(d[1].resnets[1]), d[1].attentions[1]],
        [Downsample(d[1].downsamplers[0])],
        [ResBlock(d[2].resnets[0]), d[2].attentions[0]],
        [ResBlock(d[2].resnets[1]), d[2].attentions[1]],
    ]
    outputs = [
        [ResBlock(up[0].resnets[0]), up[0].attentions[0]],
        [ResBlock(up[0].resnets[1]), up[0].attentions[1]],
        [ResBlock(up[0].resnets[2]), up[0].attentions[2], Upsample(up[0].upsamplers[0])],
        [ResBlock(up[1].resnets[0]), up[1].attentions[0]],
        [ResBlock(up[1].resnets[1]), up[1].attentions[1]],
        [ResBlock(up[1].resnets[2]), up[1].attentions[2], Upsample(up[1].upsamplers[0])],
        [ResBlock(up[2].resnets[0])],
        [ResBlock(up[2].resnets[1])],
        [ResBlock(up[2].resnets[2])],
    ]
    return OriginalUNet(u, inputs, outputs)


class WithTextModel(nn.Module):
    """A transformers-5 CLIPTextModel under a `text_model` attribute: transformers 4's (sd-scripts') names."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.text_model = encoder


def sd15_shaped_unet() -> UNet2DConditionModel:
    """SD 1.5's block structure (4 levels, 2 layers per block, attention in the upper three) at tiny widths."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
