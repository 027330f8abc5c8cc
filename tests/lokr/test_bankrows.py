"""`LinearRows`: the batched Linear delta read from gathered bank rows equals `x @ (s * kron(w1, w2))^T` per entry,
in every contraction order, with low-rank or full factors, per-entry coefficients, and added into `out` in place."""

from __future__ import annotations

import pytest
import torch

from lokr.bankrows import LinearRows, ScaleTally
from lokr.functional import LayerSpec

# (m1, n1, m2, n2, w1 rank or None, w2 rank or None, the order linear_order picks for them)
SHAPES = [
    (4, 4, 16, 16, None, 2, "sandwich"),
    (4, 4, 16, 16, 2, 2, "sandwich"),
    (8, 8, 2, 16, None, None, "w2_first"),
    (2, 8, 16, 16, None, None, "w1_first"),
    (2, 8, 16, 16, 1, None, "w1_first"),
]


def _layout(m1: int, n1: int, m2: int, n2: int, r1: int | None, r2: int | None) -> tuple:
    shapes = [("lokr_w1", (m1, n1))] if r1 is None else [("lokr_w1_a", (m1, r1)), ("lokr_w1_b", (r1, n1))]
    shapes += [("lokr_w2", (m2, n2))] if r2 is None else [("lokr_w2_a", (m2, r2)), ("lokr_w2_b", (r2, n2))]
    parts, offset = [], 1
    for name, shape in shapes:
        parts.append((name, shape, offset))
        offset += shape[0] * shape[1]
    return tuple(parts), offset


def _weight(row: torch.Tensor, parts: tuple) -> torch.Tensor:
    f = {name[5:]: row[off : off + shape[0] * shape[1]].view(shape) for name, shape, off in parts}
    w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
    w2 = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"]
    return row[0] * torch.kron(w1, w2)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[-1]}-{i}" for i, s in enumerate(SHAPES)])
@pytest.mark.parametrize("per_entry", [1, 3], ids=["one-row-each", "three-rows-each"])
@pytest.mark.parametrize("scales", ["per-row", "coeff", "common"])
@pytest.mark.parametrize("into_out", [False, True], ids=["returned", "in-place"])
@pytest.mark.parametrize("read", ["rows", "index", "index-row-major"])
def test_delta_equals_kron_per_entry(shape: tuple, per_entry: int, scales: str, into_out: bool, read: str) -> None:
    """`per-row`: each row's own scale; `coeff`: times a per-entry multiplier; `common`: one scale, said so. `read`:
    from gathered rows (`delta`), or operands gathered from the bank by index, as views or contiguous row-major
    copies (`operands`, what a kept bank pass holds)."""
    m1, n1, m2, n2, r1, r2, order = shape
    parts, width = _layout(m1, n1, m2, n2, r1, r2)
    spec = LayerSpec("linear", m1 * m2, n1 * n2)
    kernel = LinearRows.of(parts, spec)
    assert kernel.order == order
    gen = torch.Generator().manual_seed(0)
    entries = 5
    bank = torch.randn(9, width, generator=gen)
    index = torch.tensor([7, 2, 2, 0, 5])
    if scales == "common":
        bank[:, 0] = 0.7
    rows = bank.index_select(0, index)
    x = torch.randn(entries, per_entry, n1 * n2, generator=gen)
    coeff = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.25]) if scales == "coeff" else None
    with torch.inference_mode():
        base = torch.randn(entries, per_entry, m1 * m2, generator=gen)
        out = base.clone() if into_out else None
        common = 0.7 if scales == "common" else None
        if read == "rows":
            got = kernel.delta(x, rows, coeff, out, common=common)
        else:
            operands = kernel.operands(bank, coeff, common, index=index, row_major=read == "index-row-major")
            got = operands.run(x, out)
    times = coeff if coeff is not None else torch.ones(entries)
    want = torch.stack([x[e] @ (times[e] * _weight(rows[e], parts)).T for e in range(entries)])
    if into_out:
        assert got is out
        want = base + want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_one_shared_row_serves_every_entry() -> None:
    """A single row (one adapter for the whole batch, a slice of the bank) runs all of `x` as one entry."""
    parts, width = _layout(4, 4, 16, 16, None, 2)
    kernel = LinearRows.of(parts, LayerSpec("linear", 64, 64))
    bank = torch.randn(6, width, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = kernel.delta(x, bank[3:4])
    torch.testing.assert_close(got, x @ _weight(bank[3], parts).T, rtol=1e-5, atol=1e-5)


def test_scale_tally_names_the_one_scale_all_hold() -> None:
    tally = ScaleTally()
    assert tally.common is None
    tally.set("a", 0.5)
    tally.set("b", 0.5)
    assert tally.common == 0.5
    tally.set("b", 2.0)
    assert tally.common is None
    tally.set("b", None)
    assert tally.common == 0.5
    tally.set("a", None)
    assert tally.common is None
