"""Per-row inference with the adapters folded into the base weight, once per distinct row selection.

Where a step has many output positions per weight (images, long prompts), `W + s * kron(w1, w2)` built once
per selection (one fused multiply-add over the weight, `addcmul`) and one base op per selection cost less than
the factored delta: that one's multiply-adds are few, but its extra kernels and passes over the activations
are not. Rows that use the same adapters at the same scales share one op; the FLOPs are the base layer's.
Chosen per layer and step by `cheaper`; exact up to float rounding (the base output is not computed apart).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import RowPlan
from .foldcache import FoldCache, Gather, stamp
from .functional import LayerSpec
from .stacked import LayerBanks, PlaceResult

__all__ = [
    "MergePlan",
    "Prepared",
    "base_op",
    "cheaper",
    "eligible",
    "folded_weight",
    "may_fold",
    "merged_forward",
    "placed_cost",
    "plan_merge",
    "stacked_op",
]

# Cost model, in multiply-adds of a large GEMM: one element of a fused pass over a weight costs about this many
# (memory-bound), and the factored delta costs about this many times its multiply-adds (small kernels, extra
# passes over the activations). Measured on a 2-core CPU with 320-channel convs and Linear layers.
ELEMENT_COST = 40
FACTORED_OVERHEAD = 3
# Below this many multiply-adds per selection an op is bound by its fixed cost, not its arithmetic: equal-sized
# selections then run as one op over all of them (a grouped conv, a batched matmul). Measured on a 2-core CPU with
# 8 selections of 2 rows: 3x3 convs of 5-14M multiply-adds each ran 1.3-2x faster as one grouped conv, 19M broke
# even, 75M ran up to 1.8x slower (oneDNN's grouped kernels). Pointwise convs always stack (one broadcast matmul:
# 4-8x faster than separate convs at 0.5M, still 1.1-3x at 50-210M).
STACK_MAX_MACS = 16_000_000
STACK_MAX_BYTES = 64 << 20  # the selections' folded weights, all alive at once on the stacked path


@dataclass(frozen=True)
class Selection:
    """Rows of the batch (None: all) that use exactly `terms` = `((adapter, scale), ...)` on this layer.

    `span` = `(start, stop)` when those rows are consecutive: the op then reads a view of the input, no gather.
    """

    rows: Tensor | None
    terms: tuple[tuple[str, float], ...]
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class MergePlan:
    """What one layer folds in for one plan: its selections and each bank's slots for the adapters used."""

    selections: tuple[Selection, ...]
    gathers: tuple[Gather, ...]
    terms: int  # adapter terms to fold, over all selections
    factored_cost: int  # multiply-adds per output position of the factored deltas (`placed_cost` with the plan)


class Prepared:
    """One layer's share of an open `adapter_batch`: the adapters present, whether its base op can take a folded
    weight, the factored deltas' cost per position, the bank passes of a Linear layer (`lokr.bankpass.BankPass`),
    and the merge plan, built at most once per block and only where folding may win."""

    def __init__(
        self,
        present: list[str],
        foldable: bool,
        factored: int,
        passes: list[Any] | None,
        hot: Tensor | None = None,
        placed: PlaceResult | None = None,
        eligible: bool = False,
    ) -> None:
        self.present, self.foldable, self.factored, self.passes = present, foldable, factored, passes
        self.hot = hot  # the folded weight when one adapter at scale 1 covers every row and it is cached
        self.placed, self.eligible = placed, eligible  # `LayerBanks.place(present)`, `eligible(base)`, at the time
        self._merge: MergePlan | None = None
        self._declined: torch.Size | None = None  # an input shape for which folding cannot win

    def merge_plan(
        self, plan: RowPlan, banks: LayerBanks, spec: LayerSpec, weight: Tensor, x: Tensor
    ) -> MergePlan | None:
        """The merge plan if folding may beat the factored deltas for `x` (or was built already), else None."""
        if self._merge is None:
            if x.shape == self._declined:
                return None
            if not may_fold(len(self.present), self.factored, x, spec, weight):
                self._declined = x.shape
                return None
            self._merge = plan_merge(plan, self.present, banks, spec, weight.device, self.placed, self.factored)
        return self._merge


def eligible(base: nn.Module) -> bool:
    """A plain Linear / Conv1d / Conv2d (zero padding, no hooks): its op can take another weight."""
    kind = type(base)
    if kind not in (nn.Linear, nn.Conv1d, nn.Conv2d) or base._forward_hooks or base._forward_pre_hooks:
        return False
    return kind is nn.Linear or base.padding_mode == "zeros"  # (a Linear has none: no failed attribute lookup)


