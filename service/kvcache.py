"""KV-cache surgery for continuous batching: merge two left-padded batches, trim, select rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["can_merge", "merge_caches", "pad_left", "trim_left"]


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def can_merge(cache: Any) -> bool:
    """Only plain (non-sliding, non-offloaded) dynamic layers can be padded and concatenated."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    """Prepend `width` zeros along `dim`."""
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_caches(a: Any, mask_a: Tensor, b: Any, mask_b: Tensor) -> tuple[Any, Tensor]:
    """Rows of `b` appended after rows of `a`; the shorter side is left-padded (masked out). Mutates `a`."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = length - mask_a.shape[1], length - mask_b.shape[1]
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        la.keys = torch.cat([pad_left(la.keys, pad_a, 2), pad_left(lb.keys, pad_b, 2)], dim=0)
        la.values = torch.cat([pad_left(la.values, pad_a, 2), pad_left(lb.values, pad_b, 2)], dim=0)
    mask = torch.cat([pad_left(mask_a, pad_a, 1), pad_left(mask_b, pad_b, 1)], dim=0)
    return a, mask


def trim_left(cache: Any, mask: Tensor) -> Tensor:
    """Drop leading columns that every row masks out (left by rows that finished); returns the new mask."""
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else 0
    if start == 0:
        return mask
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    return mask[:, start:]
