"""Check one module's LoKr tensors against its base layer before anything is attached."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import (
    AdapterFormatError,
    LoKrError,
    MissingKeysError,
    NonFiniteError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from .functional import LayerSpec

__all__ = ["validate_all", "validate_factors"]

_W1_FORMS = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
_W2_FORMS = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_t2", "lokr_w2_a", "lokr_w2_b"})
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def validate_factors(module: str, tensors: dict[str, Tensor], spec: LayerSpec) -> None:
    """Raise a specific error naming `module` unless `tensors` form a LoKr delta of `spec`'s weight shape."""
    _check_structure(module, tensors)
    for name, t in tensors.items():
        if t.dtype not in _FLOAT_DTYPES:
            raise AdapterFormatError(f"{module}.{name} has dtype {t.dtype}; expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{module}.{name} contains NaN or Inf values")
    m1, n1 = _w1_dims(module, tensors)
    m2, n2 = _w2_dims(module, tensors, spec)
    if m1 * m2 != spec.out_features or n1 * n2 != spec.in_features:
        raise ShapeMismatchError(
            f"{module}: factors give a ({m1}*{m2}) x ({n1}*{n2}) = {m1 * m2} x {n1 * n2} delta but the base "
            f"layer's weight is {spec.out_features} x {spec.in_features}"
            + (" (in_channels // groups)" if spec.groups > 1 else "")
            + "; was the adapter trained on another base model?"
        )


_LISTED = 5  # shape mismatches named in one message


def validate_all(source: str, modules: Iterable[tuple[str, dict[str, Tensor], LayerSpec]]) -> None:
    """`validate_factors` on every `(module, tensors, spec)`; shape mismatches are gathered into one error naming
    `source`, how many modules do not fit and the first few (an adapter made for another model fails on many); any
    other defect raises at once, with `source` prefixed."""
    mismatches, total = [], 0
    for module, tensors, spec in modules:
        total += 1
        try:
            validate_factors(module, tensors, spec)
        except ShapeMismatchError as exc:
            mismatches.append(str(exc).removesuffix("; was the adapter trained on another base model?"))
        except LoKrError as exc:  # NaN, a missing factor...: the first one, naming the file
            raise type(exc)(f"{source}: {exc}") from None
    if not mismatches:
        return
    more = f"; and {len(mismatches) - _LISTED} more" if len(mismatches) > _LISTED else ""
    raise ShapeMismatchError(
        f"{source}: {len(mismatches)} of {total} modules do not fit this model's layers (was the adapter trained on "
        f"another base model?): " + "; ".join(mismatches[:_LISTED]) + more
    )


def _check_structure(module: str, tensors: dict[str, Tensor]) -> None:
    names = set(tensors)
    w1 = [f for f in _W1_FORMS if f <= names]
    w2 = [f for f in _W2_FORMS if f <= names]
    if not w1:
        raise MissingKeysError(f"{module}: needs lokr_w1 or lokr_w1_a + lokr_w1_b; has {sorted(names)}")
    if not w2:
        raise MissingKeysError(
            f"{module}: needs lokr_w2, lokr_w2_a + lokr_w2_b, or lokr_t2 + lokr_w2_a + lokr_w2_b; has {sorted(names)}"
        )
    used = max(w1, key=len) | max(w2, key=len)
    if len(w1) > 1 or "lokr_w2" in names and len(w2) > 1 or names - used:
        raise UnexpectedKeysError(f"{module}: ambiguous or extra factors {sorted(names)}")


def _dims(module: str, name: str, t: Tensor, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in allowed:
        raise ShapeMismatchError(f"{module}.{name} has shape {tuple(t.shape)}; expected {allowed[0]} dimensions")
    return tuple(t.shape)


def _w1_dims(module: str, tensors: dict[str, Tensor]) -> tuple[int, int]:
    if "lokr_w1" in tensors:
        m1, n1 = _dims(module, "lokr_w1", tensors["lokr_w1"], 2)
        return m1, n1
    m1, r_a = _dims(module, "lokr_w1_a", tensors["lokr_w1_a"], 2)
    r_b, n1 = _dims(module, "lokr_w1_b", tensors["lokr_w1_b"], 2)
    if r_a != r_b:
        raise ShapeMismatchError(f"{module}: lokr_w1_a is (*, {r_a}) but lokr_w1_b is ({r_b}, *)")
    return m1, n1


def _w2_dims(module: str, tensors: dict[str, Tensor], spec: LayerSpec) -> tuple[int, int]:
    kernel = spec.kernel
    if "lokr_w2" in tensors:
        shape = _dims(module, "lokr_w2", tensors["lokr_w2"], 2 + len(kernel))
        if tuple(shape[2:]) != kernel:
            raise ShapeMismatchError(f"{module}.lokr_w2 has kernel {shape[2:]}; the base layer's is {kernel}")
        return shape[0], shape[1]
    if "lokr_t2" in tensors:
        return _cp_dims(module, tensors, spec)
    m2, r_a = _dims(module, "lokr_w2_a", tensors["lokr_w2_a"], 2)
    shape_b = _dims(module, "lokr_w2_b", tensors["lokr_w2_b"], (2, 2 + len(kernel)))
    r_b, cols = shape_b[0], math.prod(shape_b[1:])
    if r_a != r_b:
        raise ShapeMismatchError(f"{module}: lokr_w2_a is (*, {r_a}) but lokr_w2_b is ({r_b}, *)")
    k = math.prod(kernel) if kernel else 1
    if len(shape_b) > 2 and tuple(shape_b[2:]) != kernel:  # LyCORIS functional layout (r, n2, *k)
        raise ShapeMismatchError(f"{module}.lokr_w2_b has kernel {shape_b[2:]}; the base layer's is {kernel}")
    if cols % k:
        raise ShapeMismatchError(f"{module}.lokr_w2_b has {cols} columns, not a multiple of the kernel size {k}")
    return m2, cols // k


def _cp_dims(module: str, tensors: dict[str, Tensor], spec: LayerSpec) -> tuple[int, int]:
    if spec.kind == "linear":
        raise ShapeMismatchError(f"{module}: lokr_t2 (CP) factors need a convolution, the base layer is Linear")
    t_kernel = spec.kernel if spec.kind == "conv2d" else (*spec.kernel, 1)
    shape = _dims(module, "lokr_t2", tensors["lokr_t2"], 4)
    r_a, m2 = _dims(module, "lokr_w2_a", tensors["lokr_w2_a"], 2)
    r_b, n2 = _dims(module, "lokr_w2_b", tensors["lokr_w2_b"], 2)
    if shape[2:] != t_kernel or shape[0] != r_a or shape[1] != r_b:
        raise ShapeMismatchError(
            f"{module}: lokr_t2 {shape}, lokr_w2_a {(r_a, m2)}, lokr_w2_b {(r_b, n2)} do not form a CP factor "
            f"with kernel {t_kernel}"
        )
    return m2, n2
