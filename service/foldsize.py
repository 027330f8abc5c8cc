"""`--fold-cache auto`: how many folded weight copies (`W + dW`) each adapted layer may keep.

A kept copy saves folding an adapter into a weight again on the next step that runs it (`lokr.adapter_batch`'s
`fold`). Every copy costs the adapted weights' bytes, so `auto` keeps as many as a share of the memory left after
the model loaded can hold, estimating one copy as every Linear / Conv weight of the served modules (an adapter that
targets fewer layers costs less), and no more than one step can use:

- a causal LM: 1 (a decode batch whose rows all use one adapter runs on its folded weights; mixed decode steps
  take the factored path and fold nothing), within an eighth of the free memory (the KV cache takes half);
- an image pipeline: one per image of a full batch (`--max-batch-size`: a denoising run keeps its rows' adapters
  for every step, so a batch of distinct adapters folds each once per run, not once per step), within a quarter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["FoldBudget", "adapted_weight_bytes", "fold_copies", "free_bytes"]

log = logging.getLogger("lokr_serve")

_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def fold_copies(
    setting: int | Literal["auto"], served: nn.Module, device: torch.device, *, images: bool, max_batch_size: int
) -> int:
    """`--fold-cache` as a number of copies: `setting` itself, or for `auto` what fits (see the module docstring;
    `served`: the modules adapters attach to, loaded on `device`). Logs the choice."""
    if setting != "auto":
        return int(setting)
    budget = FoldBudget.choose(
        adapted_weight_bytes(served),
        free_bytes(device),
        share=0.25 if images else 0.125,
        most=max_batch_size if images else 1,
    )
    log.info("fold cache: %s", budget.describe())
    return budget.copies


@dataclass(frozen=True)
class FoldBudget:
    """`copies` weight copies per layer, chosen from `copy_bytes` each within `share` of `free` bytes."""

    copies: int
    copy_bytes: int
    free: int
    share: float
    most: int

    @classmethod
    def choose(cls, copy_bytes: int, free: int, *, share: float, most: int) -> FoldBudget:
        """As many copies as fit `share * free` (none when not even one does), at most `most`."""
        fit = int(share * free) // copy_bytes if copy_bytes > 0 else most
        return cls(max(0, min(most, fit)), copy_bytes, free, share, most)

    def describe(self) -> str:
        noun = "copy" if self.copies == 1 else "copies"
        return (
            f"{self.copies} folded weight {noun} per adapted layer (auto: {self.copy_bytes / 2**20:.1f} MiB each, "
            f"at most {self.most}, within {self.share:.3g} of {self.free / 2**30:.1f} GiB free)"
        )


def adapted_weight_bytes(module: nn.Module) -> int:
    """Bytes of every Linear / Conv1d / Conv2d weight under `module`: one folded copy if adapters touch them all."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, _ADAPTABLE))


def free_bytes(device: torch.device) -> int:
    """Memory still available on `device`: free CUDA memory, else the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_available()


def _host_available() -> int:
    """`MemAvailable` from /proc/meminfo (what can be allocated without swapping), else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
