"""Tiny models and a model snapshot shared by the lokr tests."""

from __future__ import annotations

import torch
from torch import nn

import lokr


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 12)
        self.proj_out = nn.Conv2d(4, 6, 3, padding=1)
        self.conv_1d = nn.Conv1d(4, 6, 3)
        self.embed = nn.Embedding(5, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([Block(), Block()])


def two_adapter_mlp(sizes: tuple[int, int, int] = (32, 48, 16)) -> nn.Sequential:
    """`Linear(in, hidden) -> GELU -> Linear(hidden, out)` in eval mode (seed 0), LoKr adapters "a" and "b" (r=4,
    random factors) on both Linear layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.GELU(), nn.Linear(sizes[1], sizes[2])).eval()
    for name in ("a", "b"):
        lokr.inject(model, lokr.LoKrConfig(target_modules=["0", "2"], init_weights=False, r=4), name)
    return model


Snapshot = tuple[dict[str, torch.Tensor], list[tuple[str, type]], list[str]]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything a failed load must leave untouched: weights, module types, adapter names."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m)) for n, m in model.named_modules()], lokr.list_adapters(model)


def assert_unchanged(model: nn.Module, snap: Snapshot) -> None:
    state, types, adapters = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert lokr.list_adapters(model) == adapters
