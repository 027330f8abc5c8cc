"""Move an adapter off the model (to host memory) and back, without re-reading or re-validating it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import AdapterNotFoundError, UnknownModuleError
from .inject import get_submodule, iter_lokr_layers, wrap_module
from .layer import LoKrAdapter
from .model import AdapterInfo, _check_new_name, delete_adapter, describe_adapter

__all__ = ["OffloadedAdapter", "offload_adapter", "restore_adapter"]


@dataclass
class OffloadedAdapter:
    """An adapter's per-module factors, detached from the model (module path -> factors)."""

    name: str
    modules: dict[str, LoKrAdapter]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.modules.values())


def offload_adapter(
    model: nn.Module, name: str, device: str | torch.device = "cpu", pin_memory: bool = False
) -> OffloadedAdapter:
    """Detach `name` from `model` (as `delete_adapter`) and keep its tensors on `device`.

    `pin_memory=True` (CUDA hosts) makes the way back an asynchronous copy.
    """
    modules = {n: layer.lokr_adapters[name] for n, layer in iter_lokr_layers(model) if name in layer.lokr_adapters}
    if not modules:
        raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
    delete_adapter(model, name)
    kept: dict[str, LoKrAdapter] = {}
    for module_name, adapter in modules.items():
        assert isinstance(adapter, LoKrAdapter)
        adapter.drop_cache()
        adapter.to(device)  # off the bank already: `delete_adapter` gave it its own copy
        if pin_memory:
            adapter.own_storage_(pin_memory=True)  # one pinned buffer: the way back is one asynchronous copy
        kept[module_name] = adapter
    return OffloadedAdapter(name, kept)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        get_submodule(model, name)
    except AttributeError:
        return False
    return True


def restore_adapter(model: nn.Module, offloaded: OffloadedAdapter, name: str | None = None) -> AdapterInfo:
    """Put an offloaded adapter back on `model` (on each base layer's device), as `name` or its own name."""
    name = name or offloaded.name
    _check_new_name(model, name)
    missing = [m for m in offloaded.modules if not _has_module(model, m)]
    if missing:  # checked before anything is attached: a failed restore changes nothing
        raise UnknownModuleError(
            f"cannot restore adapter {name!r}: the model has no module(s) {missing[:5]}"
            f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}; it was offloaded from another model"
        )
    for module_name, adapter in offloaded.modules.items():
        wrap_module(model, module_name).add_adapter(name, adapter)
    return describe_adapter(model, name)
