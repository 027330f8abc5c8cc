"""Packed steps: every decoding row's next token and the step's prompt chunks in one sequence (batch 1, `T`
tokens), so one forward per step reads the weights once and a long prompt's chunk rides along with the decode
tokens (chunked prefill without a second forward).

Keys and values stay in the slot cache (`SlotCache`): a packed forward writes each token's K/V at its own
`(slot, position)` and the attention registered here (`lokr_slots`, in transformers' `AttentionInterface`)
reads them back per segment: the decoding rows together (a view of slots `0..n-1`, a length mask), then each
prompt chunk over its own slot (causal from the chunk's start). Forwards without a packed step (a row batch)
go to transformers' SDPA attention and masks unchanged. Adapters select per token (`lokr.adapter_batch(tokens=True)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ATTENTION", "Chunk", "PackedStep", "PackedUnsupportedError", "enable_packed"]

log = logging.getLogger("lokr_serve.engine")

ATTENTION = "lokr_slots"
STEP_KWARG = "lokr_step"
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")  # attention extras the segments do not apply


class PackedUnsupportedError(RuntimeError):
    """The model's attention needs something a packed step does not do (the runner then batches rows)."""


@dataclass(frozen=True)
class Chunk:
    """`width` prompt tokens of the row in `slot`, at positions `start..start+width-1`, packed from token `first`."""

    first: int
    slot: int
    start: int
    width: int


@dataclass
class PackedStep:
    """One packed forward over a `SlotCache` (`cache` is Any: the cache module imports this one).

    Tokens `0..decode-1` are the decoding rows (token i: slot i, attending to `decode_keys[i]` keys); `chunks`
    follow. The decoding rows attend together over the first `decode_span` keys of their slots, except the
    `(row, keys)` in `decode_long`, which attend alone over their own keys (see `split_decode`).
    `slots (T,)` and `positions (T,)` say where each token's keys go. `windows[layer]` is the
    sliding window of that layer (None: full attention).
    """

    cache: Any
    decode: int
    decode_keys: Tensor
    decode_span: int
    decode_long: tuple[tuple[int, int], ...]
    chunks: tuple[Chunk, ...]
    slots: Tensor
    positions: Tensor
    windows: tuple[int | None, ...]
    _masks: dict[tuple[Any, ...], Tensor | None] = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> int:
        return int(self.slots.shape[0])

    def attend(self, layer: int, query: Tensor, groups: int, scaling: float | None) -> Tensor:
        """`query (1, H, T, D)` against this step's keys of `layer`; returns `(1, T, H, D)`."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        window = self.windows[layer] if layer < len(self.windows) else None
        _, heads, _, dim = query.shape
        out = query.new_empty((self.tokens, heads, dim))
        n = self.decode
        if n:
            span = self.decode_span
            q = query[0, :, :n].transpose(0, 1).reshape(n, heads // groups, groups, dim)  # (n, Hkv, G, D)
            o = F.scaled_dot_product_attention(
                q,
                keys[:n, :, :span],
                values[:n, :, :span],
                attn_mask=self._decode_mask(span, window),
                scale=scaling,
            )
            out[:n] = o.reshape(n, heads, dim)
            for row, length in self.decode_long:  # far longer than the rest: alone, over its own keys
                start = 0 if window is None else max(0, length - window)
                o = F.scaled_dot_product_attention(
                    q[row : row + 1], keys[row : row + 1, :, start:length], values[row : row + 1, :, start:length],
                    scale=scaling,
                )  # fmt: skip
                out[row] = o.reshape(heads, dim)
        for chunk in self.chunks:
            end = chunk.start + chunk.width
            q = query[:, :, chunk.first : chunk.first + chunk.width]  # (1, H, w, D)
            k = _repeat(keys[chunk.slot : chunk.slot + 1, :, :end], groups)
            v = _repeat(values[chunk.slot : chunk.slot + 1, :, :end], groups)
            chunk_mask = self._chunk_mask(chunk, window)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=chunk_mask, is_causal=chunk_mask is None, scale=scaling
            )
            out[chunk.first : chunk.first + chunk.width] = o[0].transpose(0, 1)
        return out.unsqueeze(0)

    def _decode_mask(self, longest: int, window: int | None) -> Tensor:
        """`(n, 1, 1, longest)`: decoding row i sees its own `decode_keys[i]` keys (the last `window` of them)."""
        key = ("decode", window)
        mask = self._masks.get(key)
        if mask is None:
            pos = torch.arange(longest, device=self.decode_keys.device)
            seen = pos[None, :] < self.decode_keys[:, None]
            if window is not None:
                seen &= pos[None, :] >= self.decode_keys[:, None] - window
            mask = self._masks[key] = seen[:, None, None, :]
        return mask

    def _chunk_mask(self, chunk: Chunk, window: int | None) -> Tensor | None:
        """`(1, 1, w, start + w)` causal from the chunk's start; None where SDPA's own causal mask is the same."""
        if chunk.start == 0 and (window is None or window >= chunk.width):
            return None
        key = ("chunk", chunk.first, window)
        if key not in self._masks:
            query = chunk.start + torch.arange(chunk.width, device=self.slots.device)
            pos = torch.arange(chunk.start + chunk.width, device=self.slots.device)
            seen = pos[None, :] <= query[:, None]
            if window is not None:
                seen &= pos[None, :] > query[:, None] - window
            self._masks[key] = seen[None, None]
        return self._masks[key]


def split_decode(lengths: list[int], alone_cost: int = 256) -> tuple[int, tuple[tuple[int, int], ...]]:
    """`(span, long)`: decoding rows with `lengths[i]` keys attend together over `span` keys, except the rows
    in `long` (`(row, keys)`), which attend alone. Chosen to minimise the keys read, a row alone counting
    `alone_cost` extra keys (its own call): one 2,000-token row among short ones no longer makes every row
    read 2,000 keys."""
    order = sorted(lengths)
    n = len(order)
    best, span, above = n * order[-1], order[-1], 0  # above: keys of the rows past row i (alone)
    for i in range(n - 2, -1, -1):
        above += order[i + 1] + alone_cost
        cost = (i + 1) * order[i] + above
        if cost < best:
            best, span = cost, order[i]
    return span, tuple((row, length) for row, length in enumerate(lengths) if length > span)


def _repeat(kv: Tensor, groups: int) -> Tensor:
    """`(B, Hkv, K, D)` -> `(B, Hkv * groups, K, D)`, each key head serving `groups` query heads."""
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def packed_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention interface: a packed step's segments, else SDPA as transformers runs it."""
    step: PackedStep | None = kwargs.pop(STEP_KWARG, None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    extras = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if extras or dropout:
        raise PackedUnsupportedError(f"this model's attention uses {extras or ['dropout']}")
    groups = getattr(module, "num_key_value_groups", 1)
    return step.attend(module.layer_idx, query, groups, scaling), None


def enable_packed(model: Any) -> bool:
    """Route `model`'s attention through `packed_attention` if it runs on SDPA and takes the attention interface;
    False (and the model untouched) otherwise."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == ATTENTION:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # forwards without a packed step get SDPA's masks
    try:
        model.set_attn_implementation(ATTENTION)
    except Exception as exc:  # a model without the functional attention interface
        log.info("packed steps off: %s", exc)
        return False
    return bool(getattr(model.config, "_attn_implementation", None) == ATTENTION)


def disable_packed(model: Any) -> None:
    """Back to plain SDPA (after a failed probe)."""
    model.set_attn_implementation("sdpa")
