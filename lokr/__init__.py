"""lokr: PEFT-exact LoKr adapters with a factored, multi-adapter unmerged forward (pure PyTorch)."""

from .config import LoKrConfig
from .errors import (
    AdapterExistsError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    LoKrError,
    MissingKeysError,
    NonFiniteError,
    ShapeMismatchError,
    TargetError,
    UnexpectedKeysError,
    UnknownModuleError,
    UnsupportedAdapterError,
    UnsupportedLayerError,
)
from .formats import ParsedAdapter, read_adapter
from .functional import factorization, make_kron, make_weight_cp
from .inject import lokr_layers
from .keymap import pipeline_modules
from .layer import LoKrAdapter, LoKrLayer
from .model import (
    AdapterInfo,
    adapter_batch,
    attach_adapter,
    delete_adapter,
    describe_adapter,
    disable_adapters,
    inject,
    list_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
    unmerge_adapter,
)
from .offload import OffloadedAdapter, offload_adapter, restore_adapter

__all__ = [
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterInfo",
    "AdapterNotFoundError",
    "AdapterStateError",
    "ConfigError",
    "LoKrAdapter",
    "LoKrConfig",
    "LoKrError",
    "LoKrLayer",
    "MissingKeysError",
    "NonFiniteError",
    "OffloadedAdapter",
    "ParsedAdapter",
    "ShapeMismatchError",
    "TargetError",
    "UnexpectedKeysError",
    "UnknownModuleError",
    "UnsupportedAdapterError",
    "UnsupportedLayerError",
    "adapter_batch",
    "attach_adapter",
    "delete_adapter",
    "describe_adapter",
    "disable_adapters",
    "factorization",
    "inject",
    "list_adapters",
    "load_adapter",
    "lokr_layers",
    "make_kron",
    "make_weight_cp",
    "merge_adapter",
    "offload_adapter",
    "pipeline_modules",
    "read_adapter",
    "restore_adapter",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
