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
    """`logits (B, V)` -> token ids `(B,)`. Greedy rows: argmax. Sampled rows: batched softmax / top-p and
    inverse-CDF sampling; only the one uniform draw per row comes from that row's own (seeded) generator."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return tokens
    index = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device).unsqueeze(1)
    probs = torch.softmax(logits.index_select(0, index).float() / temps, dim=-1)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        probs = _top_p(probs, top_p)
    draws = torch.stack([_uniform(gens[i], logits.device) for i in sampled])  # (S, 1)
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, draws * cdf[:, -1:]).clamp(max=probs.shape[-1] - 1)
    tokens[index] = choice.squeeze(1)
    return tokens


def _uniform(gen: torch.Generator | None, device: torch.device) -> Tensor:
    out = torch.rand(1, generator=gen, device=gen.device if gen is not None else device)
    return out.to(device)


def _top_p(probs: Tensor, top_p: Tensor) -> Tensor:
    """Per row, keep the smallest set of most likely tokens whose mass reaches `top_p` (always >= 1 token)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def top_logprobs(logprobs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`logprobs (..., V)` -> top-k values and ids."""
    return logprobs.topk(k, dim=-1) if k > 0 else (logprobs[..., :0], logprobs[..., :0].long())
