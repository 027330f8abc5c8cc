"""Tiny models and a model snapshot shared by the format and parser tests."""

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
