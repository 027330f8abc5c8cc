"""BFL-layout fused rows split onto diffusers' Flux layers: the parts' Kronecker products are the fused delta's rows."""

from __future__ import annotations

import pytest
import torch

from lokr.errors import ShapeMismatchError, UnsupportedAdapterError
from lokr.flux_names import split_rows


@pytest.mark.parametrize("decomposed", [False, True])
def test_split_parts_are_the_fused_rows(decomposed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(6, 3, generator=g), torch.randn(8, 5, generator=g)  # rows 48 = q, k, v of 16
    tensors = {"lokr_w2": w2}
    if decomposed:
        a, b = torch.randn(6, 2, generator=g), torch.randn(2, 3, generator=g)
        tensors.update(lokr_w1_a=a, lokr_w1_b=b)
        w1 = a @ b
    else:
        tensors["lokr_w1"] = w1
    full = torch.kron(w1, w2)
    rows = {"q": [(0, 16)], "k": [(16, 32)], "v": [(32, 48)], "swapped": [(24, 48), (0, 24)]}
    parts = split_rows("key", tensors, rows)
    for name, part in parts.items():
        got_w1 = part["lokr_w1"] if not decomposed else part["lokr_w1_a"] @ part["lokr_w1_b"]
        want = torch.cat([full[a:b] for a, b in rows[name]])
        torch.testing.assert_close(torch.kron(got_w1, part["lokr_w2"]), want)


def test_unaligned_or_wrong_sized_rows_are_refused() -> None:
    tensors = {"lokr_w1": torch.ones(4, 3), "lokr_w2": torch.ones(12, 5)}  # 48 rows, w2 12 rows: 16 % 12 != 0
    with pytest.raises(UnsupportedAdapterError, match="my_qkv"):
        split_rows("my_qkv", tensors, {"q": [(0, 16)], "k": [(16, 32)], "v": [(32, 48)]})
    with pytest.raises(ShapeMismatchError, match="my_qkv"):
        split_rows("my_qkv", tensors, {"q": [(0, 12)], "k": [(12, 24)]})
