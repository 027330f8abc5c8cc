"""LoKr maths: PEFT's factorization, delta weights, and the factored (never-materialised) forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.tuners.lokr.layer import make_kron as peft_make_kron
from peft.tuners.lokr.layer import make_weight_cp as peft_make_weight_cp

from lokr.contract import kron_rows, linear_order
from lokr.functional import (
    Factors,
    LayerSpec,
    apply_delta,
    delta_weight,
    factorization,
    make_kron,
    make_weight_cp,
)

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


# --------------------------------------------------------------------------------------------- factorization
@pytest.mark.parametrize(
    ("dimension", "factor", "expected"),
    [
        (128, -1, (8, 16)),
        (256, -1, (16, 16)),
        (512, -1, (16, 32)),
        (4096, -1, (64, 64)),
        (768, -1, (24, 32)),
        (1280, -1, (32, 40)),
        (3072, -1, (48, 64)),
        (11008, -1, (86, 128)),
        (14336, -1, (112, 128)),
        (127, -1, (1, 127)),
        (127, 4, (1, 127)),
        (1, -1, (1, 1)),
        (128, 4, (4, 32)),
        (4096, 4, (4, 1024)),
        (3072, 4, (4, 768)),
        (360, 16, (15, 24)),
        (1000, 3, (2, 500)),
        (12, 5, (3, 4)),
        # PEFT's early return is not sorted
        (128, 32, (32, 4)),
        (128, 64, (64, 2)),
        (12, 4, (4, 3)),
        (2, 2, (2, 1)),
        (128, 128, (128, 1)),
        # any factor < -1 behaves like "no factor allowed" in PEFT
        (100, -2, (1, 100)),
        (100, 0, (1, 100)),
        (2048, 4096, (32, 64)),
        (360, -1, (18, 20)),
    ],
)
def test_factorization_table(dimension: int, factor: int, expected: tuple[int, int]) -> None:
    assert factorization(dimension, factor) == expected
    assert peft_factorization(dimension, factor) == expected


def test_factorization_equals_peft_everywhere() -> None:
    for dimension in range(1, 301):
        for factor in (-2, -1, 0, 1, 2, 3, 4, 8, 16, 32):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (
                dimension,
                factor,
            )


@given(st.integers(1, 5000), st.integers(-1, 300))
@PROPERTY
def test_factorization_multiplies_back(dimension: int, factor: int) -> None:
    m, n = factorization(dimension, factor)
    assert m * n == dimension
    assert (m, n) == peft_factorization(dimension, factor)


# --------------------------------------------------------------------------------------------- kron / cp
def test_make_kron_matches_peft_for_every_rank() -> None:
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for w2_shape in [(5, 2), (5, 2, 3), (5, 2, 3, 3)]:
        w2 = torch.randn(*w2_shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(make_kron(w1, w2, 0.7), peft_make_kron(w1, w2, 0.7), **TIGHT)
    w2 = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    lycoris = make_kron(w1, w2, 2.0, peft_conv1d_layout=False)
    torch.testing.assert_close(lycoris, 2.0 * torch.kron(w1[:, :, None], w2), **TIGHT)


def test_make_kron_survives_rank1_cp_strides() -> None:
    """The CP einsum can return strides for which `torch.kron` raises; lokr must not."""
    t = torch.randn(1, 1, 3, 1, dtype=torch.float64)
    w2 = make_weight_cp(t, torch.randn(1, 8, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64))
    w1 = torch.randn(4, 4, dtype=torch.float64)
    expected = torch.kron(w1[:, :, None, None], w2.clone(memory_format=torch.contiguous_format).reshape(8, 4, 3, 1))
    torch.testing.assert_close(make_kron(w1, w2), expected, **TIGHT)


def test_make_weight_cp_matches_peft() -> None:
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    wa, wb = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(make_weight_cp(t, wa, wb), peft_make_weight_cp(t, wa, wb), **TIGHT)


# --------------------------------------------------------------------------------------------- property tests
def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@st.composite
def _w1(draw: st.DrawFn, m1: int, n1: int) -> dict[str, torch.Tensor]:
    if draw(st.booleans()):
        return {"w1": _rand(m1, n1)}
    r = draw(st.integers(1, 3))
    return {"w1_a": _rand(m1, r), "w1_b": _rand(r, n1)}


@st.composite
def linear_case(draw: st.DrawFn) -> tuple[torch.Tensor, Factors, LayerSpec, float]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    m1, n1, m2, n2 = (draw(st.integers(1, 6)) for _ in range(4))
    tensors = draw(_w1(m1, n1))
    if draw(st.booleans()):
        tensors["w2"] = _rand(m2, n2)
    else:
        r = draw(st.integers(1, 4))
        tensors.update(w2_a=_rand(m2, r), w2_b=_rand(r, n2))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    x = _rand(*lead, n1 * n2)
    scale = draw(st.floats(-4, 4, allow_nan=False))
    return x, Factors(**tensors), LayerSpec("linear", m1 * m2, n1 * n2), scale


@given(linear_case())
@PROPERTY
def test_linear_factored_equals_dense(case: tuple[torch.Tensor, Factors, LayerSpec, float]) -> None:
    x, factors, spec, scale = case
    weight = delta_weight(factors, spec, scale)
    assert weight.shape == spec.weight_shape
    w2 = factors.w2_matrix()
    torch.testing.assert_close(weight, peft_make_kron(factors.w1_full(), w2, scale).reshape(spec.weight_shape), **TIGHT)
    torch.testing.assert_close(apply_delta(x, factors, spec, scale), F.linear(x, weight), **TIGHT)


@st.composite
def conv_case(draw: st.DrawFn) -> tuple[torch.Tensor, Factors, LayerSpec, float]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["conv1d", "conv2d"]))
    dims = 1 if kind == "conv1d" else 2
    m1, n1, m2, n2 = (draw(st.integers(1, 4)) for _ in range(4))
    groups = draw(st.integers(1, 3))
    assume((m1 * m2) % groups == 0)
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding: tuple[int, ...] | str
    if draw(st.integers(0, 4)) == 0 and stride == (1,) * dims:
        padding = "same"
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    k = math.prod(kernel)
    tensors = draw(_w1(m1, n1))
    form = draw(st.sampled_from(["full", "lora", "cp"]))
    swapped = False
    if form == "full":
        tensors["w2"] = _rand(m2, n2, *kernel)
        swapped = kind == "conv1d" and draw(st.booleans())
    elif form == "lora":
        r = draw(st.integers(1, 3))
        tensors.update(w2_a=_rand(m2, r), w2_b=_rand(r, n2 * k))
    else:
        r = draw(st.integers(1, 3))
        t_kernel = kernel if kind == "conv2d" else (*kernel, 1)
        tensors.update(t2=_rand(r, r, *t_kernel), w2_a=_rand(r, m2), w2_b=_rand(r, n2))
    spatial = tuple(dilation[i] * (kernel[i] - 1) + 1 + draw(st.integers(0, 3)) for i in range(dims))
    x = _rand(draw(st.integers(1, 3)), groups * n1 * n2, *spatial)
    spec = LayerSpec(kind, m1 * m2, n1 * n2, kernel, stride, padding, dilation, groups)
    scale = draw(st.floats(-4, 4, allow_nan=False))
    return x, Factors(**tensors, swapped=swapped), spec, scale


def _peft_delta(factors: Factors, spec: LayerSpec, scale: float) -> torch.Tensor:
    w2 = factors.w2_matrix()
    w2 = torch.empty(w2.shape, dtype=w2.dtype).copy_(w2)  # fresh strides: torch.kron chokes on some CP strides
    if spec.kind == "conv1d" and factors.w2 is not None and not factors.swapped:
        return scale * torch.kron(factors.w1_full()[:, :, None], w2)  # LyCORIS layout
    return peft_make_kron(factors.w1_full(), w2, scale).reshape(spec.weight_shape)


@given(conv_case())
@PROPERTY
def test_conv_factored_equals_dense(case: tuple[torch.Tensor, Factors, LayerSpec, float]) -> None:
    x, factors, spec, scale = case
    weight = delta_weight(factors, spec, scale)
    assert weight.shape == spec.weight_shape
    torch.testing.assert_close(weight, _peft_delta(factors, spec, scale), **TIGHT)
    conv = F.conv1d if spec.kind == "conv1d" else F.conv2d
    expected = conv(x, weight, None, spec.stride, spec.padding, spec.dilation, spec.groups)
    torch.testing.assert_close(apply_delta(x, factors, spec, scale), expected, **TIGHT)


def test_conv1d_swapped_layout_is_kron_w2_w1() -> None:
    w1, w2 = _rand(8, 4), _rand(8, 8, 3)
    spec = LayerSpec("conv1d", 64, 32, (3,), (1,), (1,), (1,), 1)
    weight = delta_weight(Factors(w1=w1, w2=w2, swapped=True), spec, 0.5)
    torch.testing.assert_close(weight, 0.5 * torch.kron(w2, w1[:, :, None]), **TIGHT)
    assert not torch.allclose(weight, 0.5 * torch.kron(w1[:, :, None], w2))


def test_layer_spec_from_modules() -> None:
    assert LayerSpec.from_module(torch.nn.Linear(6, 4)).weight_shape == (4, 6)
    conv = torch.nn.Conv2d(8, 6, (3, 1), stride=2, padding=1, dilation=(1, 2), groups=2)
    spec = LayerSpec.from_module(conv)
    assert spec.weight_shape == tuple(conv.weight.shape) == (6, 4, 3, 1)
    assert (spec.stride, spec.padding, spec.dilation, spec.groups) == ((2, 2), (1, 1), (1, 2), 2)
    with pytest.raises(TypeError):
        LayerSpec.from_module(torch.nn.Embedding(3, 4))


@pytest.mark.parametrize("order", ["w2_first", "w1_first", "sandwich"])
@pytest.mark.parametrize("groups", [1, 3])
def test_every_linear_order_gives_the_kron_product(order: str, groups: int) -> None:
    torch.manual_seed(0)
    m1, n1, m2, n2, r, k = 3, 4, 5, 6, 2, 7
    w1 = torch.randn(groups, m1, n1, dtype=torch.float64)
    w2_a, w2_b = torch.randn(groups, m2, r, dtype=torch.float64), torch.randn(groups, r, n2, dtype=torch.float64)
    rows = torch.randn(groups, k, n1, n2, dtype=torch.float64)
    got = kron_rows(rows, w1, [w2_b.transpose(1, 2), w2_a.transpose(1, 2)], order)  # type: ignore[arg-type]
    for g in range(groups):
        dense = torch.kron(w1[g], w2_a[g] @ w2_b[g])  # (m1*m2, n1*n2)
        want = rows[g].reshape(k, -1) @ dense.T
        torch.testing.assert_close(got[g].reshape(k, -1), want)


def test_linear_order_prefers_the_rank_sized_sandwich_for_low_rank_w2() -> None:
    order, cost = linear_order(64, 64, 64, 64, 8)  # a 4096x4096 layer, r = 8
    assert order == "sandwich" and cost == 8 * 3 * 64 * 64
    assert linear_order(64, 64, 64, 64, None)[0] in ("w2_first", "w1_first")
    assert linear_order(2, 64, 4, 64, None)[0] == "w1_first"  # w1 shrinks 64 blocks to 2 first
