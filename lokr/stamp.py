"""Stamps: what a kept result (kron operands, folded weights) was made from, compared with `==` to reuse it."""

from __future__ import annotations

__all__ = ["Same", "Stamp"]

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
