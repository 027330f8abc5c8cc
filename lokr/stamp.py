"""Stamps: what a kept result (kron operands, folded weights) was made from, compared with `==` to reuse it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["Same", "Stamp", "versions_of"]

Stamp = tuple[object, ...]  # e.g. `FactorBank.stamp`


class Same:
    """A stamp part equal only to another for the very same object (tensors' own `==` is elementwise)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def versions_of(tensors: Iterable[Tensor]) -> list[int] | None:
    """The tensors' version counters (they move with every in-place write); None if one keeps none -- an inference
    tensor, or a parameter made under inference mode even once it views ordinary storage: a result made from
    it cannot be known to be current, so it is not kept."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return None
