"""How much prompt a packed step takes while rows decode (chunked prefill), so that a long prompt slows the running
rows' steps by a bounded factor instead of stalling them.

Work is counted in units of one token's linear work (projections and MLP). A token also attends to every key
before it, and on a long prompt that is not small: on the serving benchmark's Llama a key costs 1/3,136 of a
token's linear work, so at position 2,000 a prompt token costs 1.64 units and at 32,000 about 11. Counting tokens
alone let the last chunks of a long prompt cost the running rows far more than the budget said.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["PrefillBudget", "attention_key_cost", "take_chunks"]


class PrefillBudget:
    """Prompt work per step while rows decode. A packed step's time is modelled as `fixed + per_unit * work`
    (decode and prompt tokens alike, each with its attended keys), fitted by least squares over recent steps
    (older ones fade by `memory` per step). A step takes as much prompt work as costs at most `stall` times the
    decode-only step of the rows running now: `stall * (fixed / per_unit + decode work)`, within `[floor,
    limit]`; `limit` when no row decodes or `stall` is 0 (fixed chunks). So a long prompt costs the running
    rows' steps at most about `1 + stall` times their time, on any device and model (a GPU's fixed cost buys
    large chunks). `key_cost`: one attended key's work in units (`attention_key_cost`); 0 counts tokens only.

    A line fitted to small steps does not hold far beyond them: on a CPU a 16-row decode step is bound by reading the
    weights, a 250-token step by arithmetic, so the fit priced a long prompt's first chunk at 2x a decode step and
    it took 4x (a 150 ms gap at the serving benchmark's p99). Two more bounds hold a step near what was measured:
    its work stays within `1 + stall` times the largest step measured lately (or its decode work, if larger), and
    its time, priced at that largest step's time per unit of work, within `1 + stall` times the decode step's.
    The second is safe wherever a step's time per unit does not grow with its work (a fixed cost, then memory- or
    compute-bound work), so a long prompt's chunks grow over a few steps, each measured before the next, up to the
    stall and not past it."""

    def __init__(
        self, limit: int, stall: float = 0.0, floor: int = 16, memory: float = 0.95, key_cost: float = 0.0
    ) -> None:
        self.limit, self.stall, self.floor, self.memory = limit, stall, min(floor, limit), memory
        self.key_cost = key_cost
        self._sums = (0.0, 0.0, 0.0, 0.0, 0.0)  # weighted count, sum x, sum y, sum x^2, sum xy
        self._largest = 0.0  # the largest step's work measured, fading as the fit's weights do
        self._pace = 0.0  # that step's seconds per unit of work

    def tokens(self, decoding: float) -> int:
        """The step's prompt work (units), given the decoding rows' work (`decode_work`, or their count)."""
        allowed = self.allowed(decoding)
        return self.limit if allowed is None else int(allowed)

    def allowed(self, decoding: float) -> float | None:
        """`tokens(decoding)` while something bounds it; None when nothing does (no row decodes, or `stall` 0):
        prompts then go in chunks of `limit` tokens, however long their prefix."""
        if decoding == 0 or self.stall <= 0:
            return None
        fit = self.fit()
        if fit is None:
            return float(self.floor)
        fixed, per_unit = fit
        within = (1 + self.stall) * max(self._largest, decoding) - decoding  # near what has been measured
        bounds = [self.limit, round(self.stall * (fixed / per_unit + decoding)), within]
        if self._pace > 0 and self._largest >= decoding:  # its time at the largest step's pace, within the stall
            bounds.append((1 + self.stall) * (fixed + per_unit * decoding) / self._pace - decoding)
        return float(max(self.floor, min(bounds)))

    def decode_work(self, lengths: Sequence[int]) -> float:
        """Work of one decode token per row, each attending its row's `lengths[i]` keys."""
        return len(lengths) + self.key_cost * sum(lengths)

    def work(self, tokens: int, prefix: int) -> float:
        """Work of `tokens` prompt tokens after `prefix` ones (each attends to the keys up to itself)."""
        return tokens + self.key_cost * (tokens * prefix + tokens * (tokens + 1) / 2)

    def fit_tokens(self, work: float, prefix: int) -> int:
        """The most prompt tokens after `prefix` ones whose `work` is at most `work`."""
        if work <= 0:
            return 0
        if self.key_cost <= 0:
            return int(work)
        a, b = self.key_cost / 2, 1 + self.key_cost * (prefix + 0.5)
        tokens = int((math.sqrt(b * b + 4 * a * work) - b) / (2 * a))
        while tokens > 0 and self.work(tokens, prefix) > work:  # float rounding at the boundary
            tokens -= 1
        while self.work(tokens + 1, prefix) <= work:
            tokens += 1
        return tokens

    def observe(self, seconds: float, work: float) -> None:
        """A packed step of `work` units (decode and prompt) took `seconds`."""
        if work <= 0 or seconds <= 0:
            return
        w, sx, sy, sxx, sxy = (v * self.memory for v in self._sums)
        self._sums = (w + 1, sx + work, sy + seconds, sxx + work * work, sxy + work * seconds)
        if work >= self._largest * self.memory:
            self._pace = seconds / work
        self._largest = max(work, self._largest * self.memory)

    def fit(self) -> tuple[float, float] | None:
        """`(fixed s, s per unit)`; all the time per unit (fixed 0) while the work barely varies."""
        w, sx, sy, sxx, sxy = self._sums
        if w == 0:
            return None
        mx, my = sx / w, sy / w
        var, cov = sxx / w - mx * mx, sxy / w - mx * my
        if var <= (0.1 * mx) ** 2 or cov <= 0:
            return 0.0, my / mx
        per_unit = cov / var
        return max(0.0, my - per_unit * mx), per_unit


