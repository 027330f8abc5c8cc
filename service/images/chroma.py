"""Chroma pipelines (`ChromaPipeline`: Flux's transformer without the CLIP pooled input or distilled guidance, its
modulations from an approximator; one T5 `text_encoder`; real classifier-free guidance).

Each row does what `ChromaPipeline.__call__` does for one image: T5 embeddings with their tokenizer mask (all padding
masked but the first pad, in the transformer's attention too, the image tokens unmasked), latents and sigmas as
Flux's (`flux.Flux`), and with `guidance_scale` above 1 a negative row (its prompt, "" by default) combined as
`neg + guidance_scale * (pos - neg)`. Rows with and without CFG, at any step, share a forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import BadRequestError
from .family import encode_with_negatives, refuse_latent_upscaling, refuse_true_cfg
from .flux import Flux, cfg_pair, text_ids
from .rows import Conditioning, ImageJob, ImageSpec, Row

if TYPE_CHECKING:
    from .load import LoadedPipeline

__all__ = ["Chroma"]


class Chroma(Flux):
    """`ChromaPipeline` rows: packed latents as Flux's; a negative row with CFG; masked T5 tokens."""

    def uses_cfg(self, pipe: Any) -> bool:
        return True

    def check(self, spec: ImageSpec) -> None:
        refuse_latent_upscaling(spec, "Chroma")
        refuse_true_cfg(spec, "Chroma")
        if spec.mask is not None:
            raise BadRequestError("inpainting is not served on Chroma pipelines (text to image and img2img are)",
                                  code="invalid_request")  # fmt: skip

    def encode(self, loaded: LoadedPipeline, jobs: Sequence[ImageJob], fold: int = 0) -> list[Conditioning]:
        """T5 embeddings `(1, L, D)` and their masks `(1, L)` (L: the pipeline's max_sequence_length, 512) of every
        prompt and, with CFG, negative prompt, in one batch under each job's adapters."""

        def run(texts: list[str]) -> tuple[Tensor, Tensor]:
            embeds, mask = loaded.pipe._get_t5_prompt_embeds(texts, device=loaded.device)
            return embeds, mask

        conds = encode_with_negatives(loaded, jobs, fold, lambda spec: spec.guidance_scale > 1.0, run)
        for cond in conds:  # `run`'s second output is the mask, not a pooled embedding
            cond.mask, cond.uncond_mask, cond.pooled, cond.uncond_pooled = cond.pooled, cond.uncond_pooled, None, None
        return conds

    def text_inputs(self, loaded: LoadedPipeline, rows: Sequence[Row], tokens: int) -> dict[str, Any]:
        """T5 embeddings `(B, L, D)` (positive then negative rows), shared text ids `(L, 3)`, and the attention mask
        `(B, L + tokens)`: each row's text mask, then its image tokens, all attended, as `ChromaPipeline` builds it."""
        embeds = torch.cat([t for row in rows for t in cfg_pair(row.cond.cond, row.cond.uncond)])
        masks = torch.cat([t for row in rows for t in cfg_pair(_mask(row.cond), row.cond.uncond_mask)])
        image = torch.ones(masks.shape[0], tokens, device=masks.device, dtype=torch.bool)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids(loaded, embeds.shape[1]),
                "attention_mask": torch.cat([masks, image], dim=1)}  # fmt: skip

    def cfg_scale(self, spec: ImageSpec) -> float:
        """Chroma's CFG is real: `guidance_scale`."""
        return spec.guidance_scale


def _mask(cond: Conditioning) -> Tensor:
    assert cond.mask is not None, "a Chroma row's prompt has its token mask"
    return cond.mask
