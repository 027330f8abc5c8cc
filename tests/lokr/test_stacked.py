"""The stacked (batched-matmul) mixed-adapter Linear path equals dense per-row deltas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lokr

CONFIGS = {
    "lowrank-w2": {"r": 2},
    "full-w2": {"r": 16},
    "decompose-both": {"r": 1, "decompose_both": True},
    "factor-4": {"r": 2, "decompose_factor": 4},
}
ROWS = {
    "permutation": ["a2", "a0", "a1", "a0"],
    "mixed": ["a0", None, [("a1", 0.5), ("a2", 2.0)], [("a0", -1.0)]],
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_stacked_rows_equal_dense(config: dict[str, object], rows: list[object]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96)).eval().double()
    for i in range(3):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0"], init_weights=False, **config), f"a{i}")  # type: ignore[arg-type]
    layer = model[0]
    for adapter in layer.lokr_adapters.values():
        adapter.double()
    x = torch.randn(len(rows), 5, 64, dtype=torch.float64)
    with torch.no_grad(), lokr.adapter_batch(model, rows):  # type: ignore[arg-type]
        assert layer._stack_factors(("a0", "a1", "a2")) is not None
        got = model(x)
    with torch.no_grad():
        for i, row in enumerate(rows):
            want = layer.base_layer(x[i])
            for name, scale in _pairs(row):
                want = want + scale * F.linear(x[i], layer.get_delta_weight(name))
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)


def _pairs(row: object) -> list[tuple[str, float]]:
    if row is None:
        return []
    if isinstance(row, str):
        return [(row, 1.0)]
    return list(row)  # type: ignore[call-overload]