class _Prefilling(Protocol):
    """A row whose prompt is going in (`generation.Row`)."""

    job: Any
    length: int


def take_chunks(rows: Sequence[_Prefilling], work: float | None, budget: PrefillBudget) -> list[tuple[Any, int]]:
    """Prompt chunks `(row, tokens)` whose work fits `work` units (`PrefillBudget.allowed`; None: `limit` tokens
    in all), oldest row first (the first takes at least one token); an echo row's prompt goes whole, alone.

    Under a work budget, newer prompts take up to half of it first, shortest first, and the oldest row (then the
    others, oldest first) takes what is left, at least half: behind a long prompt's chunks, short requests start
    decoding within a step or two instead of queueing for the whole prompt (as vLLM's concurrent partial prefills
    let them), the running batch does not drain while it goes in, and the long prompt still gets half of every
    step (two steps at most for each one it would take alone)."""
    if work is None or not rows or rows[0].job.params.echo:
        return _in_order(rows, work, budget)
    newer = sorted((r for r in rows[1:] if not r.job.params.echo), key=lambda r: _left_work(r, budget))
    ahead = _in_order(newer, work / 2, budget, progress=False)
    work -= sum(budget.work(tokens, row.length) for row, tokens in ahead)
    taken = {id(row) for row, _ in ahead}
    return ahead + _in_order([row for row in rows if id(row) not in taken], work, budget)


def _left_work(row: _Prefilling, budget: PrefillBudget) -> float:
    return budget.work(len(row.job.prompt_ids) - row.length, row.length)


def _in_order(
    rows: Sequence[_Prefilling], work: float | None, budget: PrefillBudget, progress: bool = True
) -> list[tuple[Any, int]]:
    """Chunks in the order of `rows` (callers give oldest first, or shortest first) while `work` lasts; with
    `progress` the first row takes at least one token."""
    chunks: list[tuple[Any, int]] = []
    tokens = budget.limit
    for row in rows:
        left = len(row.job.prompt_ids) - row.length
        if row.job.params.echo:
            return chunks or [(row, left)]
        take = min(left, tokens if work is None else budget.fit_tokens(work, row.length))
        if progress and not chunks:
            take = max(take, min(left, 1))
        if take <= 0:
            break
        chunks.append((row, take))
        tokens -= take
        if work is not None:
            work -= budget.work(take, row.length)
    return chunks


def attention_key_cost(config: Any) -> float:
    """One attended key's multiply-adds (`q.k` and the value: 2 x heads x head_dim) over one token's in a decoder
    layer's projections and gated MLP; 0 when the config does not give the sizes (keys then cost nothing)."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    inter = getattr(config, "intermediate_size", None)
    if not (isinstance(hidden, int) and isinstance(heads, int) and isinstance(inter, int) and heads > 0):
        return 0.0
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return 2 * heads * head_dim / linear