def plan_merge(
    plan: RowPlan,
    present: list[str],
    banks: LayerBanks,
    spec: LayerSpec,
    device: torch.device,
    placed: PlaceResult | None = None,
    factored: int | None = None,
) -> MergePlan:
    """Group the rows by the adapters of `present` they use (name order) and find those adapters' slots (`placed`:
    `banks.place(present)`, `factored`: `placed_cost` of it with `plan`, when the caller has them)."""
    key = ("selections", tuple(present), device)
    selections = plan.shared.get(key)
    if selections is None:  # the layers holding the same adapters share one grouping per plan
        selections = plan.shared[key] = _selections(plan, present, device)
    placed = banks.place(present) if placed is None else placed
    folds = sum(len(s.terms) for s in selections)
    factored = placed_cost(placed, spec, plan) if factored is None else factored
    return MergePlan(selections, _gathers(placed), folds, factored)


def _selections(plan: RowPlan, present: list[str], device: torch.device) -> tuple[Selection, ...]:
    per_row: list[list[tuple[str, float]]] = [[] for _ in range(plan.num_rows)]
    for name in present:
        group = plan.groups[name]
        for r, s in zip(group.rows, group.scales, strict=True):
            per_row[r].append((name, s))
    by_terms: dict[tuple[tuple[str, float], ...], list[int]] = {}
    for r, terms in enumerate(per_row):
        by_terms.setdefault(tuple(terms), []).append(r)
    whole = len(by_terms) == 1
    return tuple(
        Selection(None if whole else plan.row_index(rows, device), terms, _span(rows))
        for terms, rows in by_terms.items()
    )


