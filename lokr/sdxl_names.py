"""The original (LDM / SGM) layout names of a diffusers `UNet2DConditionModel`'s layers.

kohya's SDXL files (and `diffusion_model.*` checkpoints) name UNet layers after the original code:
`input_blocks.<n>.<k>`, `middle_block.<k>`, `output_blocks.<n>.<k>`, `time_embed`, `label_emb`, `out`.
The numbering is derived here from the model's own block structure (resnets, attentions, down / up
samplers per block), so one rule serves SD 1.x / 2.x and SDXL layouts alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["original_unet_names"]

# Inner names of a resnet block: diffusers -> original (`ResBlock`).
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWNSAMPLE = {"conv": "op"}
_UPSAMPLE = {"conv": "conv"}
# Layers outside the blocks.
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# (diffusers prefix, original prefix, inner-name map; None keeps inner names, as for attention blocks)
_Block = tuple[str, str, Mapping[str, str] | None]


def _attentions(block: nn.Module) -> int:
    attentions = getattr(block, "attentions", None)
    return len(attentions) if attentions is not None else 0


def _down_blocks(unet: nn.Module) -> list[_Block]:
    blocks: list[_Block] = []
    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):  # type: ignore[arg-type]
        for j in range(len(block.resnets)):
            blocks.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _RESNET))
            if j < _attentions(block):
                blocks.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", None))
            index += 1
        if getattr(block, "downsamplers", None):
            blocks.append((f"down_blocks.{i}.downsamplers.0", f"input_blocks.{index}.0", _DOWNSAMPLE))
            index += 1
    return blocks


def _mid_block(unet: nn.Module) -> list[_Block]:
    mid = getattr(unet, "mid_block", None)
    if mid is None:
        return []
    blocks: list[_Block] = []
    index = 0  # resnet, attention, resnet, ...
    for j in range(len(mid.resnets)):
        blocks.append((f"mid_block.resnets.{j}", f"middle_block.{index}", _RESNET))
        index += 1
        if j < _attentions(mid):
            blocks.append((f"mid_block.attentions.{j}", f"middle_block.{index}", None))
            index += 1
    return blocks


def _up_blocks(unet: nn.Module) -> list[_Block]:
    blocks: list[_Block] = []
    index = 0
    for i, block in enumerate(unet.up_blocks):  # type: ignore[arg-type]
        count, attentions = len(block.resnets), _attentions(block)
        for j in range(count):
            blocks.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _RESNET))
            if j < attentions:
                blocks.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", None))
            if j == count - 1 and getattr(block, "upsamplers", None):
                slot = 2 if attentions else 1  # the upsampler follows the block's last layer
                blocks.append((f"up_blocks.{i}.upsamplers.0", f"output_blocks.{index}.{slot}", _UPSAMPLE))
            index += 1
    return blocks


def _is_unet2d(unet: nn.Module) -> bool:
    return all(isinstance(getattr(unet, n, None), nn.ModuleList) for n in ("down_blocks", "up_blocks"))


def original_unet_names(unet: nn.Module, module_names: list[str]) -> dict[str, str]:
    """`{diffusers name: original-layout name}` for those of `module_names` (relative to `unet`) that have one.

    Empty for models that are not UNet2DCondition-shaped (DiT transformers keep diffusers names).
    """
    if not _is_unet2d(unet):
        return {}
    blocks = {prefix: (original, inner) for prefix, original, inner in _down_blocks(unet) + _mid_block(unet)}
    blocks.update({prefix: (original, inner) for prefix, original, inner in _up_blocks(unet)})
    names: dict[str, str] = {}
    for name in module_names:
        if name in _TOP:
            names[name] = _TOP[name]
            continue
        parts = name.split(".")
        for depth in (4, 3):  # "down_blocks.0.resnets.1" / "mid_block.resnets.0"
            prefix, rest = ".".join(parts[:depth]), ".".join(parts[depth:])
            if prefix in blocks and rest:
                original, inner = blocks[prefix]
                mapped = rest if inner is None else inner.get(rest)
                if mapped is not None:
                    names[name] = f"{original}.{mapped}"
                break
    return names
