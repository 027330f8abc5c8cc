"""Choosing the next token per row, and logprobs from the same logits."""

from __future__ import annotations

import torch
from torch import Tensor

from .jobs import SamplingParams

__all__ = ["choose_tokens", "make_generator", "top_logprobs"]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-row generator: seeded when the request gives a seed, random otherwise; None for greedy."""
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def choose_tokens(logits: Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> Tensor:
    """`logits (B, V)` -> token ids `(B,)`; greedy rows are one argmax, sampled rows use their own RNG."""
    tokens = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, gens)):
        if p.temperature == 0:
            continue
        probs = torch.softmax(logits[row].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        tokens[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (always >= 1 token)."""
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    filtered = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    return filtered / filtered.sum()


def top_logprobs(logprobs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`logprobs (..., V)` -> top-k values and ids."""
    return logprobs.topk(k, dim=-1) if k > 0 else (logprobs[..., :0], logprobs[..., :0].long())
