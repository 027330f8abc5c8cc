"""Tiny models shared by the format and parser tests: Linear, Conv2d, Conv1d and an unsupported Embedding."""

from __future__ import annotations

from torch import nn


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
