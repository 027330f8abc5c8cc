"""Black Forest Labs' original Flux layout names (kohya sd-scripts' Flux keys) on a diffusers Flux transformer.

sd-scripts names the layers of `FluxTransformer2DModel` after BFL's code: `double_blocks_0_img_attn_proj`,
`single_blocks_3_linear2`, `time_in_in_layer`, ... Most have one diffusers counterpart (`original_flux_names`).
Three kinds are fused in BFL's layout and separate layers in diffusers (`fused_rows`): `double_blocks_N_img_attn_qkv`
/ `txt_attn_qkv` (q, k, v), `single_blocks_N_linear1` (q, k, v, MLP in), and `final_layer_adaLN_modulation_1`
(shift, scale; diffusers' `norm_out.linear` puts scale first). A LoKr delta `kron(w1, w2)` has row
`i = i1 * m2 + i2` (`m2` = w2's rows), so a block of its rows is `kron(w1[rows / m2], w2)` exactly when the
block's bounds are multiples of `m2` (`split_rows`); otherwise the key cannot be split and is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import ShapeMismatchError, UnsupportedAdapterError

__all__ = ["consecutive_rows", "fused_rows", "is_flux", "original_flux_names", "split_rows", "swapped_rows"]

_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}  # fmt: skip
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}  # fmt: skip
_QKV = {
    "img": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_FUSED_DOUBLE = re.compile(r"double_blocks_(\d+)_(img|txt)_attn_qkv")
_FUSED_SINGLE = re.compile(r"single_blocks_(\d+)_linear1")
_FINAL_MODULATION = "final_layer_adaLN_modulation_1"

# {diffusers name: [(start, stop) rows of the fused BFL layer, in the order they make up that layer's rows]}
RowMap = dict[str, list[tuple[int, int]]]


def is_flux(model: nn.Module) -> bool:
    """A diffusers Flux-shaped transformer: double-stream `transformer_blocks`, `single_transformer_blocks`."""
    blocks = ("transformer_blocks", "single_transformer_blocks")
    return all(isinstance(getattr(model, n, None), nn.ModuleList) for n in blocks) and hasattr(model, "x_embedder")


def original_flux_names(transformer: nn.Module, module_names: Sequence[str]) -> dict[str, str]:
    """`{diffusers name: BFL name}` for those of `module_names` (relative) with a one-to-one BFL counterpart."""
    if not is_flux(transformer):
        return {}
    names: dict[str, str] = {}
    for name in module_names:
        parts = name.split(".")
        if name in _TOP:
            names[name] = _TOP[name]
        elif parts[0] == "transformer_blocks" and len(parts) > 2 and ".".join(parts[2:]) in _DOUBLE:
            names[name] = f"double_blocks.{parts[1]}.{_DOUBLE['.'.join(parts[2:])]}"
        elif parts[0] == "single_transformer_blocks" and len(parts) > 2 and ".".join(parts[2:]) in _SINGLE:
            names[name] = f"single_blocks.{parts[1]}.{_SINGLE['.'.join(parts[2:])]}"
    return names


def fused_rows(transformer: nn.Module, path: str) -> RowMap | None:
    """The diffusers layers (relative names) a fused BFL layer `path` (dotted or flat) splits into, with the
    fused layer's rows each takes; None when `path` is not a fused BFL layer of this transformer."""
    if not is_flux(transformer):
        return None
    flat = path.replace(".", "_")
    if (m := _FUSED_DOUBLE.fullmatch(flat)) is not None:
        return consecutive_rows(transformer, [f"transformer_blocks.{m[1]}.{n}" for n in _QKV[m[2]]])
    if (m := _FUSED_SINGLE.fullmatch(flat)) is not None:
        return consecutive_rows(transformer, [f"single_transformer_blocks.{m[1]}.{n}" for n in _LINEAR1])
    if flat == _FINAL_MODULATION:
        return swapped_rows(transformer, "norm_out.linear")
    return None


def _out_features(transformer: nn.Module, name: str) -> int | None:
    """The rows of the Linear `name` (relative; None when there is no such Linear)."""
    try:
        layer = transformer.get_submodule(name)
    except AttributeError:
        return None
    base = getattr(layer, "base_layer", layer)  # already wrapped by an adapter
    return int(base.out_features) if isinstance(base, nn.Linear) else None


def consecutive_rows(transformer: nn.Module, names: list[str]) -> RowMap | None:
    """Layers `names` whose rows, in order, make up one fused layer's (q, k, v, ...)."""
    rows: RowMap = {}
    start = 0
    for name in names:
        size = _out_features(transformer, name)
        if size is None:
            return None
        rows[name] = [(start, start + size)]
        start += size
    return rows


def swapped_rows(transformer: nn.Module, name: str) -> RowMap | None:
    """The Linear `name`, whose rows are a fused-layout layer's two halves swapped (its shift, scale -> diffusers'
    scale, shift)."""
    rows = _out_features(transformer, name)
    return None if rows is None else {name: [(rows // 2, rows), (0, rows // 2)]}


def split_rows(key: str, tensors: dict[str, Tensor], rows: RowMap) -> dict[str, dict[str, Tensor]]:
    """`{diffusers name: LoKr factors of its rows of the fused layer}`: w2 kept, w1 (or w1_a) rows taken.

    Refused (naming `key`) when a bound is not a multiple of w2's rows: the block is then no Kronecker product.
    """
    w2 = tensors.get("lokr_w2", tensors.get("lokr_w2_a"))
    w1_name = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    if w2 is None or w1_name not in tensors or "lokr_t2" in tensors:
        raise UnsupportedAdapterError(
            f"{key!r}: a fused layer (BFL's Flux or SAI's SD3 layout) needs Linear LoKr factors (w1 and w2)"
        )
    m2 = int(w2.shape[0])
    w1 = tensors[w1_name]
    total = int(w1.shape[0]) * m2
    bounds = sorted({b for part in rows.values() for r in part for b in r})
    if bounds[-1] != total:
        raise ShapeMismatchError(f"{key!r}: its LoKr delta has {total} rows; this model's fused layer has {bounds[-1]}")
    if any(b % m2 for b in bounds):
        raise UnsupportedAdapterError(
            f"{key!r} is a fused layer of the original (BFL Flux / SAI SD3) layout; its LoKr delta ({total} rows, "
            f"w2 with {m2} rows) does not split at the rows of diffusers' separate layers ({bounds}): only deltas "
            "whose w2 row count divides every boundary split exactly. Retrain with another `factor`, or on "
            "diffusers' layer names"
        )
    out = {}
    for name, part in rows.items():
        taken = torch.cat([w1[start // m2 : stop // m2] for start, stop in part])
        out[name] = {**tensors, w1_name: taken.contiguous()}
    return out
