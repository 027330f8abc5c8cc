"""Stability AI's original SD3 / SD3.5 MMDiT layout names (kohya sd-scripts' SD3 keys) on a diffusers SD3
transformer (`SD3Transformer2DModel`).

sd-scripts names the layers after SAI's code: `joint_blocks_0_x_block_attn_proj`,
`joint_blocks_0_context_block_mlp_fc1`, `t_embedder_mlp_0`, ... Most have one diffusers counterpart
(`original_sd3_names`), as diffusers' own conversion of an SAI checkpoint maps them. Fused there and separate in
diffusers (`sd3_fused_rows`): every `attn.qkv` (q, k, v: `x_block`'s, `context_block`'s and SD3.5's second
`x_block.attn2`), and, with their shift and scale halves swapped (diffusers' `swap_scale_shift`),
`final_layer_adaLN_modulation_1` and the last block's `context_block_adaLN_modulation_1`. A fused key splits by
`flux_names.split_rows` where its factors allow it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .flux_names import RowMap, consecutive_rows, swapped_rows

__all__ = ["is_sd3", "original_sd3_names", "sd3_fused_rows"]

_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}  # fmt: skip
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj", "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "attn.to_add_out": "context_block.attn.proj", "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
}  # fmt: skip
_QKV = {
    "x_block_attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block_attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block_attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_FUSED_QKV = re.compile(r"joint_blocks_(\d+)_(x_block_attn2?|context_block_attn)_qkv")
_CONTEXT_MODULATION = re.compile(r"joint_blocks_(\d+)_context_block_adaLN_modulation_1")
_FINAL_MODULATION = "final_layer_adaLN_modulation_1"


def is_sd3(model: nn.Module) -> bool:
    """A diffusers SD3-shaped transformer: joint `transformer_blocks`, a patch embedding `pos_embed`, no
    single-stream blocks (Flux)."""
    blocks = getattr(model, "transformer_blocks", None)
    patches = hasattr(getattr(model, "pos_embed", None), "proj")  # Flux's `pos_embed` is its rotary embedding
    single = hasattr(model, "single_transformer_blocks")
    return isinstance(blocks, nn.ModuleList) and patches and not single


def original_sd3_names(transformer: nn.Module, module_names: Sequence[str]) -> dict[str, str]:
    """`{diffusers name: SAI name}` for those of `module_names` (relative) with a one-to-one SAI counterpart (the
    last block's context modulation is swapped: `sd3_fused_rows`)."""
    if not is_sd3(transformer):
        return {}
    last = _last_block(transformer)
    names: dict[str, str] = {}
    for name in module_names:
        parts = name.split(".")
        rest = ".".join(parts[2:])
        if name in _TOP:
            names[name] = _TOP[name]
        elif parts[0] == "transformer_blocks" and rest in _BLOCK:
            if rest == "norm1_context.linear" and int(parts[1]) == last:
                continue
            names[name] = f"joint_blocks.{parts[1]}.{_BLOCK[rest]}"
    return names


def sd3_fused_rows(transformer: nn.Module, path: str) -> RowMap | None:
    """The diffusers layers (relative names) a fused SAI layer `path` (dotted or flat) splits into, with the fused
    layer's rows each takes; None when `path` is not a fused SAI layer of this transformer."""
    if not is_sd3(transformer):
        return None
    flat = path.replace(".", "_")
    if (m := _FUSED_QKV.fullmatch(flat)) is not None:
        return consecutive_rows(transformer, [f"transformer_blocks.{m[1]}.{n}" for n in _QKV[m[2]]])
    last = _last_block(transformer)
    if (m := _CONTEXT_MODULATION.fullmatch(flat)) is not None and int(m[1]) == last:
        return swapped_rows(transformer, f"transformer_blocks.{last}.norm1_context.linear")
    if flat == _FINAL_MODULATION:
        return swapped_rows(transformer, "norm_out.linear")
    return None


def _last_block(transformer: nn.Module) -> int:
    """The index of the last joint block (its context stream ends there: no context projection or MLP)."""
    blocks = transformer.transformer_blocks
    assert isinstance(blocks, nn.ModuleList)
    return len(blocks) - 1
