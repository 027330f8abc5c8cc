"""SD / SDXL prompts through their CLIP text encoders, from token chunks (`prompts`): one encoder batch for every
chunk of every prompt, each row under its prompt's adapters.

A prompt read as diffusers reads it is one chunk and gives `encode_prompt`'s output; a prompt in A1111's syntax
may be several chunks, encoded each on its own and joined along the tokens, with each token's output scaled by its
weight and the chunk's mean restored (A1111's "Original" emphasis), and the pooled embedding of its first chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import lokr
from lokr.batch import RowSpec

from .prompts import Chunk, chunk_prompt, plain_chunk, window

__all__ = ["PromptText", "encode_prompts", "text_states"]


@dataclass(frozen=True)
class PromptText:
    """One prompt to encode: its text, adapters, CLIP skip (None: the pipeline's layer) and how it is read."""

    text: str
    selection: RowSpec
    clip_skip: int | None = None
    a1111: bool = False  # A1111's syntax (emphasis, BREAK, any length), else diffusers' (cut to the window)


def encode_prompts(
    loaded: Any, prompts: Sequence[PromptText], xl: bool, fold: int = 0
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Every prompt (same CLIP skip) as `(1, L, D)` embeddings, L a multiple of the tokenizer's length, and (SDXL)
    `(1, P)` pooled embeddings. SDXL: both encoders' penultimate layers side by side, pooled from the second."""
    pipe = loaded.pipe
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if xl:
        encoders = [(t, e) for t, e in [encoders[0], (pipe.tokenizer_2, pipe.text_encoder_2)] if e is not None]
    chunked = [[_chunks(tok, p) for p in prompts] for tok, _ in encoders]
    counts = [max(len(per[i]) for per in chunked) for i in range(len(prompts))]
    specs = [p.selection for p, n in zip(prompts, counts) for _ in range(n)]
    skip = prompts[0].clip_skip if prompts else None
    parts: list[Tensor] = []
    pooled: Tensor | None = None
    with lokr.adapter_batch(loaded.container, specs, fold=fold):
        for (tok, encoder), per_prompt in zip(encoders, chunked):
            rows = [c for chunks, n in zip(per_prompt, counts) for c in chunks + [Chunk()] * (n - len(chunks))]
            hidden, first = _run_encoder(tok, encoder, rows, skip, xl)
            parts.append(_emphasised(hidden, rows))
            pooled = first if pooled is None else pooled
    dtype = encoders[-1][1].dtype
    joined = torch.cat(parts, dim=-1).to(dtype=dtype, device=loaded.device)
    embeds, pools, at = [], [], 0
    for n in counts:
        embeds.append(joined[at : at + n].reshape(1, -1, joined.shape[-1]))
        pools.append(None if pooled is None else pooled[at : at + 1].to(loaded.device))
        at += n
    return embeds, pools


def _chunks(tokenizer: Any, prompt: PromptText) -> list[Chunk]:
    return chunk_prompt(tokenizer, prompt.text) if prompt.a1111 else [plain_chunk(tokenizer, prompt.text)]


def _token_rows(tokenizer: Any, chunks: Sequence[Chunk], device: torch.device) -> tuple[Tensor, Tensor]:
    """`(N, window + 2)` ids, as the tokenizer pads one chunk to its length (start, tokens, end, padding), and the
    attention mask of the tokens that are not padding."""
    size = window(tokenizer)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.full((len(chunks), size + 2), pad, dtype=torch.long)
    mask = torch.zeros((len(chunks), size + 2), dtype=torch.long)
    for i, chunk in enumerate(chunks):
        n = len(chunk.ids)
        ids[i, : n + 2] = torch.tensor([bos, *chunk.ids, eos])
        mask[i, : n + 2] = 1
    return ids.to(device), mask.to(device)


def _run_encoder(
    tokenizer: Any, encoder: Any, chunks: Sequence[Chunk], skip: int | None, xl: bool
) -> tuple[Tensor, Tensor | None]:
    """One encoder forward over `chunks`: the hidden states diffusers' `encode_prompt` takes `(N, T, D)` and,
    where the encoder projects one (SDXL's second), the pooled embeddings `(N, P)`."""
    ids, mask = _token_rows(tokenizer, chunks, encoder.device)
    if xl:  # the penultimate layer (or `skip` more), no final norm; the pooled output where it is 2-D
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        return out.hidden_states[-(2 if skip is None else skip + 2)], pooled
    use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
    out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=skip is not None)
    if skip is None:
        return out[0], None
    return encoder.text_model.final_layer_norm(out.hidden_states[-(skip + 1)]), None


def _emphasised(hidden: Tensor, chunks: Sequence[Chunk]) -> Tensor:
    """Each weighted chunk's token outputs `(T, D)` scaled by their weights (start, end and padding: 1), then by
    the ratio of its mean before to after, so the chunk keeps its mean (A1111's "Original" emphasis)."""
    if not any(chunk.weighted for chunk in chunks):
        return hidden
    rows = []
    for z, chunk in zip(hidden, chunks):
        if chunk.weighted:
            weights = torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
            weights[1 : 1 + len(chunk.weights)] = torch.tensor(chunk.weights, dtype=z.dtype)
            before = z.mean()
            z = z * weights[:, None]
            z = z * (before / z.mean())
        rows.append(z)
    return torch.stack(rows)


def text_states(hidden: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Rows' text embeddings `(1, L_i, D)` as one `(B, L, D)` batch: where lengths differ (an A1111 prompt longer
    than its negative), the shorter are padded with zeros and a `(B, L)` mask keeps the cross-attention off the
    padding, which gives each row what a forward at its own length does (A1111 runs such rows apart)."""
    longest = max(int(h.shape[1]) for h in hidden)
    if all(int(h.shape[1]) == longest for h in hidden):
        return torch.cat(list(hidden)), None
    mask = torch.zeros((len(hidden), longest), dtype=torch.bool, device=hidden[0].device)
    padded = []
    for i, h in enumerate(hidden):
        mask[i, : h.shape[1]] = True
        padded.append(torch.nn.functional.pad(h, (0, 0, 0, longest - int(h.shape[1]))))
    return torch.cat(padded), mask
