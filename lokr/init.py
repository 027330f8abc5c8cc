"""Fresh adapters as PEFT creates them: shapes, the three initialisations (`init_weights` True, False, "lycoris")
with PEFT's RNG draws, and PEFT's dtype."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoKrConfig
from .formats import ModuleWeights
from .functional import LayerSpec
from .inject import empty_parameters, parameter_shapes
from .layer import LoKrAdapter

__all__ = ["adapter_dtype", "cast_like_peft", "fresh_adapter", "init_like_peft", "new_adapter"]


def fresh_adapter(base: nn.Module, name: str, config: LoKrConfig) -> LoKrAdapter:
    """PEFT's factors for module `name` (its `base` layer): shapes, initialisation, RNG draws and dtype."""
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    spec = LayerSpec.from_module(base)
    r, alpha = config.rank_for(name), config.alpha_for(name)
    tensors = empty_parameters(parameter_shapes(spec, config, r), weight)
    swapped = spec.kind == "conv1d" and "lokr_w2" in tensors  # PEFT's Conv1d full-w2 layout
    adapter = new_adapter(ModuleWeights(tensors, alpha / r, r, alpha, swapped), config)
    init_like_peft(adapter, config.init_weights)
    cast_like_peft(adapter, weight.dtype)
    for p in adapter.parameters():
        p.requires_grad_(not config.inference_mode)
    adapter.origin = ("peft", None)
    return adapter


def new_adapter(weights: ModuleWeights, config: LoKrConfig | None) -> LoKrAdapter:
    """A `LoKrAdapter` holding `weights`, with `config`'s dropout settings (none without a config)."""
    return LoKrAdapter(
        weights.tensors,
        r=weights.r,
        alpha=weights.alpha,
        scale=weights.scale,
        swapped=weights.swapped,
        rank_dropout=config.rank_dropout if config is not None else 0.0,
        module_dropout=config.module_dropout if config is not None else 0.0,
        rank_dropout_scale=config.rank_dropout_scale if config is not None else False,
    )


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


def cast_like_peft(adapter: LoKrAdapter, base_dtype: torch.dtype) -> None:
    """PEFT moves fresh (float32) factors to the base layer's dtype, then (`autocast_adapter_dtype`) back to float32
    when that dtype is narrower: a float64 base gets float64 factors, a bf16 / fp16 base float32 factors holding
    bf16- / fp16-rounded values."""
    if base_dtype.is_floating_point:
        adapter.to(base_dtype).to(adapter_dtype(base_dtype))


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's dtype for an adapter on a base layer of `base_dtype`: the base's, but float32 for narrower dtypes."""
    return base_dtype if base_dtype.is_floating_point and base_dtype.itemsize >= 4 else torch.float32
