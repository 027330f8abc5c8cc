"""Target matching (PEFT's rules) and module swapping."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import LoKrConfig
from .errors import ConfigError, UnsupportedLayerError
from .functional import LayerSpec, factorization
from .layer import SUPPORTED_LAYERS, LoKrLayer

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "find_targets",
    "freeze_base",
    "get_submodule",
    "has_adapter",
    "iter_lokr_layers",
    "layout_epoch",
    "lokr_layers",
    "matches_target",
    "model_modules",
    "parameter_shapes",
    "wrap_module",
]

# PEFT's defaults when `target_modules` is None (its LoRA map, reused for LoKr), for common causal LMs.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}


def model_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """`named_modules` order, but a LoKr wrapper stands for its base layer and its insides are not walked.

    So a walk costs O(base modules) however many adapters (each a submodule per layer) are loaded.
    """
    yield prefix, model
    if isinstance(model, LoKrLayer):
        return
    for name, child in model._modules.items():
        if child is not None:
            yield from model_modules(child, f"{prefix}.{name}" if prefix else name)


def iter_lokr_layers(model: nn.Module) -> Iterator[tuple[str, LoKrLayer]]:
    """`(dotted name, layer)` for every LoKr wrapper in `model`."""
    for name, module in model_modules(model):
        if isinstance(module, LoKrLayer):
            yield name, module


class _Layout:
    """Bumped whenever lokr wraps or unwraps a module of any model; cached layer lists then rebuild."""

    epoch = 0


def layout_epoch() -> int:
    """Changes whenever lokr wraps or unwraps a module of any model."""
    return _Layout.epoch


def lokr_layers(model: nn.Module) -> tuple[LoKrLayer, ...]:
    """The LoKr wrappers of `model` in module order, cached on the model until lokr next wraps or unwraps a
    module (so per-step callers do not walk the module tree; modules swapped in by hand are not seen)."""
    cached = model.__dict__.get("_lokr_layer_cache")
    if cached is not None and cached[0] == _Layout.epoch:
        return cached[1]
    layers = tuple(layer for _, layer in iter_lokr_layers(model))
    model.__dict__["_lokr_layer_cache"] = (_Layout.epoch, layers)
    return layers


def has_adapter(model: nn.Module, name: str) -> bool:
    """True if any layer of `model` holds adapter `name` (stops at the first hit)."""
    return any(name in layer.lokr_adapters for _, layer in iter_lokr_layers(model))


def _layer_index_ok(config: LoKrConfig, key: str) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _name_matches(spec: str | set[str], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{target}") for target in spec)


def matches_target(config: LoKrConfig, key: str, targets: str | set[str]) -> bool:
    """PEFT's `check_target_module_exists` for LoKr (exclusions, modules_to_save, layer indexes)."""
    if config.exclude_modules and _name_matches(config.exclude_modules, key):  # type: ignore[arg-type]
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if not _name_matches(targets, key):
        return False
    if isinstance(targets, str):
        return True  # PEFT applies layers_to_transform only to list targets
    return key in targets or _layer_index_ok(config, key)


def _resolve_targets(model: nn.Module, config: LoKrConfig) -> str | set[str]:
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        getter = getattr(model, "get_output_embeddings", None)
        output = getter() if callable(getter) else None
        return {
            name
            for name, module in model_modules(model)
            if isinstance(module, (nn.Linear, LoKrLayer))
            and (not isinstance(module, LoKrLayer) or module.spec.kind == "linear")
            and module is not output
            and not (isinstance(output, LoKrLayer) and module is output)
        }
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ConfigError(
                f"`target_modules` is not set and there is no default for model type {model_type!r}; "
                "set target_modules to a list of module names or a regex"
            )
        return set(DEFAULT_TARGET_MODULES[model_type])
    return targets if isinstance(targets, str) else set(targets)


def find_targets(model: nn.Module, config: LoKrConfig) -> list[str]:
    """Dotted names of the modules `config` targets, in `named_modules` order. Raises when none match."""
    targets = _resolve_targets(model, config)
    names = [name for name, _ in model_modules(model) if name and matches_target(config, name, targets)]
    if not names:
        raise ConfigError(
            f"Target modules {config.target_modules!r} not found in the base model. "
            "Please check the target modules and try again."
        )
    for name in names:
        module = get_submodule(model, name)
        base = module.base_layer if isinstance(module, LoKrLayer) else module
        if not isinstance(base, SUPPORTED_LAYERS):
            raise UnsupportedLayerError(
                f"Target module {name!r} of type {type(base).__name__} is not supported: "
                "LoKr adapters exist for Linear, Conv1d and Conv2d only"
            )
    return names


def freeze_base(model: nn.Module) -> None:
    """PEFT's `_mark_only_adapters_as_trainable` for LoKr (no `bias` option: PEFT's "none"): every parameter that
    is not an adapter factor of a LoKr layer stops requiring grad; adapter factors keep their setting."""
    factors = {id(p) for layer in lokr_layers(model) for p in layer.lokr_adapters.parameters()}
    for p in model.parameters():
        if id(p) not in factors:
            p.requires_grad_(False)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def wrap_module(model: nn.Module, name: str) -> LoKrLayer:
    """Replace `model.<name>` by a `LoKrLayer` around it (no-op if already wrapped)."""
    module = get_submodule(model, name)
    if isinstance(module, LoKrLayer):
        return module
    if not isinstance(module, SUPPORTED_LAYERS):
        raise UnsupportedLayerError(f"module {name!r} is a {type(module).__name__}; LoKr wraps Linear/Conv1d/Conv2d")
    parent_name, _, child = name.rpartition(".")
    wrapper = LoKrLayer(module)
    wrapper.train(module.training)  # a fresh nn.Module is in training mode; keep the model's eval mode
    setattr(get_submodule(model, parent_name), child, wrapper)
    _Layout.epoch += 1
    return wrapper


def unwrap_module(model: nn.Module, name: str) -> None:
    """Put the base layer back in place of an adapter-less wrapper."""
    module = get_submodule(model, name)
    if isinstance(module, LoKrLayer) and not module.lokr_adapters:
        parent_name, _, child = name.rpartition(".")
        setattr(get_submodule(model, parent_name), child, module.base_layer)
        _Layout.epoch += 1


def parameter_shapes(spec: LayerSpec, config: LoKrConfig, r: int) -> dict[str, tuple[int, ...]]:
    """Factor shapes PEFT creates for a layer (`update_layer` / `create_adapter_parameters`)."""
    f = config.decompose_factor
    in_m, in_n = factorization(spec.in_features, f)
    out_l, out_k = factorization(spec.out_features, f)
    use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = r >= max(out_k, in_n) / 2
    kernel = spec.kernel
    effective = config.use_effective_conv2d and spec.kind != "linear" and any(k != 1 for k in kernel)
    shapes: dict[str, tuple[int, ...]] = {}
    if use_w1:
        shapes["lokr_w1"] = (out_l, in_m)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, r), (r, in_m)
    if use_w2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    elif effective:
        t2_kernel = kernel if spec.kind == "conv2d" else (*kernel, 1)
        shapes["lokr_t2"], shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (
            (r, r, *t2_kernel),
            (r, out_k),
            (r, in_n),
        )
    else:
        k = spec.kernel_numel
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, r), (r, in_n * k)
    return shapes


def empty_parameters(shapes: dict[str, tuple[int, ...]], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Uninitialised float32 tensors on `like`'s device (PEFT creates fp32 then moves)."""
    return {name: torch.empty(shape, device=like.device) for name, shape in shapes.items()}
