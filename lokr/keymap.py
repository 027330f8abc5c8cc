"""Adapter keys onto a diffusers pipeline: one `nn.ModuleDict` keyed by component name.

The container holds the pipeline's denoiser ("unet" or "transformer") and text encoders ("text_encoder",
"text_encoder_2", "text_encoder_3"), so its module names read `unet.down_blocks.0.attentions.0.proj_in`.
One file may hold keys for several components; it loads as one adapter across them, or not at all.

Accepted key stems (LyCORIS / kohya files):
    lora_unet_*, lora_transformer_*, lycoris_* (SimpleTuner)  -> the denoiser
    lora_te_*, lora_te1_*                                     -> text_encoder
    lora_te2_*                                                -> text_encoder_2
    lora_te3_*                                                -> text_encoder_3 (Flux: its T5, text_encoder_2;
                                                                 Chroma: its only encoder, text_encoder)
    <component>.<dotted path>                                 -> that component
    diffusion_model.<dotted path>, <dotted path>              -> the denoiser
Denoiser paths may use diffusers' names or the original LDM / SGM layout (`input_blocks_4_1_...`, see
`sdxl_names`), or on a Flux transformer BFL's layout (`double_blocks_0_img_attn_proj`; fused layers such as
`..._img_attn_qkv` split into diffusers' layers where the factors allow it, see `flux_names`), or on an SD3
transformer SAI's MMDiT layout (`joint_blocks_0_x_block_attn_qkv`, likewise, see `sd3_names`); text-encoder paths
may include `text_model` or not (transformers 4 vs 5 CLIPTextModel).
PEFT directories hold paths relative to the denoiser (or prefixed with a component name).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeGuard

from torch import nn

from .errors import TargetError, UnexpectedKeysError, UnknownModuleError
from .flux_names import fused_rows, original_flux_names, split_rows
from .formats import ModuleWeights, ParsedAdapter
from .inject import model_modules
from .layer import SUPPORTED_LAYERS, LoKrLayer
from .sd3_names import original_sd3_names, sd3_fused_rows
from .sdxl_names import original_unet_names

__all__ = ["COMPONENTS", "DENOISERS", "TEXT_ENCODERS", "is_pipeline", "pipeline_modules", "resolve_pipeline_modules"]

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENTS = DENOISERS + TEXT_ENCODERS
# key prefix -> component role ("denoiser", a text encoder name, or "te3")
_PREFIXES = {
    "lora_unet_": "denoiser",
    "lora_transformer_": "denoiser",
    "lycoris_": "denoiser",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "te3",
}
_DENOISER_DOTTED = ("model.diffusion_model.", "diffusion_model.")
_TEXT_MODEL = "text_model."


def is_pipeline(model: nn.Module) -> TypeGuard[nn.ModuleDict]:
    """True for a pipeline container: a ModuleDict holding a denoiser or text encoder by component name."""
    return isinstance(model, nn.ModuleDict) and any(name in model for name in COMPONENTS)


def pipeline_modules(pipe: object) -> nn.ModuleDict:
    """The adapter target of a diffusers pipeline: its denoiser and text encoders, not copied."""
    found = {name: getattr(pipe, name, None) for name in COMPONENTS}
    parts = {name: module for name, module in found.items() if isinstance(module, nn.Module)}
    if not parts:
        raise TargetError(f"{type(pipe).__name__} has none of the components {list(COMPONENTS)}")
    return nn.ModuleDict(parts)


@dataclass
class _Component:
    """One component's adapter-capable layers under every name a file may use for them."""

    name: str
    dotted: dict[str, str] = field(default_factory=dict)  # alias (dotted, relative) -> container name
    flat: dict[str, str | None] = field(default_factory=dict)  # alias with "_" -> name; None if ambiguous

    def add(self, alias: str, full: str) -> None:
        self.dotted.setdefault(alias, full)
        flat = alias.replace(".", "_")
        self.flat[flat] = None if self.flat.get(flat, full) != full else full

    def lookup(self, path: str) -> str | None:
        return self.dotted.get(path) or self.flat.get(path.replace(".", "_"))


def _aliases(container: nn.ModuleDict, component: str, relative: list[str]) -> Iterable[tuple[str, str]]:
    """(alias, relative name) pairs besides the names themselves."""
    if component in DENOISERS:
        originals = original_unet_names(container[component], relative)
        originals.update(original_flux_names(container[component], relative))
        originals.update(original_sd3_names(container[component], relative))
        for name, original in originals.items():
            yield original, name
    elif component in TEXT_ENCODERS:  # CLIPTextModel lost its `text_model` level in transformers 5
        for name in relative:
            yield (name.removeprefix(_TEXT_MODEL) if name.startswith(_TEXT_MODEL) else _TEXT_MODEL + name), name


