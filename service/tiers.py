"""Memory-tier policy as pure functions: budgets and which adapters leave a tier (least recently used first).

The registry describes each adapter in a tier as a `Slot` and applies the answer; nothing here locks,
reads files or touches the model, so the policy is testable alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Budget", "Slot", "TierLimits", "pick_victims"]


@dataclass(frozen=True)
class TierLimits:
    """Budgets; 0 bytes means no byte limit."""

    device_adapters: int = 128
    device_bytes: int = 0
    host_adapters: int = 512
    host_bytes: int = 0

    @property
    def device(self) -> Budget:
        return Budget(self.device_adapters, self.device_bytes)

    @property
    def host(self) -> Budget:
        return Budget(self.host_adapters, self.host_bytes)


@dataclass(frozen=True)
class Budget:
    """How many adapters, and how many bytes of them (0 = any), one tier may hold."""

    adapters: int
    nbytes: int = 0

    def fits(self, count: int, nbytes: int) -> bool:
        return count <= self.adapters and not (0 < self.nbytes < nbytes)


@dataclass(frozen=True)
class Slot:
    """One adapter as the policy sees it: its bytes in the tier, when it was last used, and whether it may
    leave now (not leased, not being unloaded, not mid-move)."""

    name: str
    nbytes: int
    last_used: int
    movable: bool


def pick_victims(slots: Sequence[Slot], budget: Budget) -> list[str]:
    """The names to move out (least recently used first) until the rest fits `budget`.

    Unmovable slots stay and still count; if they alone exceed the budget, every movable slot leaves and
    the tier stays over budget until they become movable.
    """
    count, nbytes = len(slots), sum(s.nbytes for s in slots)
    victims: list[str] = []
    for slot in sorted((s for s in slots if s.movable), key=lambda s: s.last_used):
        if budget.fits(count, nbytes):
            break
        victims.append(slot.name)
        count, nbytes = count - 1, nbytes - slot.nbytes
    return victims
