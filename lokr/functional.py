"""LoKr maths: PEFT's factorization and Kronecker rebuild, and the factored (never-materialised) forward.

Notation (shapes): base weight `(O, I, *k)` with `I = in_channels // groups` for convs;
`w1 (m1, n1)`, `w2 (m2, n2, *k)`, `O = m1 * m2`, `I = n1 * n2`; `dW = s * kron(w1, w2)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import kron_rows, linear_order
from .errors import UnsupportedLayerError

__all__ = [
    "FACTOR_NAMES",
    "Factors",
    "LayerSpec",
    "apply_delta",
    "delta_weight",
    "factored_cost",
    "factorization",
    "make_kron",
    "make_weight_cp",
    "prefer_factored",
]

FACTOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LayerKind = Literal["linear", "conv1d", "conv2d"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's `factorization`, edge cases included (the early return is not sorted).

    >>> factorization(256, -1)
    (16, 16)
    >>> factorization(127, -1)
    (1, 127)
    >>> factorization(128, 32)
    (32, 4)
    """
    if factor > 0 and (dimension % factor) == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def make_weight_cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """CP / Tucker rebuild: `t (r, r, *k)`, `wa (r, m2)`, `wb (r, n2)` -> `(m2, n2, *k)`."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def make_kron(w1: Tensor, w2: Tensor, scale: float = 1.0, *, peft_conv1d_layout: bool = True) -> Tensor:
    """`scale * kron(w1, w2)` as PEFT builds it.

    PEFT unsqueezes `w1` only for a 4-D `w2`; for a 3-D (Conv1d) `w2` `torch.kron` left-pads `w1`, which
    yields `kron(w2, w1[..., None])` after the reshape (PEFT's Conv1d quirk). LyCORIS unsqueezes for any
    rank: pass `peft_conv1d_layout=False` for that.
    """
    if w2.dim() == 4 or (w2.dim() == 3 and not peft_conv1d_layout):
        w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
    return _kron(w1, w2) * scale


def _kron(a: Tensor, b: Tensor) -> Tensor:
    """`torch.kron(a, b)` (the lower-rank operand left-padded with 1s) as a broadcast product.

    `torch.kron` raises a view error for some valid strides, e.g. the `(m2, n2, k, 1)` tensor that the CP
    einsum returns for a rank-1 Conv1d `t2` (`.contiguous()` does not help: size-1 dims make it "contiguous").
    """
    ndim = max(a.dim(), b.dim())
    a = a.reshape((1,) * (ndim - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (ndim - b.dim()) + tuple(b.shape))
    a_view = [d for size in a.shape for d in (size, 1)]
    b_view = [d for size in b.shape for d in (1, size)]
    out = a.reshape(a_view) * b.reshape(b_view)
    return out.reshape([sa * sb for sa, sb in zip(a.shape, b.shape, strict=True)])


@dataclass(frozen=True)
class LayerSpec:
    """What the LoKr maths needs to know about a base layer."""

    kind: LayerKind
    out_features: int  # O
    in_features: int  # I (per group for convs)
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerSpec:
        if isinstance(module, nn.Linear):
            return cls("linear", module.out_features, module.in_features)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            kind: LayerKind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
            padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            return cls(
                kind,
                module.out_channels,
                module.in_channels // module.groups,
                tuple(module.kernel_size),
                tuple(module.stride),
                padding,
                tuple(module.dilation),
                module.groups,
            )
        raise UnsupportedLayerError(
            f"no LoKr layer spec for {type(module).__name__}; LoKr wraps Linear, Conv1d and Conv2d"
        )

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1


@dataclass(frozen=True)
class Factors:
    """The tensors of one adapter on one layer (PEFT names without the `lokr_` prefix).

    `swapped` marks PEFT's Conv1d full-`w2` layout: `dW = s * kron(w2, w1[..., None])`.
    """

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    swapped: bool = False

    def w1_full(self) -> Tensor:
        """`(m1, n1)`."""
        if self.w1 is not None:
            return self.w1
        assert self.w1_a is not None
        assert self.w1_b is not None
        return self.w1_a @ self.w1_b

    def w2_matrix(self) -> Tensor:
        """`w2` as PEFT builds it before `make_kron`: full tensor, CP rebuild, or `w2_a @ w2_b`."""
        if self.w2 is not None:
            return self.w2
        assert self.w2_a is not None
        assert self.w2_b is not None
        if self.t2 is not None:
            return make_weight_cp(self.t2, self.w2_a, self.w2_b)
        return self.w2_a @ self.w2_b

    def w2_kernel(self, spec: LayerSpec) -> Tensor:
        """`w2` shaped `(m2, n2, *k)` for a conv (the CP rebuild has a trailing 1 on Conv1d)."""
        w2 = self.w2_matrix()
        m2 = w2.shape[0]
        return w2.reshape(m2, -1, *spec.kernel)

    @property
    def m1(self) -> int:
        return (self.w1 if self.w1 is not None else self.w1_a).shape[0]  # type: ignore[union-attr]

    @property
    def n1(self) -> int:
        return (self.w1 if self.w1 is not None else self.w1_b).shape[-1]  # type: ignore[union-attr]

    @property
    def w2_rank(self) -> int | None:
        """Rank of a LoRA-style `w2` (None when full or CP)."""
        if self.w2 is not None or self.t2 is not None or self.w2_b is None:
            return None
        return self.w2_b.shape[0]


def delta_weight(f: Factors, spec: LayerSpec, scale: float) -> Tensor:
    """The dense `dW` in the base weight's shape, exactly as PEFT's `get_delta_weight`."""
    weight = make_kron(f.w1_full(), f.w2_matrix(), scale, peft_conv1d_layout=f.swapped)
    return weight.reshape(spec.weight_shape)


# --------------------------------------------------------------------------------------------- costs
def factored_cost(f: Factors, spec: LayerSpec) -> int:
    """Multiply-adds per output position (token / pixel) of the factored delta, cheaper order."""
    m1, n1 = f.m1, f.n1
    m2, n2 = spec.out_features // m1, spec.in_features // n1
    k = spec.kernel_numel
    if spec.kind == "linear":
        cost = linear_order(m1, n1, n2, m2, f.w2_rank)[1]
    else:
        cost = min(n1 * m2 * n2 * k + m1 * n1 * m2, m1 * n1 * n2 + m1 * m2 * n2 * k)
        lowrank = _lowrank_conv_cost(f, spec)
        if lowrank is not None:
            cost = min(cost, lowrank)
    return cost * spec.groups


def _lowrank_conv_cost(f: Factors, spec: LayerSpec) -> int | None:
    """Per-pixel cost of `_conv_lowrank` (LoRA-style `w2`, ungrouped conv), None where it does not apply."""
    rank = f.w2_rank
    if rank is None or spec.groups != 1 or spec.kind == "linear" or f.swapped:
        return None
    m1, n1 = f.m1, f.n1
    m2, n2 = spec.out_features // m1, spec.in_features // n1
    return n1 * rank * n2 * spec.kernel_numel + n1 * m2 * rank + m1 * n1 * m2


def prefer_factored(f: Factors, spec: LayerSpec) -> bool:
    """True where the factored forward is cheaper than a (cached) dense delta."""
    if spec.kind != "linear" and f.swapped and spec.groups > 1:
        return False
    dense = spec.out_features * spec.in_features * spec.kernel_numel
    return factored_cost(f, spec) < dense


# --------------------------------------------------------------------------------------------- apply
def apply_delta(x: Tensor, f: Factors, spec: LayerSpec, scale: float) -> Tensor:
    """`x -> layer(x; dW)` without bias and without building `dW` (`x` already in the factors' dtype)."""
    if spec.kind == "linear":
        return _linear(x, f, scale)
    if f.swapped:
        if spec.groups > 1:  # no factored form for the swapped layout across groups: materialise
            weight = delta_weight(f, spec, scale)
            return F.conv1d(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups)
        return _conv1d_swapped(x, f, spec, scale)
    return _conv(x, f, spec, scale)


def _linear(x: Tensor, f: Factors, scale: float) -> Tensor:
    """`x (..., n1*n2) -> (..., m1*m2)` as `s * w1 @ X @ w2^T` with X = x viewed `(n1, n2)`."""
    w1 = f.w1_full() * scale
    m1, n1 = w1.shape
    n2 = x.shape[-1] // n1
    if f.w2 is not None:
        chain = [f.w2.T]
    else:
        assert f.w2_a is not None and f.w2_b is not None
        chain = [f.w2_b.T, f.w2_a.T]
    order, _ = linear_order(m1, n1, n2, chain[-1].shape[1], f.w2_rank)
    y = kron_rows(x.reshape(1, -1, n1, n2), w1.unsqueeze(0), [w.unsqueeze(0) for w in chain], order)
    return y.reshape(*x.shape[:-1], -1)


def _conv_fn(spec: LayerSpec):  # type: ignore[no-untyped-def]
    return F.conv1d if spec.kind == "conv1d" else F.conv2d


def _conv(x: Tensor, f: Factors, spec: LayerSpec, scale: float) -> Tensor:
    """Pseudo-batch conv with `w2` on `B*g*n1` images of `n2` channels, then a 1x1 mix by `w1`."""
    w1 = f.w1_full() * scale
    lowrank = _lowrank_conv_cost(f, spec)
    if lowrank is not None:
        m1, n1 = w1.shape
        m2, n2, k = spec.out_features // m1, spec.in_features // n1, spec.kernel_numel
        if lowrank < min(n1 * m2 * n2 * k + m1 * n1 * m2, m1 * n1 * n2 + m1 * m2 * n2 * k):
            return _conv_lowrank(x, f, spec, w1)
    w2 = f.w2_kernel(spec)
    m1, n1 = w1.shape
    m2, n2 = w2.shape[:2]
    batch, spatial, g = x.shape[0], x.shape[2:], spec.groups
    conv = _conv_fn(spec)
    args = (None, spec.stride, spec.padding, spec.dilation)
    mix_first = g == 1 and m1 * n1 * n2 + m1 * m2 * n2 * spec.kernel_numel < n1 * m2 * n2 * spec.kernel_numel
    if mix_first:
        u = torch.matmul(w1, x.reshape(batch, n1, -1))  # (B, m1, n2*P_in)
        h = conv(u.reshape(batch * m1, n2, *spatial), w2, *args)
        return h.reshape(batch, m1 * m2, *h.shape[2:])
    h = conv(x.reshape(batch * g * n1, n2, *spatial), w2, *args)  # (B*g*n1, m2, *P)
    out_spatial = h.shape[2:]
    z = torch.matmul(w1, h.reshape(batch, g, n1, -1))  # (B, g, m1, m2*P)
    if g == 1:
        return z.reshape(batch, m1 * m2, *out_spatial)
    z = z.reshape(batch, g, m1 * m2, -1)
    own_group = torch.arange(m1 * m2, device=x.device) // (m1 * m2 // g)
    y = z[:, own_group, torch.arange(m1 * m2, device=x.device)]  # (B, O, P): each channel's own group
    return y.reshape(batch, m1 * m2, *out_spatial)


def _conv_lowrank(x: Tensor, f: Factors, spec: LayerSpec, w1: Tensor) -> Tensor:
    """LoRA-style `w2 = w2_a @ w2_b`, groups 1: one conv with `groups=n1` (each `n2`-channel input block to
    `r` channels by `w2_b`), then `w2_a` (`r -> m2`) and `w1` (`n1 -> m1`) as batched matmuls.

    Per pixel `n1*r*n2*k + n1*m2*r + m1*n1*m2` multiply-adds instead of `n1*m2*n2*k + m1*n1*m2`, and one
    grouped conv over the real batch runs faster than a conv with few channels over `B*n1` pseudo-images.
    """
    assert f.w2_a is not None
    assert f.w2_b is not None
    m1, n1 = w1.shape
    rank, m2 = f.w2_b.shape[0], f.w2_a.shape[0]
    n2 = spec.in_features // n1
    kernel = f.w2_b.reshape(rank, n2, *spec.kernel).repeat(n1, *([1] * (1 + len(spec.kernel))))
    h = _conv_fn(spec)(x, kernel, None, spec.stride, spec.padding, spec.dilation, n1)  # (B, n1*r, *P)
    batch, out_spatial = h.shape[0], h.shape[2:]
    z = torch.matmul(f.w2_a, h.reshape(batch * n1, rank, -1))  # (B*n1, m2, P)
    y = torch.matmul(w1, z.reshape(batch, n1, -1))  # (B, m1, m2*P)
    return y.reshape(batch, m1 * m2, *out_spatial)


def _conv1d_swapped(x: Tensor, f: Factors, spec: LayerSpec, scale: float) -> Tensor:
    """PEFT Conv1d full-w2 layout: input channel `j2*n1 + j1`, output `i2*m1 + i1`."""
    w1 = f.w1_full() * scale
    assert f.w2 is not None
    m1, n1 = w1.shape
    m2, n2 = f.w2.shape[:2]
    batch, length = x.shape[0], x.shape[-1]
    u = torch.matmul(w1, x.reshape(batch, n2, n1, length))  # (B, n2, m1, T)
    u = u.transpose(1, 2).reshape(batch * m1, n2, length)
    h = F.conv1d(u, f.w2, None, spec.stride, spec.padding, spec.dilation)  # (B*m1, m2, T')
    return h.reshape(batch, m1, m2, -1).transpose(1, 2).reshape(batch, m2 * m1, -1)