def placed_cost(placed: PlaceResult, spec: LayerSpec, plan: RowPlan | None = None) -> int:
    """Multiply-adds per output position of the factored deltas of the adapters `placed` (`LayerBanks.place`).

    Without `plan` every position pays every adapter. With one, a Linear layer's bank passes compute each row's
    own entries only (one batched pass per bank), so each adapter counts by its share of the rows; a conv runs
    one delta per adapter, each with its own fixed costs, which the unweighted sum stands in for.
    """
    if plan is None or spec.kind != "linear":
        return sum(bank.factored_cost(spec) * len(pairs) for bank, _, pairs in placed)
    groups = plan.groups
    entries = (bank.factored_cost(spec) * sum(len(groups[name].rows) for name, _ in pairs) for bank, _, pairs in placed)
    return -(-sum(entries) // plan.num_rows)


def _gathers(placed: PlaceResult) -> tuple[Gather, ...]:
    """`LayerBanks.place` results as `(bank, data, slots, names)`."""
    return tuple((bank, data, tuple(s for _, s in pairs), tuple(n for n, _ in pairs)) for bank, data, pairs in placed)


def _span(rows: list[int]) -> tuple[int, int] | None:
    """`(first, last + 1)` when `rows` (ascending) are consecutive, else None."""
    return (rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else None


def cheaper(mp: MergePlan, x: Tensor, spec: LayerSpec, weight: Tensor) -> bool:
    """True when folding the adapters into the weight costs less than the factored deltas for input `x`."""
    return _fold_wins(mp.terms, mp.factored_cost, x, spec, weight)


def may_fold(terms_at_least: int, factored_cost: int, x: Tensor, spec: LayerSpec, weight: Tensor) -> bool:
    """False when folding cannot win even with the fewest terms (one per adapter present): then no merge plan
    need be built (decode steps, short prompts), which keeps per-step Python work off that path."""
    return _fold_wins(terms_at_least, factored_cost, x, spec, weight)


def _fold_wins(terms: int, factored_cost: int, x: Tensor, spec: LayerSpec, weight: Tensor) -> bool:
    positions = _positions(spec, x)
    folded = terms * weight.numel() * ELEMENT_COST
    factored = positions * (factored_cost + 8 * spec.out_features) * FACTORED_OVERHEAD
    return folded < factored


def _positions(spec: LayerSpec, x: Tensor) -> int:
    """Output positions of the layer's op on `x` (rows x tokens, or rows x output pixels up to padding)."""
    if spec.kind == "linear":
        return x.numel() // max(1, x.shape[-1])
    return x.numel() // max(1, x.shape[1]) // math.prod(spec.stride)


def merged_forward(
    base: nn.Module, spec: LayerSpec, x: Tensor, mp: MergePlan, folds: FoldCache | None = None, capacity: int = 0
) -> Tensor:
    """`base(x)` with each row's adapters folded into the weight (`x` in the weight's dtype).

    Where every selection's rows are consecutive (a caller that orders its rows by selection, as the image
    engine does), each op reads a view of `x` and the outputs are concatenated: no per-selection gather/scatter;
    equal-sized selections whose ops are small run as one stacked op (`stacked_op`) instead. With `folds` and
    `capacity` >= the selections, their folded weights are kept there for the next step with the same selections.
    """
    weight: Tensor = base.weight  # type: ignore[assignment]
    bias: Tensor | None = base.bias  # type: ignore[assignment]
    spans = [s.span for s in mp.selections if s.span is not None]
    if 1 < len(spans) == len(mp.selections) and _stackable(spec, x, weight, spans):
        stacked = _kept_stack(weight, spec, mp, folds, capacity)
        return stacked_op(spec, x, stacked, bias)
    folded = _weights(weight, spec, mp, folds, capacity)
    if 1 < len(spans) == len(mp.selections):
        return torch.cat([base_op(spec, x[lo:hi], w, bias) for (lo, hi), w in zip(spans, folded, strict=True)])
    out: Tensor | None = None
    for selection, w in zip(mp.selections, folded, strict=True):
        rows = selection.rows
        y = base_op(spec, x if rows is None else x.index_select(0, rows), w, bias)
        if rows is None:
            return y
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, rows, y)
    assert out is not None
    return out


def _weights(
    weight: Tensor, spec: LayerSpec, mp: MergePlan, folds: FoldCache | None, capacity: int
) -> Iterator[Tensor]:
    """Each selection's folded weight, made as it is needed (one alive at a time); kept in `folds` per selection
    while all of them fit `capacity` copies, so a step whose selections change (an image joins a running batch)
    folds only the new ones."""
    operands: dict[str, _Operand] = {}

    def fold(selection: Selection) -> Tensor:
        if not operands:
            operands.update(_operands(mp.gathers, spec))
        return _fold(weight, selection, operands)

    keep = folds if folds is not None and len(mp.selections) <= capacity else None
    for selection in mp.selections:
        if keep is None:
            yield fold(selection)
        else:
            names = frozenset(name for name, _ in selection.terms)
            made_from = stamp(mp.gathers, weight, names)
            yield keep.get(selection.terms, made_from, 1, capacity, functools.partial(fold, selection), names)


def _kept_stack(weight: Tensor, spec: LayerSpec, mp: MergePlan, folds: FoldCache | None, capacity: int) -> Tensor:
    """`(S, *weight.shape)`: the selections' folded weights side by side (one stacked op reads them), kept in
    `folds` as one entry of `S` copies while they fit `capacity`."""
    count, key = len(mp.selections), tuple(s.terms for s in mp.selections)

    def build() -> Tensor:
        return _fold_all(weight, mp.selections, _operands(mp.gathers, spec))

    if folds is None or count > capacity:
        return build()
    names = frozenset(name for terms in key for name, _ in terms)
    return folds.get(key, stamp(mp.gathers, weight), count, capacity, build, names)


def folded_weight(banks: LayerBanks, names: list[str], spec: LayerSpec, weight: Tensor, x: Tensor) -> Tensor | None:
    """`W + dW` of the adapters `names` (each at its own scale) when one op on it costs less than the base op plus
    their factored deltas on `x` (convs, long inputs), else None. Built for this call only: nothing is kept but
    the kron operands (`FactorBank.fold_operands`): one pass over the weight, and no copy of it stays allocated."""
    if not _fold_wins(len(names), placed_cost(banks.place(names), spec), x, spec, weight):
        return None
    for name in names:  # factors given new storage behind the bank's back (`p.data = ...`) go back to it first
        banks.rehome(name)
    placed = banks.place(names)
    if any(bank.dtype != weight.dtype for bank, _, _ in placed):
        return None
    return _fold(weight, Selection(None, tuple((name, 1.0) for name in names)), _operands(_gathers(placed), spec))


def _operands(gathers: Iterable[Gather], spec: LayerSpec) -> dict[str, _Operand]:
    """Each adapter's kron operands, by name, from `(bank, data, slots, names)` gathers."""
    operands: dict[str, _Operand] = {}
    for bank, data, slots, names in gathers:
        kron = bank.fold_operands(slots, names, spec, data)
        for i, name in enumerate(names):
            operands[name] = _Operand(kron, i)
    return operands


@dataclass(frozen=True)
class _Operand:
    """One adapter's term: entry `index` of its bank's kron operands `(a, b, shape)` (`FactorBank.fold_operands`)."""

    kron: tuple[Tensor, Tensor, tuple[int, ...]]
    index: int


def _fold(weight: Tensor, selection: Selection, operands: dict[str, _Operand]) -> Tensor:
    """`weight + sum(scale * dW)` over the selection's terms (a new tensor; `weight` when it has none)."""
    folded = weight
    for k, (name, scale) in enumerate(selection.terms):
        op = operands[name]
        a_all, b_all, shape = op.kron
        a, b = a_all[op.index], b_all[op.index]
        if k == 0:
            folded = torch.addcmul(weight.view(shape), a, b, value=scale)
        else:
            folded.view(shape).addcmul_(a, b, value=scale)
    return folded.view(weight.shape)


def _stackable(spec: LayerSpec, x: Tensor, weight: Tensor, spans: list[tuple[int, int]]) -> bool:
    """True when the selections are equal-sized consecutive slices whose ops are each too small to run well
    alone, and their folded weights fit the stacking budget."""
    size = spans[0][1] - spans[0][0]
    if any(hi - lo != size for lo, hi in spans) or spans[0][0] != 0 or spans[-1][1] != x.shape[0]:
        return False
    if len(spans) * weight.numel() * weight.element_size() > STACK_MAX_BYTES:
        return False
    if _pointwise(spec):
        return True
    return _positions(spec, x) // len(spans) * weight.numel() <= STACK_MAX_MACS


def _fold_all(weight: Tensor, selections: tuple[Selection, ...], operands: dict[str, _Operand]) -> Tensor:
    """`(S, *weight.shape)`: each selection's folded weight; when every selection has one term from the same
    bank (the usual case), all of them in one fused multiply-add over that bank's operands."""
    terms = [operands[s.terms[0][0]] for s in selections if len(s.terms) == 1]
    kron = terms[0].kron if terms else None
    if kron is None or len(terms) != len(selections) or any(t.kron is not kron for t in terms):
        return torch.stack([_fold(weight, s, operands) for s in selections])
    a, b, shape = kron
    order = [t.index for t in terms]
    if order != list(range(a.shape[0])):  # the bank lists its adapters in name order, selections in row order
        index = torch.tensor(order, dtype=torch.long, device=a.device)
        a, b = a.index_select(0, index), b.index_select(0, index)
    scales = [s.terms[0][1] for s in selections]
    if any(scale != 1.0 for scale in scales):
        a = a * torch.tensor(scales, dtype=a.dtype, device=a.device).view(-1, *([1] * (a.dim() - 1)))
    return torch.addcmul(weight.view(shape), a, b).view(len(selections), *weight.shape)


def _pointwise(spec: LayerSpec) -> bool:
    """A conv that is a matmul over channels at every pixel: 1x1 kernel, stride 1, no padding, one group."""
    ones = (1,) * len(spec.kernel)
    return (
        spec.kind != "linear"
        and spec.kernel == ones
        and spec.stride == ones
        and spec.padding in ((0,) * len(ones), "valid")
        and spec.groups == 1
    )


def stacked_op(spec: LayerSpec, x: Tensor, weights: Tensor, bias: Tensor | None) -> Tensor:
    """The base op of `spec` on `x (S*R, ...)`, rows `s*R .. (s+1)*R` with `weights[s]` (`(S, *weight.shape)`),
    as one op: a batched matmul (Linear) or a conv with `S` times the groups (rows of a selection side by side
    as channels)."""
    count = weights.shape[0]
    if spec.kind == "linear":
        y = torch.bmm(x.reshape(count, -1, x.shape[-1]), weights.transpose(1, 2))
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weights.shape[1])
    rows, channels, space = x.shape[0] // count, x.shape[1], x.shape[2:]
    if _pointwise(spec):  # a 1x1 conv is a matmul over channels: (S, 1, out, in) @ (S, R, in, pixels)
        y = torch.matmul(weights.view(count, 1, -1, channels), x.reshape(count, rows, channels, -1))
        if bias is not None:
            y = y + bias.view(-1, 1)
        return y.view(x.shape[0], -1, *space)
    grouped = x.reshape(count, rows, channels, *space).transpose(0, 1).reshape(rows, count * channels, *space)
    conv = F.conv1d if spec.kind == "conv1d" else F.conv2d
    y = conv(
        grouped,
        weights.reshape(-1, *weights.shape[2:]),
        None if bias is None else bias.expand(count, -1).reshape(-1),
        spec.stride,
        spec.padding,
        spec.dilation,
        spec.groups * count,
    )
    out = y.shape[1] // count
    return y.view(rows, count, out, *y.shape[2:]).transpose(0, 1).reshape(rows * count, out, *y.shape[2:])


def base_op(spec: LayerSpec, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The base layer's op of `spec` with another `weight`."""
    if spec.kind == "linear":
        return F.linear(x, weight, bias)
    conv = F.conv1d if spec.kind == "conv1d" else F.conv2d
    return conv(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