def _components(container: nn.ModuleDict) -> dict[str, _Component]:
    layers: dict[str, list[str]] = {name: [] for name in container if name in COMPONENTS}
    for name, module in model_modules(container):
        head, _, rest = name.partition(".")
        if head in layers and rest and isinstance(module, (*SUPPORTED_LAYERS, LoKrLayer)):
            layers[head].append(rest)
    tables = {}
    for component, relative in layers.items():
        table = tables[component] = _Component(component)
        for name in relative:
            table.add(name, f"{component}.{name}")
        for alias, name in _aliases(container, component, relative):
            table.add(alias, f"{component}.{name}")
    return tables


def _denoiser(tables: dict[str, _Component]) -> str | None:
    return next((name for name in DENOISERS if name in tables), None)


def _target(stem: str, tables: dict[str, _Component]) -> tuple[str | None, str]:
    """(component the stem is for, path inside it) for a LyCORIS stem; None when the prefix is unknown."""
    for prefix, role in _PREFIXES.items():
        if stem.startswith(prefix):
            rest = stem[len(prefix) :]
            if role == "denoiser":
                return _denoiser(tables) or "unet", rest
            if role == "te3":
                return _t5_component(tables), rest
            return role, rest
    head, _, rest = stem.partition(".")
    if head in COMPONENTS:
        return head, rest
    for prefix in _DENOISER_DOTTED:
        if stem.startswith(prefix):
            return _denoiser(tables) or "unet", stem[len(prefix) :]
    return ((_denoiser(tables) or "unet") if "." in stem else None), stem


def _t5_component(tables: dict[str, _Component]) -> str:
    """Where kohya's T5 keys (`lora_te3_`) go: SD3's third encoder; a DiT pipeline without one keeps its T5 as
    `text_encoder_2` (Flux, beside CLIP) or as its only `text_encoder` (Chroma)."""
    if "text_encoder_3" in tables or _denoiser(tables) != "transformer":
        return "text_encoder_3"
    return "text_encoder_2" if "text_encoder_2" in tables else "text_encoder"


def _resolve_key(key: str, fmt: str, tables: dict[str, _Component]) -> tuple[str | None, str]:
    """(container module name or None, why not)."""
    if fmt == "peft":  # paths relative to the denoiser, or already prefixed with a component
        head, _, rest = key.partition(".")
        component, path = (head, rest) if head in tables and rest else (_denoiser(tables) or "unet", key)
    else:
        found, path = _target(key, tables)
        if found is None:
            return None, f"no known prefix ({', '.join(_PREFIXES)}, or a dotted module path)"
        component = found
    if component not in tables:
        return None, f"this pipeline has no {component}"
    name = tables[component].dotted.get(path) if fmt == "peft" else tables[component].lookup(path)
    return name, f"no such layer in {component}"


def _fused(
    container: nn.ModuleDict, parsed: ParsedAdapter, key: str, tables: dict[str, _Component]
) -> dict[str, ModuleWeights] | None:
    """`{container name: weights}` for a fused layer of BFL's Flux or SAI's SD3 layout (split by rows); None for
    other keys."""
    if parsed.format == "peft":
        return None
    component, path = _target(key, tables)
    if component not in DENOISERS or component not in container:
        return None
    rows = fused_rows(container[component], path) or sd3_fused_rows(container[component], path)
    if rows is None:
        return None
    w = parsed.modules[key]
    parts = split_rows(f"{parsed.source}: {key}", dict(w.tensors), rows)
    return {f"{component}.{name}": ModuleWeights(t, w.scale, w.r, w.alpha) for name, t in parts.items()}


def resolve_pipeline_modules(container: nn.ModuleDict, parsed: ParsedAdapter) -> dict[str, ModuleWeights]:
    """`{container module name: weights}` for every module of `parsed`; refuses unknown and duplicate keys."""
    tables = _components(container)
    resolved: dict[str, str] = {}
    split: dict[str, tuple[str, ModuleWeights]] = {}  # container name -> (fused key, its part's weights)
    unknown: list[str] = []
    for key in parsed.modules:
        parts = _fused(container, parsed, key, tables)
        if parts is not None:
            split.update({name: (key, weights) for name, weights in parts.items()})
            continue
        name, why = _resolve_key(key, parsed.format, tables)
        if name is None:
            unknown.append(f"{key!r} ({why})")
        else:
            resolved[key] = name
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UnknownModuleError(
            f"{parsed.source}: {len(unknown)} key(s) name no Linear/Conv1d/Conv2d layer of this pipeline "
            f"(components: {', '.join(tables)}): {shown}; was the adapter made for another model?"
        )
    seen: dict[str, str] = {name: key for name, (key, _) in split.items()}
    for key, name in resolved.items():
        if name in seen:
            raise UnexpectedKeysError(
                f"{parsed.source}: keys {seen[name]!r} and {key!r} both name module {name!r}; "
                "a file must hold one set of factors per module"
            )
        seen[name] = key
    out = {
        resolved[key]: ModuleWeights(dict(w.tensors), w.scale, w.r, w.alpha)
        for key, w in parsed.modules.items()
        if key in resolved
    }
    out.update({name: weights for name, (_, weights) in split.items()})
    return out
