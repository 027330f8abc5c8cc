"""PEFT's three LoKr initialisations (`init_weights` True, False, "lycoris"), with PEFT's RNG draws."""

from __future__ import annotations

import math

import torch
from torch import nn

from .layer import LoKrAdapter

__all__ = ["init_like_peft"]


def init_like_peft(adapter: LoKrAdapter, init_weights: bool | str) -> None:
    """PEFT's three initialisations, in PEFT's parameter order (same RNG draws as PEFT)."""
    kaiming = lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # noqa: E731
    params = dict(adapter.named_parameters())
    with torch.no_grad():
        if "lokr_w1" in params:
            (kaiming if init_weights is not True else nn.init.zeros_)(params["lokr_w1"])
        else:
            (kaiming if init_weights is not True else nn.init.zeros_)(params["lokr_w1_a"])
            kaiming(params["lokr_w1_b"])
        lycoris = init_weights == "lycoris"
        if "lokr_w2" in params:
            (nn.init.zeros_ if lycoris else kaiming)(params["lokr_w2"])
        elif lycoris:
            nn.init.zeros_(params["lokr_w2_b"])
            kaiming(params["lokr_w2_a"])
        else:
            kaiming(params["lokr_w2_a"])
            kaiming(params["lokr_w2_b"])
        if "lokr_t2" in params:
            kaiming(params["lokr_t2"])
