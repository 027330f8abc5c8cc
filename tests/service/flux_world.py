"""Builders for the Flux image tests: LoKr files written by the real `lycoris-lora` on the diffusers Flux
transformer (its own `create_lycoris` network, `lycoris_` keys as SimpleTuner saves them) and peft references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from service.images.tiny import inject_peft_lokr
from service.images.tiny_flux import FLUX_TARGETS

from ..lokr.lyco import MULT, keep_class_presets, randomise
from .images_world import load

__all__ = [
    "LINEAR_PRESET",
    "MULT",
    "effective_weight",
    "fused_linear",
    "lycoris_flux_file",
    "lycoris_networks_file",
    "peft_flux_reference",
    "register_linear_preset",
    "seq",
    "tree",
    "with_extra_key",
]

LINEAR_PRESET = "lokr-test-flux-linear"  # every nn.Linear of the transformer (LyCORIS's "full" adds norms)


def register_linear_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """LyCORIS's wrapper preset targeting Linear layers only; class attributes restored after the test."""
    from lycoris import config

    keep_class_presets(monkeypatch)
    for prefix in ("lycoris", "lora_te1", "lora_te3"):
        preset = {"target_module": ["Linear"], "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": prefix}
        monkeypatch.setitem(config.PRESET, _preset(prefix), preset)


def _preset(prefix: str) -> str:
    return LINEAR_PRESET if prefix == "lycoris" else f"{LINEAR_PRESET}-{prefix}"


def lycoris_networks_file(path: Path, parts: list[tuple[str, nn.Module]], seed: int = 11) -> Path:
    """One file holding `create_lycoris` LoKr networks on several modules, each under its key prefix
    (`lycoris` / `lora_te1` / `lora_te3`), applied in place at multiplier MULT with randomised factors."""
    from lycoris import create_lycoris
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, (prefix, module) in enumerate(parts):
        network = create_lycoris(module, MULT, 4, 2.0, algo="lokr", factor=4, preset=_preset(prefix))
        network.apply_to()
        randomise(network, seed + i)
        tensors.update({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()})
    save_file(tensors, str(path))
    return path


def lycoris_flux_file(path: Path, transformer: nn.Module, seed: int = 11, **options: Any) -> Any:
    """`create_lycoris(transformer, algo="lokr")` applied in place at multiplier MULT, randomised, saved."""
    from lycoris import create_lycoris

    options.setdefault("factor", 4)
    network = create_lycoris(transformer, MULT, 4, 2.0, algo="lokr", preset=LINEAR_PRESET, **options)
    network.apply_to()
    randomise(network, seed)
    network.save_weights(str(path), None, {})
    return network


def peft_flux_reference(path: Path, seed: int) -> Any:
    """The plain Flux pipeline with peft's LoKr (same seed as `save_peft_flux_lokr`) injected into its transformer."""
    pipe = load(path).pipe
    inject_peft_lokr(pipe.transformer, seed, targets=FLUX_TARGETS)
    return pipe


def with_extra_key(src: Path, out: Path, stem: str) -> Path:
    """A copy of the LyCORIS file `src` plus LoKr factors for the module `stem` (which the model may lack)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    tensors[f"{stem}.lokr_w1"] = torch.ones(2, 2)
    tensors[f"{stem}.lokr_w2"] = torch.ones(8, 8)
    tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(out))
    return out


_EMBEDDERS = (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder"))


def fused_linear(*parts: nn.Linear, swap: bool = False) -> nn.Linear:
    """One Linear whose rows are `parts`' rows in order (`swap`: one part, its two halves swapped)."""
    weight = torch.cat([p.weight for p in parts])
    bias = torch.cat([p.bias for p in parts if p.bias is not None])
    if swap:
        weight, bias = (torch.cat(t.chunk(2)[::-1]) for t in (weight, bias))
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def tree(**children: nn.Module) -> nn.Module:
    node = nn.Module()
    for name, child in children.items():
        node.add_module(name, child)
    return node


def seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def bfl_twin(t: Any) -> nn.Module:
    """The diffusers Flux transformer `t`'s Linear layers under BFL's names and fused shapes (only the layers:
    LyCORIS builds its kohya-named network on this tree; `twin_to_diffusers` copies merged weights back)."""
    twin = tree(img_in=fused_linear(t.x_embedder), txt_in=fused_linear(t.context_embedder))
    for bfl, emb in _EMBEDDERS:
        pair = getattr(t.time_text_embed, emb)
        twin.add_module(bfl, tree(in_layer=fused_linear(pair.linear_1), out_layer=fused_linear(pair.linear_2)))
    modulation = seq(nn.SiLU(), fused_linear(t.norm_out.linear, swap=True))
    twin.final_layer = tree(linear=fused_linear(t.proj_out), adaLN_modulation=modulation)
    twin.double_blocks = nn.ModuleList(
        tree(
            img_mod=tree(lin=fused_linear(b.norm1.linear)),
            txt_mod=tree(lin=fused_linear(b.norm1_context.linear)),
            img_attn=tree(qkv=fused_linear(b.attn.to_q, b.attn.to_k, b.attn.to_v), proj=fused_linear(b.attn.to_out[0])),
            txt_attn=tree(
                qkv=fused_linear(b.attn.add_q_proj, b.attn.add_k_proj, b.attn.add_v_proj),
                proj=fused_linear(b.attn.to_add_out),
            ),
            img_mlp=seq(fused_linear(b.ff.net[0].proj), nn.GELU(), fused_linear(b.ff.net[2])),
            txt_mlp=seq(fused_linear(b.ff_context.net[0].proj), nn.GELU(), fused_linear(b.ff_context.net[2])),
        )  # fmt: skip
        for b in t.transformer_blocks
    )
    twin.single_blocks = nn.ModuleList(
        tree(
            linear1=fused_linear(b.attn.to_q, b.attn.to_k, b.attn.to_v, b.proj_mlp),
            linear2=fused_linear(b.proj_out),
            modulation=tree(lin=fused_linear(b.norm.linear)),
        )  # fmt: skip
        for b in t.single_transformer_blocks
    )
    return twin


def effective_weight(layer: nn.Linear) -> torch.Tensor:
    """`(out, in)`: what the (LyCORIS-wrapped) layer multiplies by, read off its forward on the identity."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer(torch.zeros(1, layer.in_features))).T


def twin_to_diffusers(twin: nn.Module, t: Any) -> None:
    """Copy the twin's effective weights (LyCORIS's deltas merged) into `t`'s layers, unfusing rows as diffusers'
    own Flux conversion does (q / k / v / MLP rows in order; the final modulation's halves swapped back)."""
    pairs: list[tuple[nn.Linear, list[nn.Linear]]] = []
    for bfl, emb in _EMBEDDERS:
        pair = getattr(t.time_text_embed, emb)
        pairs += [(getattr(twin, bfl).in_layer, [pair.linear_1]), (getattr(twin, bfl).out_layer, [pair.linear_2])]
    pairs += [
        (twin.img_in, [t.x_embedder]),
        (twin.txt_in, [t.context_embedder]),
        (twin.final_layer.linear, [t.proj_out]),
    ]
    for d, b in zip(twin.double_blocks, t.transformer_blocks):
        pairs += [(d.img_mod.lin, [b.norm1.linear]), (d.txt_mod.lin, [b.norm1_context.linear])]
        pairs += [(d.img_attn.qkv, [b.attn.to_q, b.attn.to_k, b.attn.to_v]), (d.img_attn.proj, [b.attn.to_out[0]])]
        pairs += [(d.txt_attn.qkv, [b.attn.add_q_proj, b.attn.add_k_proj, b.attn.add_v_proj])]
        pairs += [
            (d.txt_attn.proj, [b.attn.to_add_out]),
            (d.img_mlp[0], [b.ff.net[0].proj]),
            (d.img_mlp[2], [b.ff.net[2]]),
        ]
        pairs += [(d.txt_mlp[0], [b.ff_context.net[0].proj]), (d.txt_mlp[2], [b.ff_context.net[2]])]
    for s, b in zip(twin.single_blocks, t.single_transformer_blocks):
        pairs += [(s.linear1, [b.attn.to_q, b.attn.to_k, b.attn.to_v, b.proj_mlp]), (s.linear2, [b.proj_out])]
        pairs += [(s.modulation.lin, [b.norm.linear])]
    with torch.no_grad():
        for fused, parts in pairs:
            weight = effective_weight(fused)
            for part, rows in zip(parts, weight.split([p.out_features for p in parts])):
                part.weight.copy_(rows)
        modulation = effective_weight(twin.final_layer.adaLN_modulation[1])
        t.norm_out.linear.weight.copy_(torch.cat(modulation.chunk(2)[::-1]))
