"""A per-row-slot KV cache for continuous batching: memory is reserved once, rows own a slot, a join writes
only its own prompt's keys and values, a leave frees its slot, and no step concatenates or copies the store.

Layout per layer: keys and values `(slots, kv_heads, capacity, head_dim)`. Row `r` keeps its keys at
`[slot(r), :, 0:length(r)]`, real positions from 0 (no padding inside a slot). A forward runs a set of rows
(`bind`): each layer's `update` writes the new keys at each row's own offset and returns the rows' keys up
to the longest one (a view when the rows hold consecutive slots, as decoding rows always do); the attention
mask built by `attention_mask` hides every key past a row's own query position.

Capacity: the whole context (`max_length` positions per slot) when it fits `budget_bytes`, reserved as the
first forward runs, so a long prompt arriving mid-run never reallocates the store under the running rows
(a doubling copy of every slot cost 0.2-0.9 s on the benchmark model). Otherwise the store starts smaller
and doubles. Every slot's positions are zeroed up to the furthest key that rows attending together read
(masked keys still meet their values in `probs @ V`, and 0 * NaN would be NaN), so the reservation costs no
time and, on CPU, no memory until rows use it. A prompt chunk reads only its own slot's positions, each
written before it is read, so a long prompt zeroes nothing: its slot is marked as written past that point
(`_ahead`), and a later zeroing leaves what it wrote alone.

Why not transformers' `ContinuousBatchingManager` / `PagedAttentionCache`: it packs every request's tokens
into one flattened row (batch dim 1, `cu_seq_lens`), while per-request adapters (`lokr.adapter_batch`)
select by batch row; see the README ("KV cache").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .packed import Chunk, PackedStep, split_decode

__all__ = ["SlotCache", "SlotPlan", "default_budget"]


def default_budget(device: torch.device) -> int | None:
    """Bytes the KV cache may reserve up front: a quarter of host memory on CPU (committed only as rows use
    it), half of the free memory on a CUDA device (after the model is loaded); None elsewhere (grow instead)."""
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) // 2
    return None


@dataclass(frozen=True)
class SlotPlan:
    """One forward's rows: their `slots (B,)` and `starts (B,)` (tokens already cached), `width` new tokens
    each (right-padded), and `keys` = the key length the forward attends over (max start + width)."""

    slots: Tensor
    starts: Tensor
    width: int
    keys: int
    first: int | None  # the first slot when `slots` are consecutive (the view path), else None
    slot_list: tuple[int, ...]
    start_list: tuple[int, ...]


class SlotCache:
    """Keys and values of up to `max_rows` rows, all layers; what a model's attention calls `update` on."""

    is_compileable = False

    def __init__(
        self,
        max_rows: int,
        capacity: int = 256,
        max_length: int | None = None,
        budget_bytes: int | None = None,
        layers: int = 1,
    ) -> None:
        """`capacity`: positions per slot to start with when the whole `max_length` does not fit `budget_bytes`
        (estimated for `layers` layers like the first one)."""
        self.max_rows = max_rows
        self.capacity = capacity
        self.max_length = max_length
        self.budget_bytes, self.layers = budget_bytes, max(1, layers)
        self._clean = 0  # positions [0, _clean) of every slot hold zeros or written keys / values
        self._ahead: dict[int, int] = {}  # slot -> end of what rows wrote there past `_clean`
        self.keys: list[Tensor] = []  # per layer (max_rows, kv_heads, capacity, head_dim)
        self.values: list[Tensor] = []
        self._free = list(range(max_rows - 1, -1, -1))  # a stack: the lowest free slot is taken first
        self._plan: SlotPlan | PackedStep | None = None

    # ------------------------------------------------------------------------------------------ slots
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self, top: bool = False) -> int:
        """Reserve the lowest free slot (the highest with `top`: where rows wait while they prefill)."""
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        self._free.sort(reverse=True)
        return self._free.pop(0 if top else -1)

    def owns(self, slot: int) -> bool:
        return slot not in self._free

    def release(self, slot: int) -> None:
        """Give `slot` back (its contents are left as they are: masks never read past a row's length)."""
        if slot in self._free or not 0 <= slot < self.max_rows:
            raise RuntimeError(f"KV-cache slot {slot} is not in use")
        self._free.append(slot)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into the free slot `dst`; `src` is freed."""
        self._free.remove(dst)
        for store in (*self.keys, *self.values):
            store[dst, :, :length] = store[src, :, :length]
        self._wrote(dst, length)
        self._free.append(src)

    @torch.inference_mode()
    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the cached positions of two used slots."""
        for store in (*self.keys, *self.values):
            held = store[a, :, :length_a].clone()
            store[a, :, :length_b] = store[b, :, :length_b]
            store[b, :, :length_a] = held
        self._wrote(a, length_b)
        self._wrote(b, length_a)

    # ------------------------------------------------------------------------------------------ a forward
    @torch.inference_mode()
    def bind(self, slots: list[int], starts: list[int], width: int, device: torch.device) -> SlotPlan:
        """Set the rows of the next forward: row i writes `width` new positions after its `starts[i]`."""
        keys = max(starts) + width
        self._fit(keys)
        if min(starts) + width < keys:  # a row reads past what it writes: those positions must be finite
            self._zero_to(keys)
        for slot, start in zip(slots, starts, strict=True):
            self._wrote(slot, start + width)
        first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
        plan = SlotPlan(
            torch.tensor(slots, device=device),
            torch.tensor(starts, device=device),
            width,
            keys,
            first,
            tuple(slots),
            tuple(starts),
        )
        self._plan = plan
        return plan

    @torch.inference_mode()
    def bind_packed(
        self,
        decode_lengths: list[int],
        chunks: list[tuple[int, int, int]],
        windows: tuple[int | None, ...],
        device: torch.device,
    ) -> PackedStep:
        """Set the tokens of the next packed forward: decoding row i (slot i) adds its token at position
        `decode_lengths[i]`; each `(slot, start, width)` chunk adds `width` prompt tokens from `start`."""
        slots, positions, packed, first = (
            list(range(len(decode_lengths))),
            list(decode_lengths),
            [],
            len(decode_lengths),
        )
        for slot, start, width in chunks:
            packed.append(Chunk(first, slot, start, width))
            slots += [slot] * width
            positions += range(start, start + width)
            first += width
        self._fit(max(positions) + 1)
        span, long = split_decode([n + 1 for n in decode_lengths]) if decode_lengths else (0, ())
        self._zero_to(span)  # the decoding rows read `span` positions of slots 0..n-1 together
        for slot, start, width in chunks:
            self._wrote(slot, start + width)  # a chunk reads only what it and the chunks before it wrote
        for row, length in long:  # rows attending alone read only their own keys
            self._wrote(row, length)
        step = PackedStep(
            self,
            len(decode_lengths),
            torch.tensor(decode_lengths, device=device) + 1,
            span,
            long,
            tuple(packed),
            torch.tensor(slots, device=device),
            torch.tensor(positions, device=device),
            windows,
        )
        self._plan = step
        return step

    def attention_mask(self, plan: SlotPlan, dtype: torch.dtype, additive: bool, window: int | None) -> Tensor:
        """`(B, 1, width, keys)`: query t of row i sees keys `0..starts[i] + t` (the last `window` of them
        for sliding-window attention). Boolean for SDPA, else additive (0 / dtype min) for eager attention."""
        query = plan.starts[:, None] + torch.arange(plan.width, device=plan.starts.device)  # (B, T)
        key = torch.arange(plan.keys, device=plan.starts.device)
        seen = key[None, None, :] <= query[:, :, None]  # (B, T, K)
        if window is not None:
            seen &= key[None, None, :] > query[:, :, None] - window
        seen = seen[:, None]
        if not additive:
            return seen
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)

    def positions(self, plan: SlotPlan) -> Tensor:
        """`(B, width)` position ids: each row continues from its own length."""
        return plan.starts[:, None] + torch.arange(plan.width, device=plan.starts.device)

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write `(B, kv_heads, width, head_dim)` at each bound row's offset; return `(B, kv_heads, keys,
        head_dim)`: a view of the store when the rows hold consecutive slots."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("SlotCache.update called outside a bound forward")
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        if isinstance(plan, PackedStep):  # `(1, Hkv, T, D)`: token t goes to its own (slot, position)
            for store, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
                store[plan.slots, :, plan.positions] = new[0].transpose(0, 1).to(store.dtype)
            return key_states, value_states  # the packed attention reads the store itself
        out = []
        for store, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            self._write(store, new.to(store.dtype), plan)
            if plan.first is not None:
                out.append(store[plan.first : plan.first + len(plan.slots), :, : plan.keys])
            else:
                out.append(store.index_select(0, plan.slots)[:, :, : plan.keys])
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        plan = self._plan
        if isinstance(plan, PackedStep):
            return int(plan.positions.max()) + 1
        return plan.keys if plan is not None else 0

    # ------------------------------------------------------------------------------------------ storage
    @staticmethod
    def _write(store: Tensor, new: Tensor, plan: SlotPlan) -> None:
        if plan.width == 1:  # decode: one position per row, one indexed write
            store[plan.slots, :, plan.starts] = new[:, :, 0]
            return
        for i, (slot, start) in enumerate(zip(plan.slot_list, plan.start_list)):  # prefill: a few rows
            store[slot, :, start : start + plan.width] = new[i]

    def _allocate(self, key_states: Tensor, value_states: Tensor) -> None:
        """Add the store of the next layer (shapes from its first keys / values): `_clean` positions zeroed."""
        if not self.keys:
            self.capacity = self._first_capacity(key_states, value_states)
        for new, store in ((key_states, self.keys), (value_states, self.values)):
            _, heads, _, dim = new.shape
            tensor = torch.empty((self.max_rows, heads, self.capacity, dim), dtype=new.dtype, device=new.device)
            tensor[:, :, : self._clean].zero_()
            store.append(tensor)

    def _first_capacity(self, key_states: Tensor, value_states: Tensor) -> int:
        """The whole context when it fits the budget, else the capacity asked for (at least what is bound)."""
        asked = max(self.capacity, self._written())
        if self.max_length is None or self.budget_bytes is None:
            return asked
        per_position = sum(t.shape[1] * t.shape[3] * t.element_size() for t in (key_states, value_states))
        whole = self.max_rows * self.max_length * per_position * self.layers
        return max(asked, self.max_length) if whole <= self.budget_bytes else asked

    def _fit(self, length: int) -> None:
        """Make every slot hold `length` positions: a store smaller than that doubles (amortised O(1) per token),
        copying only the positions written."""
        if length > self.capacity:
            self._grow(length)

    def _zero_to(self, length: int) -> None:
        """Zero positions `[_clean, length)` of every slot, but not what rows wrote there (`_ahead`)."""
        if length <= self._clean:
            return
        lo = self._clean
        kept = sorted((slot, end) for slot, end in self._ahead.items())
        runs, first = [], 0  # (first slot, end slot): the slots with nothing written past `_clean`
        for slot, _ in kept:
            runs.append((first, slot))
            first = slot + 1
        runs.append((first, self.max_rows))
        for store in (*self.keys, *self.values):
            for a, b in runs:
                if a < b:
                    store[a:b, :, lo:length].zero_()
            for slot, end in kept:
                if end < length:
                    store[slot, :, end:length].zero_()
        self._ahead = {slot: end for slot, end in kept if end > length}
        self._clean = length

    def _wrote(self, slot: int, end: int) -> None:
        """Rows wrote positions `[0, end)` of `slot` (nothing past `_clean` is ever zeroed there)."""
        if end > self._clean:
            self._ahead[slot] = max(self._ahead.get(slot, 0), end)

    def _written(self) -> int:
        """The furthest position any slot holds written or zeroed."""
        return max(self._clean, *self._ahead.values()) if self._ahead else self._clean

    def _grow(self, length: int) -> None:
        new = self.capacity
        while new < length:
            new *= 2
        if self.max_length is not None:
            new = max(length, min(new, self.max_length))
        written = self._written()
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_empty((*old.shape[:2], new, old.shape[3]))
                grown[:, :, :written] = old[:, :, :written]
                store[i] = grown
        self.capacity = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
