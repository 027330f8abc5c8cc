"""Adapter lifecycle on a model: inject, load, select, delete, save, merge, per-row batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .batch import RowPlan, RowSpec, forget_prepared, selection_scope
from .config import LoKrConfig
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    UnknownModuleError,
    UnsupportedAdapterError,
)
from .export import peft_export
from .formats import (
    DEFAULT_MAX_BYTES,
    ModuleWeights,
    ParsedAdapter,
    lycoris_name_table,
    map_lycoris_stems,
    read_adapter,
    resolve_lycoris_name,
    write_peft_dir,
)
from .functional import LayerSpec
from .init import adapter_dtype, fresh_adapter, new_adapter
from .inject import (
    find_targets,
    freeze_base,
    get_submodule,
    has_adapter,
    iter_lokr_layers,
    lokr_layers,
    model_modules,
    unwrap_module,
    wrap_module,
)
from .keymap import is_pipeline, resolve_pipeline_modules
from .layer import SUPPORTED_LAYERS, LoKrAdapter, LoKrLayer
from .plancache import forget_plan, kept_plan
from .stacked import slot_nbytes
from .validate import validate_all

__all__ = [
    "AdapterInfo",
    "PreparedAttach",
    "adapter_batch",
    "attach_adapter",
    "attach_prepared",
    "delete_adapter",
    "describe_adapter",
    "disable_adapters",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "prepare_attach",
    "refresh",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]


@dataclass
class AdapterInfo:
    """What one loaded adapter holds."""

    name: str
    format: str
    source: str | None
    modules: list[str]
    num_parameters: int
    nbytes: int
    dtype: str
    scales: dict[str, float] = field(default_factory=dict)
    # What the adapter takes where the model lives: its rows in the layers' factor banks, the one copy of its
    # factors (plus one scale element per module). 0 for an adapter that is not attached.
    device_nbytes: int = 0
    stacked_nbytes: int = 0  # a second, stacked copy: there is none any more (kept for API compatibility)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "format": self.format,
            "source": self.source,
            "modules": list(self.modules),
            "num_modules": len(self.modules),
            "num_parameters": self.num_parameters,
            "nbytes": self.nbytes,
            "device_nbytes": self.device_nbytes,
            "stacked_nbytes": self.stacked_nbytes,
            "dtype": self.dtype,
        }


# ------------------------------------------------------------------------------------------ create / load
def inject(model: nn.Module, config: LoKrConfig, adapter_name: str = "default") -> AdapterInfo:
    """Add a freshly initialised adapter (PEFT's shapes, init and RNG order) to every target of `config`, then, as
    PEFT's `get_peft_model`, freeze every parameter that is not an adapter factor (the new adapter trains unless
    `config.inference_mode`). `modules_to_save` is refused before anything changes, as `load_adapter` refuses it."""
    _check_new_name(model, adapter_name)
    if config.modules_to_save:
        raise UnsupportedAdapterError(
            f"LoKrConfig.modules_to_save ({config.modules_to_save}) is not supported: it replaces whole modules per "
            "adapter, which cannot be switched per request; leave modules_to_save unset (train those modules "
            "outside the adapter)"
        )
    for name in find_targets(model, config):
        module = get_submodule(model, name)
        base = module.base_layer if isinstance(module, LoKrLayer) else module
        wrap_module(model, name).add_adapter(adapter_name, fresh_adapter(base, name, config))
    freeze_base(model)
    return describe_adapter(model, adapter_name)


def load_adapter(
    model: nn.Module,
    source: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    dtype: torch.dtype | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> AdapterInfo:
    """Load a PEFT adapter dir or a LyCORIS/kohya `.safetensors` file; validated before anything changes.

    `dtype` None picks PEFT's: each layer's base dtype, float32 for narrower ones (PEFT's adapter autocast), so a
    float64 model gets float64 factors; pass bf16/fp16 to serve adapters at half the memory.
    """
    parsed = read_adapter(source, max_bytes=max_bytes)
    return attach_adapter(model, parsed, adapter_name, dtype=dtype)


@dataclass(frozen=True)
class PreparedAttach:
    """An adapter checked against a model and built per layer (`prepare_attach`), not attached yet."""

    name: str
    adapters: dict[str, LoKrAdapter]  # module name -> its adapter

    @property
    def device_nbytes(self) -> int:
        """Bytes it will take on the model's device once attached (`AdapterInfo.device_nbytes`)."""
        return sum(slot_nbytes(a) for a in self.adapters.values())


def attach_adapter(
    model: nn.Module, parsed: ParsedAdapter, adapter_name: str, *, dtype: torch.dtype | None = None
) -> AdapterInfo:
    """Validate every module of `parsed` against `model`, then attach all of it (or nothing)."""
    return attach_prepared(model, prepare_attach(model, parsed, adapter_name, dtype=dtype))


def prepare_attach(
    model: nn.Module, parsed: ParsedAdapter, adapter_name: str, *, dtype: torch.dtype | None = None
) -> PreparedAttach:
    """Map, validate and build every module of `parsed` for `model`. It reads the model's structure and changes
    nothing, so it may run off the thread that runs forwards and attaches (a server keeps that thread's work short)."""
    _check_new_name(model, adapter_name)
    resolved = _resolve_modules(model, parsed)
    specs = {name: _layer_spec(get_submodule(model, name)) for name in resolved}
    validate_all(parsed.source, ((name, w.tensors, specs[name]) for name, w in resolved.items()))
    adapters: dict[str, LoKrAdapter] = {}
    for name, weights in resolved.items():
        module, spec = get_submodule(model, name), specs[name]
        weights.swapped = parsed.format == "peft" and spec.kind == "conv1d" and "lokr_w2" in weights.tensors
        base_weight: torch.Tensor = module.weight  # type: ignore[assignment]
        target_dtype = dtype or adapter_dtype(base_weight.dtype)
        weights.tensors = {k: _normalise(k, t, spec.kind).to(target_dtype) for k, t in weights.tensors.items()}
        adapters[name] = new_adapter(weights, parsed.config)
        _check_scale(name, adapters[name].scale)
        adapters[name].origin = (parsed.format, parsed.source)
    return PreparedAttach(adapter_name, adapters)


def _layer_spec(module: nn.Module) -> LayerSpec:
    return module.spec if isinstance(module, LoKrLayer) else LayerSpec.from_module(module)


def attach_prepared(model: nn.Module, prepared: PreparedAttach) -> AdapterInfo:
    """Attach what `prepare_attach` built for `model`; refused if its name was taken since."""
    _check_new_name(model, prepared.name)
    for name, adapter in prepared.adapters.items():  # nothing below can fail on valid input
        wrap_module(model, name).add_adapter(prepared.name, adapter)
    return describe_adapter(model, prepared.name)


def _resolve_modules(model: nn.Module, parsed: ParsedAdapter) -> dict[str, ModuleWeights]:
    if is_pipeline(model):  # a diffusers pipeline's components, keyed by component name
        return resolve_pipeline_modules(model, parsed)
    modules = dict(model_modules(model))
    names = {n for n, m in modules.items() if isinstance(m, (*SUPPORTED_LAYERS, LoKrLayer))}
    mapped = map_lycoris_stems(parsed, names) if parsed.format == "lycoris" else {}
    resolved: dict[str, ModuleWeights] = {}
    for key, weights in parsed.modules.items():
        name = key if parsed.format == "peft" else mapped[key]
        if name is None or name not in names:
            raise _target_error(parsed, key, name, modules, names)
        resolved[name] = ModuleWeights(dict(weights.tensors), weights.scale, weights.r, weights.alpha)
    return resolved


def _target_error(
    parsed: ParsedAdapter, key: str, name: str | None, modules: dict[str, nn.Module], names: set[str]
) -> UnknownModuleError:
    """Why `key` has no LoKr-capable target: a module of an unsupported type, or no such module at all."""
    if name is None and parsed.format == "lycoris":  # it may name a module of another type
        name = resolve_lycoris_name(key, lycoris_name_table(modules), set(modules))
    module = modules.get(name) if name is not None else None
    if module is not None:
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        supported = ", ".join(f"torch.nn.{t.__name__}" for t in SUPPORTED_LAYERS)
        return UnknownModuleError(
            f"{parsed.source}: module {key!r} is the model's {name!r}, a {kind}, which cannot carry LoKr; "
            f"supported layer types: {supported}"
        )
    return UnknownModuleError(
        f"{parsed.source}: module {key!r} is not in the base model; the adapter was made for another architecture "
        f"(e.g. the model has {sorted(names)[:3]})"
    )


def _normalise(name: str, t: torch.Tensor, kind: str) -> torch.Tensor:
    """LyCORIS's functional 4-D `w2_b (r, n2, *k)` becomes the module layout `(r, n2*k)`."""
    if name == "lokr_w2_b" and t.dim() > 2:
        return t.reshape(t.shape[0], -1)
    return t


def _check_scale(name: str, scale: float) -> None:
    """Refuse a scale the float32 banks cannot hold (a finite alpha / r can still overflow float32)."""
    if not abs(scale) <= torch.finfo(torch.float32).max:
        raise ConfigError(f"{name}: its scale {scale:g} (alpha / r) is outside float32's range; check the alpha")


# ------------------------------------------------------------------------------------------ select / delete
def list_adapters(model: nn.Module) -> list[str]:
    """Names of every adapter on any layer, in first-seen order."""
    seen: dict[str, None] = {}
    for _, layer in iter_lokr_layers(model):
        seen.update(dict.fromkeys(layer.lokr_adapters))
    return list(seen)


def set_adapter(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Active adapter(s) for plain `model(...)` calls; several are summed; None = base model."""
    if not (names is None or isinstance(names, (str, Sequence))):
        raise ConfigError(f"set_adapter takes an adapter name, a list of names or None; got {names!r}")
    selected = [] if names is None else [names] if isinstance(names, str) else list(names)
    missing = [n for n in selected if not has_adapter(model, n)]
    if missing:
        raise AdapterNotFoundError(f"adapter(s) {missing} not loaded; loaded: {sorted(list_adapters(model))}")
    for _, layer in iter_lokr_layers(model):
        layer.set_active(selected)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove `name` from every layer and unwrap layers left without adapters."""
    layers = [(n, layer) for n, layer in iter_lokr_layers(model) if name in layer.lokr_adapters]
    if not layers:
        raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
    if any(name in layer.merged_adapters for _, layer in layers):
        raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before deleting")
    for module_name, layer in layers:
        layer.remove_adapter(name)
        unwrap_module(model, module_name)
    forget_plan(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model only inside the block (merged adapters are unmerged, as in PEFT)."""
    layers = [layer for _, layer in iter_lokr_layers(model)]
    previous = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_enabled = state


@contextmanager
def adapter_batch(
    model: nn.Module, rows: Sequence[RowSpec], *, tokens: bool = False, fold: int = 0
) -> Iterator[RowPlan]:
    """Inside the block, row `i` of every forward's dim 0 uses `rows[i]`.

    `rows[i]` is None (base), an adapter name, or `[(name, scale), ...]` summed. With `tokens`, the forwards
    take a batch of one packed sequence `(1, T, ...)` and `rows[i]` selects for position `i` of dim 1 (several
    requests' tokens in one row, as a packed continuous-batching step feeds them). Visible only to the calling
    thread / task; gone when the block exits, even on error. Edits made through the adapters' parameters
    (in place, `load_state_dict`, optimiser steps, `scale`) are seen by the next forward, inside the block too,
    except where `fold` runs a kept weight (below); edits through `.data` need `lokr.refresh(model)`.

    `fold` > 0: when one adapter at scale 1 covers every row, each layer runs its op on `W + dW`, folded once
    and kept for the `fold` adapters used so most recently (a copy of each adapted weight per adapter kept),
    so a batch of one adapter costs the base model's forward. That weight is taken as the block opens: edits
    made inside the block are seen from the next block on, or after `lokr.refresh(model)`. A layer that folds
    the `S` row selections of a mixed batch (the cost model's choice: convs over images, long prompts) keeps them
    too when `S <= fold`, so the next block with the same selections folds nothing (those are checked per forward:
    edits are seen). `fold` counts weight copies per layer; 0 keeps none.
    """
    layers = lokr_layers(model)
    if any(layer.merged for layer in layers):
        raise AdapterStateError("per-row adapter selection needs unmerged adapters; call unmerge_adapter first")
    with (
        kept_plan(model, rows, tokens=tokens, fold=fold) as plan,  # the last block's, when its rows were the same
        selection_scope(layers, plan, lambda name: any(name in layer.lokr_adapters for layer in layers)) as scoped,
    ):
        if plan.groups:  # base rows only: every layer runs its base op, nothing to prepare
            for layer in layers:
                layer.prepare_rows(scoped)
        yield scoped


def refresh(model: nn.Module) -> None:
    """Make the next forwards read every adapter's parameters as they are now.

    Needed after edits that bypass PyTorch's version counters (`p.data.mul_(...)`, `p.data.copy_(...)`,
    `p.data = t`), which kept results (dense deltas, folded weights) and the factor banks do not notice; and, inside
    an open `adapter_batch` with `fold` > 0, after any edit. Open blocks of the calling thread prepare again.
    """
    layers = lokr_layers(model)
    for layer in layers:
        layer.refresh()
    forget_prepared(layers)
    forget_plan(model)


# ------------------------------------------------------------------------------------------ merge / save
def merge_adapter(model: nn.Module, name: str | Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Merge `name` (default: the active adapters) into the base weights."""
    names = None if name is None else [name] if isinstance(name, str) else list(name)
    if names is not None:
        missing = [n for n in names if not has_adapter(model, n)]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) {missing} not loaded")
    layers = [layer for _, layer in iter_lokr_layers(model)]
    if safe_merge:  # check every layer first, so that a broken adapter leaves the model untouched
        for layer in layers:
            layer.check_merge(names)
    for layer in layers:
        layer.merge(names)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo every merge (last merged first)."""
    for _, layer in iter_lokr_layers(model):
        if layer.merged:
            layer.unmerge()


def save_adapter(model: nn.Module, name: str, out_dir: str | os.PathLike[str]) -> None:
    """Write `name` as a PEFT LoKr adapter dir that `peft.PeftModel.from_pretrained` loads."""
    layers = {n: layer._adapter(name) for n, layer in iter_lokr_layers(model) if name in layer.lokr_adapters}
    if not layers:
        raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
    specs = {n: layer.spec for n, layer in iter_lokr_layers(model) if n in layers}
    tensors, config = peft_export(layers, specs)
    write_peft_dir(out_dir, tensors, config)


# ------------------------------------------------------------------------------------------ helpers
def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
    if has_adapter(model, name):
        raise AdapterExistsError(f"adapter {name!r} is already loaded; delete it first or pick another name")


def describe_adapter(model: nn.Module, name: str) -> AdapterInfo:
    """An `AdapterInfo` for an adapter already on `model`."""
    adapters = {n: layer._adapter(name) for n, layer in iter_lokr_layers(model) if name in layer.lokr_adapters}
    if not adapters:
        raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
    fmt, source = next(iter(adapters.values())).origin
    params = [p for a in adapters.values() for p in a.parameters()]
    dtype = str(params[0].dtype).removeprefix("torch.") if params else "float32"
    return AdapterInfo(
        name=name,
        format=fmt,
        source=source,
        modules=list(adapters),
        num_parameters=sum(p.numel() for p in params),
        nbytes=sum(a.nbytes for a in adapters.values()),
        dtype=dtype,
        scales={n: a.scale for n, a in adapters.items()},
        device_nbytes=sum(slot_nbytes(a) for a in adapters.values()),
    )
