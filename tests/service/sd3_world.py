"""An SAI-layout twin of the diffusers SD3 transformer, for kohya sd-scripts' SD3 keys written by the real
`lycoris-lora` (its kohya network on the twin), and the twin's merged weights copied back as diffusers' own
conversion of an SAI checkpoint would."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .flux_world import effective_weight, fused_linear, seq, tree

__all__ = ["sai_twin", "sai_twin_to_diffusers"]


def sai_twin(t: Any) -> nn.Module:
    """The diffusers SD3 transformer `t`'s Linear / Conv2d layers under SAI's MMDiT names and fused shapes (only the
    layers: LyCORIS builds its kohya-named network on this tree)."""
    timestep, text = t.time_text_embed.timestep_embedder, t.time_text_embed.text_embedder
    twin = tree(
        x_embedder=tree(proj=copy.deepcopy(t.pos_embed.proj)),
        t_embedder=tree(mlp=seq(fused_linear(timestep.linear_1), nn.SiLU(), fused_linear(timestep.linear_2))),
        y_embedder=tree(mlp=seq(fused_linear(text.linear_1), nn.SiLU(), fused_linear(text.linear_2))),
        context_embedder=fused_linear(t.context_embedder),
        final_layer=tree(
            linear=fused_linear(t.proj_out), adaLN_modulation=seq(nn.SiLU(), fused_linear(t.norm_out.linear, swap=True))
        ),
    )
    twin.joint_blocks = nn.ModuleList(_joint_block(b) for b in t.transformer_blocks)
    return twin


def _joint_block(b: Any) -> nn.Module:
    """SAI's `x_block` / `context_block` pair of one diffusers joint block (the last block's context stream has no
    projection or MLP, and its modulation's halves are swapped)."""
    x = tree(
        attn=tree(qkv=fused_linear(b.attn.to_q, b.attn.to_k, b.attn.to_v), proj=fused_linear(b.attn.to_out[0])),
        mlp=tree(fc1=fused_linear(b.ff.net[0].proj), fc2=fused_linear(b.ff.net[2])),
        adaLN_modulation=seq(nn.SiLU(), fused_linear(b.norm1.linear)),
    )
    if b.attn2 is not None:  # SD3.5's second image attention
        x.attn2 = tree(qkv=fused_linear(b.attn2.to_q, b.attn2.to_k, b.attn2.to_v), proj=fused_linear(b.attn2.to_out[0]))
    context = tree(
        attn=tree(qkv=fused_linear(b.attn.add_q_proj, b.attn.add_k_proj, b.attn.add_v_proj)),
        adaLN_modulation=seq(nn.SiLU(), fused_linear(b.norm1_context.linear, swap=b.context_pre_only)),
    )
    if not b.context_pre_only:
        context.attn.proj = fused_linear(b.attn.to_add_out)
        context.mlp = tree(fc1=fused_linear(b.ff_context.net[0].proj), fc2=fused_linear(b.ff_context.net[2]))
    return tree(x_block=x, context_block=context)


def sai_twin_to_diffusers(twin: nn.Module, t: Any) -> None:
    """Copy the twin's effective weights (LyCORIS's deltas merged) into `t`'s layers as diffusers' SD3 conversion
    maps them: q / k / v rows in order, the final and last context modulations' halves swapped back."""
    timestep, text = t.time_text_embed.timestep_embedder, t.time_text_embed.text_embedder
    pairs: list[tuple[nn.Module, list[Any], bool]] = [
        (twin.t_embedder.mlp[0], [timestep.linear_1], False), (twin.t_embedder.mlp[2], [timestep.linear_2], False),
        (twin.y_embedder.mlp[0], [text.linear_1], False), (twin.y_embedder.mlp[2], [text.linear_2], False),
        (twin.context_embedder, [t.context_embedder], False), (twin.final_layer.linear, [t.proj_out], False),
        (twin.final_layer.adaLN_modulation[1], [t.norm_out.linear], True),
    ]  # fmt: skip
    for sai, b in zip(twin.joint_blocks, t.transformer_blocks):
        x, c = sai.x_block, sai.context_block
        pairs += [
            (x.attn.qkv, [b.attn.to_q, b.attn.to_k, b.attn.to_v], False), (x.attn.proj, [b.attn.to_out[0]], False),
            (x.mlp.fc1, [b.ff.net[0].proj], False), (x.mlp.fc2, [b.ff.net[2]], False),
            (x.adaLN_modulation[1], [b.norm1.linear], False),
            (c.attn.qkv, [b.attn.add_q_proj, b.attn.add_k_proj, b.attn.add_v_proj], False),
            (c.adaLN_modulation[1], [b.norm1_context.linear], b.context_pre_only),
        ]  # fmt: skip
        if b.attn2 is not None:
            pairs += [(x.attn2.qkv, [b.attn2.to_q, b.attn2.to_k, b.attn2.to_v], False),
                      (x.attn2.proj, [b.attn2.to_out[0]], False)]  # fmt: skip
        if not b.context_pre_only:
            pairs += [(c.attn.proj, [b.attn.to_add_out], False), (c.mlp.fc1, [b.ff_context.net[0].proj], False),
                      (c.mlp.fc2, [b.ff_context.net[2]], False)]  # fmt: skip
    with torch.no_grad():
        for fused, parts, swap in pairs:
            weight = effective_weight(fused)  # type: ignore[arg-type]
            if swap:
                weight = torch.cat(weight.chunk(2)[::-1])
            for part, rows in zip(parts, weight.split([p.out_features for p in parts])):
                part.weight.copy_(rows)
        t.pos_embed.proj.weight.copy_(_effective_conv_weight(twin.x_embedder.proj))


def _effective_conv_weight(conv: nn.Module) -> torch.Tensor:
    """`(out, in, k, k)` of a (LyCORIS-wrapped) patch-embedding Conv2d (stride = kernel), read off its forward on
    one-hot patches."""
    out, channels, k, _ = conv.weight.shape  # LyCORIS wraps the forward, the module keeps its weight
    eye = torch.eye(channels * k * k).reshape(-1, channels, k, k)
    with torch.no_grad():
        response = (conv(eye) - conv(torch.zeros(1, channels, k, k))).reshape(-1, out)
    return response.T.reshape(out, channels, k, k)
