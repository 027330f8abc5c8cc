"""One exception tree for the `lokr` package.

    LoKrError
    ├── ConfigError (also ValueError)        invalid LoKrConfig values, adapter_config.json or arguments
    ├── AdapterFormatError (also ValueError) a file that is not a readable LoKr adapter
    │   ├── UnsupportedAdapterError          a real adapter of a kind we do not serve (LoRA, DoRA, pickle)
    │   ├── MissingKeysError                 tensors the structure needs are absent
    │   ├── UnexpectedKeysError              tensors that belong to no LoKr factor
    │   └── NonFiniteError                   NaN / Inf values
    ├── TargetError (also ValueError)        the adapter does not fit the base model
    │   ├── UnknownModuleError               a module path the model lacks
    │   ├── UnsupportedLayerError (TypeError) a module type LoKr cannot wrap
    │   └── ShapeMismatchError               factor shapes do not multiply to the base weight shape
    ├── AdapterNotFoundError (also KeyError) no adapter of that name
    ├── AdapterExistsError                   an adapter of that name is already present
    ├── RowCountError (also ValueError)      adapter_batch rows that do not match a forward's input
    └── AdapterStateError (also RuntimeError) an operation not allowed in the current state (merged, ...)

Every message names the module or file and says what was expected.
"""

from __future__ import annotations

__all__ = [
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "ConfigError",
    "LoKrError",
    "MissingKeysError",
    "NonFiniteError",
    "RowCountError",
    "ShapeMismatchError",
    "TargetError",
    "UnexpectedKeysError",
    "UnknownModuleError",
    "UnsupportedAdapterError",
    "UnsupportedLayerError",
]


class LoKrError(Exception):
    """Base class of every error raised on purpose by `lokr`."""


class ConfigError(LoKrError, ValueError):
    """A configuration value or an argument (adapter name, row selection) is invalid."""


class AdapterFormatError(LoKrError, ValueError):
    """An adapter file or directory cannot be read as a LoKr adapter."""


class UnsupportedAdapterError(AdapterFormatError):
    """The input is an adapter of a kind this library does not serve (LoRA, DoRA, pickle...)."""


class MissingKeysError(AdapterFormatError):
    """Tensors needed by a module's LoKr structure are missing."""


class UnexpectedKeysError(AdapterFormatError):
    """Tensors that are not part of any LoKr factor."""


class NonFiniteError(AdapterFormatError):
    """A tensor holds NaN or Inf."""


class TargetError(LoKrError, ValueError):
    """The adapter does not fit the base model."""


class UnknownModuleError(TargetError):
    """The adapter names a module the base model does not have."""


class UnsupportedLayerError(TargetError, TypeError):
    """The target module's type cannot carry a LoKr adapter."""


class ShapeMismatchError(TargetError):
    """Factor shapes do not reproduce the base layer's weight shape."""


class AdapterNotFoundError(LoKrError, KeyError):
    """No adapter with this name is present."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExistsError(LoKrError):
    """An adapter with this name is already present."""


class RowCountError(LoKrError, ValueError):
    """An `adapter_batch` gave a different number of row selections than a forward's input has rows."""


class AdapterStateError(LoKrError, RuntimeError):
    """The operation is not allowed in the adapter's current state."""
