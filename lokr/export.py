"""Express loaded adapters as a PEFT LoKr config + state dict that PEFT rebuilds identically."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping

from torch import Tensor

from .config import LoKrConfig
from .errors import UnsupportedAdapterError
from .functional import LayerSpec, factorization
from .layer import LoKrAdapter

__all__ = ["peft_export"]


def peft_export(
    adapters: Mapping[str, LoKrAdapter], specs: Mapping[str, LayerSpec]
) -> tuple[dict[str, Tensor], LoKrConfig]:
    """`({"<module>.lokr_*": tensor}, config)`; raises where PEFT cannot express the adapter."""
    decompose_both = any(hasattr(a, "lokr_w1_a") for a in adapters.values())
    effective = any(hasattr(a, "lokr_t2") for a in adapters.values())
    factor = _decompose_factor(adapters, specs)
    ranks = {n: _peft_rank(n, a, specs[n], decompose_both, effective) for n, a in adapters.items()}
    alphas = {n: a.scale * ranks[n] for n, a in adapters.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = next(iter(adapters.values()))
    config = LoKrConfig(
        r=r,
        alpha=alpha,
        rank_dropout=first.rank_dropout,
        module_dropout=first.module_dropout,
        rank_dropout_scale=first.rank_dropout_scale,
        use_effective_conv2d=effective,
        decompose_both=decompose_both,
        decompose_factor=factor,
        target_modules=sorted(adapters),
        rank_pattern={_exactly(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={_exactly(n): v for n, v in alphas.items() if v != alpha},
        init_weights=True,
        inference_mode=True,
    )
    tensors: dict[str, Tensor] = {f"{n}.{k}": p for n, a in adapters.items() for k, p in a.named_parameters()}
    return tensors, config


def _exactly(module_name: str) -> str:
    """A pattern key that PEFT (`(.*\\.)?(key)$`) matches on `module_name` alone: a bare name would also match
    every module whose name ends in `.module_name` (`proj` in `a.proj`)."""
    return "^" + re.escape(module_name)


def _dims(adapter: LoKrAdapter, spec: LayerSpec) -> tuple[int, int, int, int]:
    f = adapter.factors()
    m1, n1 = f.m1, f.n1
    return m1, spec.out_features // m1, n1, spec.in_features // n1


def _decompose_factor(adapters: Mapping[str, LoKrAdapter], specs: Mapping[str, LayerSpec]) -> int:
    """One `decompose_factor` for which PEFT's `factorization` reproduces every module's factor sizes."""
    dims = {n: _dims(a, specs[n]) for n, a in adapters.items()}
    candidates = [-1, *sorted({d for ds in dims.values() for d in ds})]
    for f in candidates:
        if all(
            factorization(specs[n].out_features, f) == (m1, m2) and factorization(specs[n].in_features, f) == (n1, n2)
            for n, (m1, m2, n1, n2) in dims.items()
        ):
            return f
    raise UnsupportedAdapterError(
        "no single PEFT decompose_factor reproduces this adapter's Kronecker factor sizes; "
        "it cannot be written in PEFT format"
    )


def _peft_rank(name: str, adapter: LoKrAdapter, spec: LayerSpec, decompose_both: bool, effective: bool) -> int:
    """An r for which PEFT's `update_layer` creates exactly this module's factor structure."""
    m1, m2, n1, n2 = _dims(adapter, spec)
    has = {k for k, _ in adapter.named_parameters()}
    if spec.kind == "conv1d" and "lokr_w2" in has and not adapter.swapped:
        raise UnsupportedAdapterError(
            f"{name}: a LyCORIS Conv1d with a full w2 uses a layout PEFT cannot express; keep it in LyCORIS format"
        )
    if "lokr_w2" in has:
        low = [_param(adapter, "lokr_w1_a").shape[1]] if "lokr_w1_a" in has else []
        r = low[0] if low else max(adapter.r, m1, n1, m2, n2)
        ok = r >= max(m2, n2) / 2
    else:
        r = _param(adapter, "lokr_w2_a").shape[1] if "lokr_t2" not in has else _param(adapter, "lokr_t2").shape[0]
        ok = r < max(m2, n2) / 2
        cp_needed = effective and spec.kind != "linear" and any(k != 1 for k in spec.kernel)
        ok = ok and ("lokr_t2" in has) == cp_needed
    w1_low = decompose_both and r < max(m1, n1) / 2
    if not ok or w1_low != ("lokr_w1_a" in has):
        raise UnsupportedAdapterError(
            f"{name}: PEFT's rank rules (full w2 iff r >= max(m2, n2)/2, decomposed w1 iff decompose_both and "
            f"r < max(m1, n1)/2) cannot reproduce this module's factor structure"
        )
    return int(r)


def _param(adapter: LoKrAdapter, name: str) -> Tensor:
    value = getattr(adapter, name)
    assert isinstance(value, Tensor)
    return value
