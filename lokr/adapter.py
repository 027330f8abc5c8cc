"""One adapter's LoKr factors on one layer: PEFT's parameter names, its settings, and its storage (a row of the
layer's factor bank while attached)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .functional import FACTOR_NAMES, Factors, LayerSpec, delta_weight

if TYPE_CHECKING:
    from .stacked import LayerBanks

__all__ = ["LoKrAdapter"]


class LoKrAdapter(nn.Module):
    """One adapter's factors on one layer (parameters named as PEFT's, `lokr_w1`...) and its settings."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        r: int,
        alpha: float,
        scale: float | None = None,
        swapped: bool = False,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
    ) -> None:
        super().__init__()
        for name in FACTOR_NAMES:
            if name in tensors:
                self.register_parameter(name, nn.Parameter(tensors[name], requires_grad=False))
        self.r, self.alpha = r, alpha
        self.scale = alpha / r if scale is None else scale
        self.swapped = swapped
        self.rank_dropout, self.module_dropout, self.rank_dropout_scale = (
            rank_dropout,
            module_dropout,
            rank_dropout_scale,
        )
        self._dense: tuple[tuple[Any, ...], Tensor] | None = None
        self.origin: tuple[str, str | None] = ("peft", None)  # (format, source) it was read from

    # While attached, the factors are views of the adapter's row in its layer's factor bank (`_home`): one copy.
    _home: tuple[LayerBanks, str] | None = None
    _scale: float

    def _set_home(self, home: tuple[LayerBanks, str] | None) -> None:
        self.__dict__["_home"] = home
        self._dense = None

    @property
    def scale(self) -> float:
        return self.__dict__["_scale"]

    @scale.setter
    def scale(self, value: float) -> None:
        self.__dict__["_scale"] = float(value)
        if self._home is not None:  # the bank row keeps the scale beside the factors
            self._home[0].set_scale(self._home[1], float(value))

    def factors(self) -> Factors:
        """The current factor tensors (read from `_parameters` directly: this runs per layer per step)."""
        params = self._parameters
        short = {name[len("lokr_") :]: params[name] for name in FACTOR_NAMES if name in params}
        return Factors(**short, swapped=self.swapped)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._parameters.values())).dtype  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def own_storage_(self, pin_memory: bool = False) -> None:
        """Re-home the factors (detached from any bank) as views of one buffer of their own, pinned if asked:
        an offloaded adapter then comes back with one (asynchronous) copy."""
        params = [(name, p) for name, p in self._parameters.items() if p is not None]
        if len({(p.dtype, p.device) for _, p in params}) != 1:
            return
        first = params[0][1]
        buffer = torch.empty(
            sum(p.numel() for _, p in params), dtype=first.dtype, device=first.device, pin_memory=pin_memory
        )
        offset = 0
        with torch.no_grad():
            for _, p in params:
                view = buffer[offset : offset + p.numel()].view(p.shape)
                view.copy_(p)
                p.data = view
                offset += p.numel()

    # Whatever gives the factors other storage (a replaced parameter, a move or a cast) re-homes them.
    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if self._home is not None:
            self._home[0].rehome(self._home[1])

    def _apply(self, fn: Any, recurse: bool = True) -> LoKrAdapter:
        super()._apply(fn, recurse)
        if self._home is not None:
            self._home[0].rehome(self._home[1])
        return self

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the bank behind
        state = self.__dict__.copy()
        state.pop("_home", None)
        state["_dense"] = None
        return state

    def cached_delta(self, spec: LayerSpec) -> Tensor:
        """Dense `dW`, rebuilt whenever a factor, the scale, the device or the dtype changed."""
        params = [p for p in self._parameters.values() if p is not None]  # each view has its own version counter
        first = params[0]
        key = (self.scale, first.data_ptr(), tuple(p._version for p in params), first.dtype, first.device)
        if self._dense is None or self._dense[0] != key:
            with torch.no_grad():
                self._dense = (key, delta_weight(self.factors(), spec, self.scale))
        return self._dense[1]

    def drop_cache(self) -> None:
        self._dense = None

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in FACTOR_NAMES if hasattr(self, n))
        return f"{shapes}, scale={self.scale:g}"
