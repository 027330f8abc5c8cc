"""LoKr wrapper for `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` (one class; the differences live in `LayerSpec` and
`functional`): adapter slots, selection, merge."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import LoKrAdapter
from .bankpass import BankPass
from .batch import RowPlan, accumulate, current_plan, per_row, scatter_add
from .errors import AdapterNotFoundError, AdapterStateError, NonFiniteError, RowCountError
from .foldcache import FoldCache
from .functional import LayerSpec, apply_delta, delta_weight, prefer_factored
from .merged import Prepared, base_op, cheaper, eligible, folded_weight, merged_forward, placed_cost
from .stacked import LayerBanks

__all__ = ["SUPPORTED_LAYERS", "LoKrAdapter", "LoKrLayer"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LoKrLayer(nn.Module):
    """Wraps a base layer; adds the deltas of its active adapters (or of a per-row plan) unmerged."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = LayerSpec.from_module(base_layer)
        self.lokr_adapters = nn.ModuleDict()
        # The ModuleDict's own dict, for the per-step hot path (nn.Module.__getattr__ is slow).
        self._held: dict[str, nn.Module] = self.lokr_adapters._modules
        self.active_adapters: list[str] = []
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._banks = LayerBanks()  # the storage of this layer's adapters (their parameters are views of it)
        self._folds = FoldCache()  # `W + dW` of adapters recently run alone (adapter_batch's `fold`)

    # ---------------------------------------------------------------------------- base-layer facade
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias  # type: ignore[return-value]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ---------------------------------------------------------------------------- adapter slots
    def add_adapter(self, name: str, adapter: LoKrAdapter) -> None:
        """Attach (or replace) `name`; tensors move to the base layer's device."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged into the base weight; unmerge it first")
        if name in self.lokr_adapters:
            self.remove_adapter(name)
        if adapter._home is not None:  # attached elsewhere (another layer or name): it gets its own copy here
            adapter = copy.deepcopy(adapter)
        adapter = adapter.to(self.weight.device).train(self.training)
        self.lokr_adapters[name] = adapter
        self._banks.add(name, adapter)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged into the base weight; unmerge it first")
        self._banks.remove(name)
        self._folds.drop(name)
        if name in self.lokr_adapters:
            del self.lokr_adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.lokr_adapters]

    def get_delta_weight(self, name: str) -> Tensor:
        """Dense `dW` for `name` in the base weight's shape (PEFT's `get_delta_weight`)."""
        if name not in self.lokr_adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not on this layer")
        adapter = self._adapter(name)
        return delta_weight(adapter.factors(), self.spec, adapter.scale)

    def _adapter(self, name: str) -> LoKrAdapter:
        adapter = self._held[name]
        assert isinstance(adapter, LoKrAdapter)
        return adapter

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.spec.kind != "linear" and x.dim() == len(self.spec.kernel) + 1:
            # An unbatched conv input, `(C, L)` / `(C, H, W)` as torch's convs accept: run it as a batch of one
            # (one row of an `adapter_batch`), every path then sees dim 0 as the batch.
            return self.forward(x.unsqueeze(0), *args, **kwargs).squeeze(0)
        plan = current_plan(self)
        if plan is not None:
            return self._forward_rows(x, plan, *args, **kwargs)
        previous_dtype = x.dtype
        if not self.adapters_enabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        folded = self._fold_active(x) if not (args or kwargs) else None
        if folded is not None:
            return base_op(self.spec, x, folded, self.bias).to(previous_dtype)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            adapter = self._adapter(name)
            if (not self.training) or torch.rand(1) > adapter.module_dropout:
                result = accumulate(result, self._delta(adapter, x))
        return result.to(previous_dtype)

    def _fold_active(self, x: Tensor) -> Tensor | None:
        """At inference, `W + dW` of the active adapters where one op on it is cheaper than the factored deltas."""
        weight = self.weight
        if not (self.active_adapters and self._inference() and x.dtype == weight.dtype):
            return None
        if not eligible(self.base_layer):
            return None
        return folded_weight(self._banks, self.active_adapters, self.spec, weight, x)

    def _delta(self, adapter: LoKrAdapter, x: Tensor) -> Tensor:
        """`layer(x; dW)` in the adapter's dtype; rank dropout (training only) masks output channels."""
        x = x.to(adapter.dtype)
        factors = adapter.factors()
        if prefer_factored(factors, self.spec):
            out = apply_delta(x, factors, self.spec, adapter.scale)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters()):
            out = base_op(self.spec, x, delta_weight(factors, self.spec, adapter.scale), None)
        else:
            out = base_op(self.spec, x, adapter.cached_delta(self.spec), None)
        if self.training and adapter.rank_dropout:
            out = out * self._rank_mask(adapter, out)
        return out

    def _rank_mask(self, adapter: LoKrAdapter, out: Tensor) -> Tensor:
        """PEFT's row mask over output channels (CPU RNG, same draw order as PEFT)."""
        drop = (torch.rand(self.spec.out_features) > adapter.rank_dropout).float()
        if adapter.rank_dropout_scale:
            drop /= drop.mean()
        drop = drop.to(device=out.device, dtype=out.dtype)
        return drop if self.spec.kind == "linear" else drop.view(-1, *([1] * len(self.spec.kernel)))

    def _forward_rows(self, x: Tensor, plan: RowPlan, *args: Any, **kwargs: Any) -> Tensor:
        """Each row of dim 0 gets its own adapter(s). At inference: the adapters folded into the weight once
        per row selection where that is cheaper (`merged`), else the factor banks' batched deltas on Linear
        layers; otherwise (training, or convs with few positions) one gather / delta / scatter per adapter. Rows
        with no adapter here, or one adapter whose folded weight is kept, run one base op on the input as it is."""
        if self.merged:
            raise AdapterStateError("per-row adapter selection needs unmerged adapters; call unmerge first")
        tokens = plan.tokens
        if tokens and (self.spec.kind != "linear" or x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != plan.num_rows):
            raise RowCountError(
                f"adapter_batch(tokens=True) selects {plan.num_rows} positions of a (1, T, features) input to "
                f"Linear layers; this {self.spec.kind} layer got {tuple(x.shape)}"
            )
        if not tokens and x.shape[0] != plan.num_rows:
            raise RowCountError(_row_count_message(plan.num_rows, x))
        if not (args or kwargs) and self._inference():  # the per-step fast paths: no reshaping
            if not plan.groups:
                return _like(self.base_layer(x), x)
            prepared = plan.prepared.get(id(self)) or self._prepare(plan)
            if prepared.hot is not None and x.dtype == prepared.hot.dtype:  # one adapter on every row, folded
                return _like(base_op(self.spec, x, prepared.hot, self.bias), x)
            if not prepared.present:
                return _like(self.base_layer(x), x)
        if tokens:  # a packed sequence (1, T, ...): one row per position, as (T, 1, ...)
            rows = self._rows(x.reshape(x.shape[1], 1, *x.shape[2:]), plan, *args, **kwargs)  # contiguous views
            return rows.reshape(1, rows.shape[0], *rows.shape[2:])
        return self._rows(x, plan, *args, **kwargs)

    def _rows(self, x: Tensor, plan: RowPlan, *args: Any, **kwargs: Any) -> Tensor:
        if not plan.groups:
            return _like(self.base_layer(x, *args, **kwargs), x)
        if self._inference():
            prepared = plan.prepared.get(id(self)) or self._prepare(plan)
            weight = self.weight
            plain = not (args or kwargs) and x.dtype == weight.dtype  # the base op may take another weight
            if prepared.foldable and plain:
                mp = prepared.merge_plan(plan, self._banks, self.spec, weight, x)
                if mp is not None and cheaper(mp, x, self.spec, weight):
                    return merged_forward(self.base_layer, self.spec, x, mp, self._folds, plan.fold)
            passes = prepared.passes
            if passes is not None:
                result = self.base_layer(x, *args, **kwargs)
                for bank_pass in passes:
                    result = bank_pass.add_to(result, x, self.spec)
                return _like(result, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in [name for name in plan.groups if name in self._held]:
            group = plan.groups[name]
            index = None if group.whole else group.index(x.device)
            delta = self._delta(self._adapter(name), x if index is None else x.index_select(0, index))
            if not group.unit:
                delta = delta * per_row(group.scale_tensor(x.device, delta.dtype), delta)
            result = accumulate(result, delta) if index is None else scatter_add(result, index, delta)
        return _like(result, x)

    def _inference(self) -> bool:
        """Per-row batches read the factor banks directly at inference (eval mode, no autograd)."""
        return not self.training and not torch.is_grad_enabled()

    def prepare_rows(self, plan: RowPlan) -> None:
        """Record what this layer's forward runs for `plan` (as an `adapter_batch` opens, in one loop). A plan kept
        from the block before (`lokr.plancache`) keeps this layer's share where it still holds."""
        if self._inference():
            kept = plan.prepared.get(id(self))
            if kept is None or not self._still_holds(kept, plan):
                self._prepare(plan)

    def _still_holds(self, kept: Prepared, plan: RowPlan) -> bool:
        """Whether `kept`, prepared for `plan` in an earlier block, serves this one: the base op takes a folded
        weight as it did, and the folded weight of a lone adapter is made again if its adapter or `W` was edited
        (the bank passes' kept operands likewise, `BankPass.recheck`)."""
        if kept.eligible != eligible(self.base_layer):
            return False
        if kept.hot is not None:
            kept.hot = self._folds.hot(plan, kept.present, kept.placed, self.spec, self.weight)
            return kept.hot is not None
        for bank_pass in kept.passes or ():
            bank_pass.recheck()
        return True

    def _prepare(self, plan: RowPlan) -> Prepared:
        """What this layer's inference forward needs for `plan`: the kept folded weight of its one adapter; else
        whether the base op can take a folded weight (the merge plan is built only when folding may win), and on
        Linear layers the `(bank, data, rows, slots)` of each bank holding an adapter of `plan`."""
        present = [name for name in plan.groups if name in self._held]
        placed = self._banks.place(present)
        weight = self.weight
        base_ok = eligible(self.base_layer)
        foldable = base_ok and all(bank.dtype == weight.dtype for bank, *_ in placed)
        hot = self._folds.hot(plan, present, placed, self.spec, weight) if foldable else None
        if hot is not None:  # plain calls run on it; any other (extra arguments, a cast) takes the per-adapter path
            prepared = plan.prepared[id(self)] = Prepared(present, False, 0, None, hot, placed, base_ok)
            return prepared
        passes = None
        if self.spec.kind == "linear":
            passes = [
                BankPass(bank, data, [name for name, _ in pairs], *plan.bank_entries(pairs, bank.device))
                for bank, data, pairs in placed
            ]
        factored = placed_cost(placed, self.spec, plan)
        prepared = plan.prepared[id(self)] = Prepared(present, foldable, factored, passes, None, placed, base_ok)
        return prepared

    def _apply(self, fn: Any, recurse: bool = True) -> LoKrLayer:
        """`.to()`, `.half()`, `.cuda()`...: the banks go through `fn` and the adapters follow them (an adapter
        whose parameters `fn` then gives other storage anyway is re-homed by its own `_apply`)."""
        self._banks.apply_(fn)
        self._folds.drop()
        return super()._apply(fn, recurse)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies and unpickled layers start with empty banks: re-home the (copied) adapters."""
        super().__setstate__(state)
        for name, adapter in self._held.items():
            self._banks.add(name, adapter)  # type: ignore[arg-type]

    def refresh(self) -> None:
        """Read the adapters' parameters afresh: re-home factors given new storage (`p.data = t`) and drop what is
        kept from them (dense deltas, kron operands, folded weights), which edits through `.data` leave stale."""
        self._banks.refresh()
        self._folds.drop()
        for adapter in self._held.values():
            adapter.drop_cache()  # type: ignore[operator]

    @property
    def bank_nbytes(self) -> int:
        """Bytes held by this layer's factor banks (spare slots included): the device copy of its adapters."""
        return self._banks.nbytes

    # ---------------------------------------------------------------------------- merge
    def merge(self, names: Iterable[str] | None = None, safe_merge: bool = False) -> None:
        """Add `dW` of `names` (default: active adapters) into the base weight; skips merged ones.

        With `safe_merge`, every delta is checked before the weight changes: on NaN/Inf nothing is merged.
        """
        todo = []
        for name in self.active_adapters if names is None else names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=2)
            elif name in self.lokr_adapters:
                todo.append(name)
        if safe_merge:
            self.check_merge(todo)
        for name in todo:
            self.weight.data += self.get_delta_weight(name).detach()
            self.merged_adapters.append(name)

    def check_merge(self, names: Iterable[str] | None = None) -> None:
        """NonFiniteError (a ValueError) if merging `names` (default: active, unmerged ones) gives NaN/Inf weights."""
        names = self.active_adapters if names is None else names
        todo = [n for n in names if n in self.lokr_adapters and n not in self.merged_adapters]
        if not todo:
            return
        with torch.no_grad():
            merged = self.weight.detach().clone()
            for name in todo:
                merged += self.get_delta_weight(name)
                if not torch.isfinite(merged).all():
                    raise NonFiniteError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        """Subtract merged adapters, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lokr_adapters:
                self.weight.data -= self.get_delta_weight(name).detach()

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


def _like(out: Tensor, x: Tensor) -> Tensor:
    """`out` in `x`'s dtype (as every forward returns; autocast may change it), cast only when it differs."""
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _row_count_message(rows: int, x: Tensor) -> str:
    """Why an `adapter_batch` of `rows` selections does not fit `x`, and the usual cause: an expanded batch."""
    got = x.shape[0]
    times = f" (here {got // rows} per row)" if got > rows and got % rows == 0 else ""
    return (
        f"adapter_batch was given {rows} row selection(s) but this forward's input has {got} rows "
        f"(dim 0 of {tuple(x.shape)}); expected one selection per row. Generation with num_beams or "
        "num_return_sequences (or anything else that expands the batch) runs each prompt row as several rows: "
        "repeat each row's adapter selection once per expanded row, in order, "
        f"e.g. [sel for sel in rows for _ in range(k)]{times}"
    )
